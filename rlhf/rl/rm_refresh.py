"""On-policy refresh of the distilled reward model during RL, so that the RM keeps tracking its teacher as the
policy moves (``reward.refresh``).

When a trigger fires after a step (an audit's alarm, an audit's agreement below ``agreement_below``, or every
``every`` steps):

    label  the teacher judges whole groups (one prompt's samples) of the latest rollouts, ``teacher_calls`` at most
    split  some groups are held out; the others give pairs within each group (reward/model/labelling.py)
    train  the RM's own DeepSpeed ranks (reward/model/ranks.py) continue on the pairs of every group the teacher
           has judged in this run's refreshes so far, plus a replay of its original pairs (output_dir/labels/train)
    check  RM-teacher agreement on every held-out group so far, before and after: worse, and the ranks go back to
           the state saved just before (weights and optimizer), logged; the reward workers never saw the candidate
    swap   otherwise the new weights reach the reward workers with the next version number, between two batches:
           no restart, and each batch is scored by one version (``rm/version``)

Judgments are kept from one refresh to the next, the audits' among them: each teacher call is paid once (an
audit's groups go to training or the held-out check as a refresh's own do), and a refresh with a few
groups of its own would otherwise barely move an RM trained on thousands of pairs, and be checked on a slice too
small to tell better from worse. The ranks live from the first refresh to the end of RL, so Adam's moments carry
over too; they, the version, the judged groups and the recent rollouts are part of every checkpoint
(``save_state``/``load_state``).
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

from reward.model.labelling import judged_row, judged_rows, make_pairs
from reward.model.refresh_data import budget_groups, keeps_agreement, mix_replay, split_groups
from rlhf.core.config.run_config import RunConfig
from rlhf.core.data.datasets import PromptRow, worked_solution
from rlhf.rl.audit import pairwise_agreement
from rlhf.stages import reward_model as distill

logger = logging.getLogger("distilrl")
STATE_FILE = "rm_refresh.json"
TRAINER_DIR = "reward_model_trainer"


class RecentRollouts:
    """The groups (prompt row, its sampled responses) of the latest ``steps`` RL steps."""

    def __init__(self, steps: int):
        self.steps, self.batches = steps, []  # [(step, [(row, [text, ...]), ...]), ...]

    def add(self, step: int, rows: list[PromptRow], texts: list[str]) -> None:
        n = len(texts) // len(rows)
        self.batches = [*self.batches, (step, [(row, texts[i * n:(i + 1) * n]) for i, row in enumerate(rows)])]
        self.batches = self.batches[-self.steps:]

    def groups(self) -> list[tuple[PromptRow, list[str]]]:
        return [group for _, groups in self.batches for group in groups]

    def state(self) -> list:
        return [[step, [[{"prompt": r.prompt, "answer": r.answer, "difficulty": r.difficulty, "record": r.record},
                         texts] for r, texts in groups]] for step, groups in self.batches]

    def load(self, state: list) -> None:
        self.batches = [(step, [(PromptRow(**row), texts) for row, texts in groups]) for step, groups in state]


class RewardModelRefresh:
    """``teacher``: judges rows (reward/teachers); ``reward``: the reward workers' group (``set_rm_weights``);
    ``rm_dir``: the RM they started with. The driver keeps its own copy of the current RM to check agreement."""

    def __init__(self, cfg: RunConfig, teacher, reward, rm_dir: str):
        from transformers import AutoTokenizer

        from reward.model.distilled import DistilledRewardModel, uses_reference

        self.cfg, self.rc, self.teacher, self.reward, self.rm_dir = cfg, cfg.reward.refresh, teacher, reward, rm_dir
        self.model = DistilledRewardModel.from_pretrained(rm_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(rm_dir)
        self.with_reference = uses_reference(self.model)
        self.version, self.teacher_calls_total, self.last_refresh = 0, 0, None
        self.recent = RecentRollouts(self.rc.recent_steps)
        self.trainer = None  # the RM's DeepSpeed ranks, from the first refresh on
        self.judged_train: list[list[dict]] = []  # every group the teacher judged in a refresh: pairs to train on
        self.judged_held: list[list[dict]] = []  # and those held out to check a refresh on
        self._originals: list[dict] | None = None

    def after_step(self, step: int, rows: list[PromptRow], samples: list, audit: dict,
                   audited_groups: list[list[dict]] = ()) -> dict:
        """Remember this step's rollouts and the groups its audit judged (split between training and held out as a
        refresh's own); refresh when a trigger fires. Returns the refresh's figures, or {}."""
        self.recent.add(step, rows, [s.text for s in samples])
        if audited_groups:
            train, held = split_groups(len(audited_groups), self.rc.held_out_fraction,
                                       random.Random(f"rm-refresh audit {self.cfg.seed} {step}"))
            self.judged_train = self.judged_train + [audited_groups[i] for i in train]
            self.judged_held = self.judged_held + [audited_groups[i] for i in held]
        reason = self._trigger(step, audit)
        return self.refresh(step, reason) if reason else {}

    def _trigger(self, step: int, audit: dict) -> str | None:
        rc = self.rc
        if self.last_refresh is not None and step - self.last_refresh < rc.min_gap:
            return None
        agreement = audit.get("audit/rm_teacher_agreement", math.nan)
        if rc.on_alarm and audit.get("audit/alarm"):
            return f"the audit's alarm (agreement {agreement:.2f})"
        if rc.agreement_below is not None and agreement < rc.agreement_below:
            return f"audit agreement {agreement:.2f} below {rc.agreement_below}"
        if rc.every and step % rc.every == 0:
            return f"every {rc.every} steps"
        return None

    def refresh(self, step: int, reason: str) -> dict:
        """One refresh (the module docstring's label, split, train, check, swap); returns its figures."""
        start = time.perf_counter()
        rng = random.Random(f"rm-refresh {self.cfg.seed} {step}")  # the same draws after a resume
        train_groups, held_groups, calls = self._label(rng)
        self.teacher_calls_total += calls
        self.last_refresh = step
        self.judged_train, self.judged_held = self.judged_train + train_groups, self.judged_held + held_groups
        new_pairs = make_pairs([row for group in train_groups for row in group], self.cfg.seed + step)
        judged_pairs = make_pairs([row for group in self.judged_train for row in group], self.cfg.seed + step)
        pairs = mix_replay(judged_pairs, self._original_pairs(), self.rc.replay_fraction, rng)
        before = self._agreement(self.judged_held)
        figures = {"rm_refresh/teacher_calls": calls, "rm_refresh/new_pairs": len(new_pairs),
                   "rm_refresh/judged_pairs": len(judged_pairs),
                   "rm_refresh/replay_pairs": len(pairs) - len(judged_pairs), "rm_refresh/agreement_before": before}
        accepted, after = False, math.nan
        if new_pairs:
            accepted, after, loss = self._train_and_check(pairs, self.judged_held, before)
            figures["rm_refresh/loss"] = loss
        seconds = time.perf_counter() - start
        figures.update({"rm_refresh/agreement_after": after, "rm_refresh/accepted": float(accepted),
                        "rm_refresh/rolled_back": float(bool(new_pairs) and not accepted),
                        "rm_refresh/teacher_calls_total": self.teacher_calls_total, "rm_refresh/seconds": seconds,
                        "rm_refresh/version": self.version})
        if accepted:
            logger.info("RM refresh at step %d (%s): version %d, held-out agreement %.3f -> %.3f, %d teacher "
                        "calls, %.1f s", step, reason, self.version, before, after, calls, seconds)
        elif new_pairs:
            logger.warning("RM refresh at step %d (%s) rolled back: held-out agreement %.3f -> %.3f is not shown "
                           "to be at least as good; the reward workers keep version %d", step, reason, before, after,
                           self.version)
        else:
            logger.warning("RM refresh at step %d (%s): the teacher told no training pair apart in %d calls; "
                           "nothing trained", step, reason, calls)
        return figures

    def _label(self, rng: random.Random) -> tuple[list[list[dict]], list[list[dict]], int]:
        """(training groups, held-out groups) of judged rows, and the teacher calls spent."""
        groups = self.recent.groups()
        size = self.cfg.rollout.samples_per_prompt
        picked = rng.sample(groups, budget_groups(len(groups), size, self.rc.teacher_calls))
        items = [(row, text) for row, texts in picked for text in texts]
        answer_field = self.cfg.task.answer_field
        verdicts = self.teacher.judge([row.prompt for row, _ in items], [text for _, text in items],
                                      [worked_solution(row, answer_field) or row.answer for row, _ in items])
        judged: list[list[dict]] = [[] for _ in picked]
        for k, ((row, text), verdict) in enumerate(zip(items, verdicts, strict=True)):
            if not verdict.error:
                judged[k // size].append(judged_row(row, text, "student", verdict))
        train, held = split_groups(len(picked), self.rc.held_out_fraction, rng)
        return [judged[i] for i in train], [judged[i] for i in held], len(items)

    def _original_pairs(self) -> list[dict]:
        """The pairs the RM was first trained on (as the train_rm stage made them); none without those labels."""
        if self._originals is None:
            labels = Path(self.cfg.output_dir) / "labels" / "train"
            rows = judged_rows(labels) if (labels / "rows.jsonl").exists() else []
            self._originals = make_pairs(rows, self.cfg.seed)
        return self._originals

    def _agreement(self, groups: list[list[dict]]) -> float:
        """The audit's pairwise RM-teacher agreement (rlhf/rl/audit.py), on judged groups, for the
        driver's copy of the RM (NaN without a pair the teacher tells apart)."""
        from reward.model.distilled import score_texts, with_reference

        rows = [row for group in groups for row in group]
        if not rows:
            return math.nan
        responses = [with_reference(r["response"], r["reference"]) if self.with_reference else r["response"]
                     for r in rows]
        scores = iter(s["quality"] for s in score_texts(self.model, self.tokenizer, [r["prompt"] for r in rows],
                                                        responses, batch_size=self.cfg.rollout_rows))
        return pairwise_agreement([[(next(scores), row["quality"]) for row in group] for group in groups])[0]

    def _train_and_check(self, pairs: list[dict], held_groups: list[list[dict]], before: float
                         ) -> tuple[bool, float, float]:
        """Train the ranks on ``pairs``; keep the result (new version, swapped into the workers) when the held-out
        agreement is not worse, else restore the ranks' state from before. Returns (accepted, after, last loss)."""
        trainer = self._trainer()
        snapshot = Path(self.cfg.output_dir) / "rm_refresh" / "before"
        shutil.rmtree(snapshot, ignore_errors=True)
        trainer.save_state(str(snapshot))
        previous = {name: tensor.clone() for name, tensor in self.model.state_dict().items()}
        if self.with_reference:
            pairs = [distill.referenced_pair(p) for p in pairs]
        loss = math.nan
        for _ in range(self.rc.epochs):
            for batch in distill.pair_batches(self.tokenizer, pairs, self.cfg.reward_model):
                loss = trainer.train_step(batch)["rm/loss"]
        state_dict = trainer.full_state_dict()
        self.model.load_state_dict(state_dict)
        after = self._agreement(held_groups)
        accepted = keeps_agreement(before, after)
        if accepted:
            self.version += 1
            self.reward.set_rm_weights(state_dict, self.version)
        else:
            trainer.load_state(str(snapshot))
            self.model.load_state_dict(previous)
        shutil.rmtree(snapshot, ignore_errors=True)
        return accepted, after, loss

    def _trainer(self):
        if self.trainer is None:
            from reward.model.ranks import RewardModelTrainerGroup

            rm = self.cfg.reward_model
            engine = rm.model_copy(update={"micro_batch_size": distill.batch_pairs(rm) // rm.num_ranks,
                                           "use_reference": self.with_reference})
            self.trainer = RewardModelTrainerGroup(self.rm_dir, engine, rm.num_ranks, self.cfg.call_timeout_s,
                                                   self.cfg.seed)
        return self.trainer

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_state(self, path: Path) -> None:
        """The version, teacher calls, recent rollouts, judged groups, and the RM ranks' state (weights, optimizer) once any
        refresh has started them, under ``path``."""
        state = {"version": self.version, "teacher_calls_total": self.teacher_calls_total,
                 "last_refresh": self.last_refresh, "recent": self.recent.state(),
                 "judged_train": self.judged_train, "judged_held": self.judged_held}
        (Path(path) / STATE_FILE).write_text(json.dumps(state))
        if self.trainer is not None:
            self.trainer.save_state(str(Path(path) / TRAINER_DIR))

    def load_state(self, path: Path) -> None:
        """Back to what ``save_state`` wrote: the RM ranks restarted with their saved state, and the reward
        workers given that RM's weights with its version."""
        state = json.loads((Path(path) / STATE_FILE).read_text())
        self.version, self.teacher_calls_total = state["version"], state["teacher_calls_total"]
        self.last_refresh = state["last_refresh"]
        self.recent.load(state["recent"])
        self.judged_train, self.judged_held = state["judged_train"], state["judged_held"]
        if (Path(path) / TRAINER_DIR).is_dir():
            trainer = self._trainer()
            trainer.load_state(str(Path(path) / TRAINER_DIR))
            state_dict = trainer.full_state_dict()
            self.model.load_state_dict(state_dict)
            if self.version:
                self.reward.set_rm_weights(state_dict, self.version)

    def shutdown(self) -> None:
        if self.trainer is not None:
            self.trainer.shutdown()
            self.trainer = None
