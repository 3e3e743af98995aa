"""One RL step, for every algorithm, over parts handed in (the rollout and reward groups, the update strategy).

    sample -> score -> shape rewards -> (drop groups without signal) -> update -> sync weights -> figures

The estimator decides the rest (rlhf/rl/update.py). A batch with a non-finite reward is not trained on; one whose
loss or gradient is not finite gets no update and no sync; both count towards ``max_bad_batches`` (rlhf/core/
guards.py). Every ``audit_every`` steps the teacher re-judges a sample of the rollouts (rlhf/rl/audit.py); with
``reward.refresh`` the distilled RM may then be refreshed on them (rlhf/rl/rm_refresh.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from rlhf.core.algorithms.shaping import informative_groups, overlong_penalty, turn_rewards
from rlhf.core.algorithms.staleness import bound_staleness
from rlhf.core.config.run_config import RunConfig
from rlhf.core.data.datasets import PromptRow
from rlhf.outputs.diagnostics import component_figures
from rlhf.outputs.samples import save_rl_samples
from rlhf.core.guards import BatchGuard, reward_fault, update_fault
from reward.model.refresh_data import batch_rm_version
from rlhf.rl.audit import audit
from rlhf.rl.evaluate import difficulty_metrics, evaluate_policy
from rlhf.rl.parts import Auditor, Reward, Rollout, Update
from rlhf.rl.prefetch import LaunchedRollout
from rollout.multi_turn import episode_figures


class RLStep:
    """The run's parts and the RL step over them; what each part must offer is in rlhf/rl/parts.py (``auditor``:
    None for no audits; ``refresher``: the distilled RM's refresh, rlhf/rl/rm_refresh.py, or None). Tests build it
    from stand-ins for each."""

    def __init__(self, cfg: RunConfig, tokenizer, rollout: Rollout, reward: Reward, update: Update,
                 auditor: Auditor | None = None, refresher=None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.rollout, self.reward, self.update, self.auditor = rollout, reward, update, auditor
        self.refresher = refresher
        self.guard = BatchGuard(cfg.max_bad_batches)  # batches skipped for NaN/inf rewards, losses, gradients
        self.samples_dir: Path | None = None  # where each step's picked samples go (the Trainer sets it); None: nowhere

    @property
    def version(self) -> int:
        return self.rollout.version

    @property
    def policy(self):
        """The policy's trainer ranks (checkpoint export, benchmarks)."""
        return self.update.policy

    def launch(self, rows: list[PromptRow]) -> LaunchedRollout:
        return self.rollout.launch(rows)

    def step(self, step: int, rows: list[PromptRow], launched: LaunchedRollout | None = None) -> dict:
        """One RL step on ``rows``. ``launched``: their generation, already started (asynchronous rollout starts it
        while earlier batches train, from older weights); None generates them now."""
        n = self.cfg.rollout.samples_per_prompt
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        restarts = self.rollout.restarts + self.reward.restarts
        samples = self.rollout.collect(launched) if launched else self.rollout.generate([r.prompt for r in rows], n,
                                                                                        greedy=False)
        generated_by = launched.version if launched else self.version  # weights version that sampled the batch
        staleness = {"perf/staleness": self.version - generated_by}  # updates since: what the update is off-policy by
        # Partial rollouts: versions per token, the old ones masked out of the loss (rlhf/core/algorithms/staleness.py).
        samples, per_token = bound_staleness(samples, self.version, self.cfg.rollout.max_staleness)
        staleness.update(per_token)
        timings["perf/generate_s"] = time.perf_counter() - t0  # asynchronous: only the wait the overlap left

        t = time.perf_counter()
        scores = self.reward.score(rows, samples)
        rm_version = batch_rm_version(scores)  # one RM version per batch: refreshes swap weights between batches
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
        timings["perf/score_s"] = time.perf_counter() - t
        fault = reward_fault([r.prompt for r in rows for _ in range(n)], scores)
        rewards, shaping = self._shaped(rewards, samples)
        difficulties = [r.difficulty for r in rows for _ in range(n)]
        train_samples, train_rewards, train_difficulties = self._with_signal(samples, rewards, difficulties, shaping)

        update_metrics: dict = {}
        timings["perf/sync_s"] = 0.0
        trained: list = []  # the samples the update used, for their advantages
        # Nothing to train on only when dynamic sampling found no group with signal: no update, no sync.
        if train_samples and fault is None:
            update_metrics, moved = self.update(step, train_samples, train_rewards, n, train_difficulties)
            trained = train_samples
            fault = update_fault(update_metrics) if moved else None
            if moved and fault is None:
                t = time.perf_counter()
                self.rollout.sync()
                timings["perf/sync_s"] = time.perf_counter() - t
        self.guard.record(fault)
        timings["perf/step_s"] = time.perf_counter() - t0

        audited, judged = {}, []
        if self.auditor is not None and step % self.cfg.reward.audit_every == 0:
            audited, judged = audit(self.auditor, rows, samples, scores, self.cfg.reward)
        refreshed = self.refresher.after_step(step, rows, samples, audited, judged) if self.refresher else {}
        self._save_samples(step, rows, samples, scores, rewards, trained)
        return {
            "step": step,
            **self._figures(rows, samples, scores, rewards),
            "charts/weights_version": self.version,
            "charts/rollout_weights_version": generated_by,
            **staleness,
            "faults/restarts": self.rollout.restarts + self.reward.restarts - restarts,
            "faults/skipped_batches": self.guard.skipped,
            **({"rm/version": rm_version} if rm_version is not None else {}),
            **shaping, **update_metrics, **audited, **refreshed, **timings,
        }

    def _save_samples(self, step: int, rows: list[PromptRow], samples: list, scores: list[dict],
                      rewards: torch.Tensor, trained: list) -> None:
        """The step's best, worst and random samples to ``samples_dir/step_N.jsonl``, each with the advantage the
        update gave it (None for a sample it did not train on)."""
        if self.samples_dir is None or not self.cfg.log_samples:
            return
        given = dict(zip(map(id, trained), getattr(self.update, "sample_advantages", None) or []))
        save_rl_samples(self.samples_dir, step, rows, samples, scores, rewards.tolist(),
                        [given.get(id(s)) for s in samples], self.cfg.log_samples, self.cfg.seed + step)

    def _shaped(self, rewards: torch.Tensor, samples: list) -> tuple[torch.Tensor, dict]:
        """Multi-turn trajectories' per-turn shaping (their environments' turn rewards), and DAPO's soft overlong
        punishment where ``overlong_buffer`` is set, added to the rewards."""
        a, shaping = self.cfg.algorithm, {}
        turns = turn_rewards([s.episode for s in samples])
        if turns is not None:
            rewards, shaping["reward/turn_shaping"] = rewards + turns, turns.mean().item()
        if a.overlong_buffer:
            penalty = overlong_penalty(torch.tensor([len(s.response_ids) for s in samples]),
                                       self.cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_penalty)
            rewards, shaping["reward/overlong_penalty"] = rewards + penalty, penalty.mean().item()
        return rewards, shaping

    def _with_signal(self, samples: list, rewards: torch.Tensor, difficulties: list,
                     shaping: dict) -> tuple[list, torch.Tensor, list]:
        """Dynamic sampling: the groups that carry signal, in a row count the trainer ranks can split."""
        if not self.cfg.algorithm.dynamic_sampling:
            return samples, rewards, difficulties
        n, t = self.cfg.rollout.samples_per_prompt, self.cfg.trainer
        keep = informative_groups(rewards, n, t.num_ranks * t.mini_batches_per_step).tolist()
        kept = [s for s, k in zip(samples, keep) if k]
        shaping["reward/dropped_groups"] = (len(samples) - len(kept)) // n
        return kept, rewards[torch.tensor(keep)], [d for d, k in zip(difficulties, keep) if k]

    def _figures(self, rows: list[PromptRow], samples: list, scores: list[dict], rewards: torch.Tensor) -> dict:
        """The rollout's figures: reward (over the finite rewards: a batch the guard skips still logs), the
        verifier's accuracy and answer rate, length, truncation, groups without signal, per-difficulty figures."""
        n = len(samples) // len(rows)
        finite = rewards[torch.isfinite(rewards)]
        grouped = rewards.reshape(-1, n)
        figures = {
            "reward/mean": finite.mean().item(),
            "reward/std": finite.std().item(),
            "reward/accuracy": sum(s["correct"] for s in scores) / len(scores),
            "reward/answered": sum(s["answered"] for s in scores) / len(scores),
            "reward/zero_signal_groups": (grouped.max(1).values == grouped.min(1).values).float().mean().item(),
            "charts/response_tokens": sum(len(s.response_ids) for s in samples) / len(samples),
            "charts/truncated_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
            **difficulty_metrics([r.difficulty for r in rows for _ in range(n)], samples,
                                 [s["correct"] > 0.5 for s in scores], self.count_tokens),
        }
        episodes = {f"episode/{k}": v for k, v in episode_figures(samples).items()}  # multi-turn tool use
        return {**figures, **component_figures(scores), **episodes}  # each component's own mean beside the total

    def count_tokens(self, text: str) -> int:
        """Length of a piece of text (e.g. the reasoning) in the policy's tokens."""
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def evaluate(self, rows: list[PromptRow], log=print) -> dict:
        """Greedy answers to the held-out prompts, checked by the reward workers' verifier (only: the figures mean
        the same whatever RL is rewarded by, and a custom reward function never sees held-out prompts)."""
        self.rollout.finish_sync()  # the figures are for the weights after every update so far
        return evaluate_policy(rows, lambda prompts: self.rollout.generate(prompts, 1, greedy=True),
                               self.reward.verify, self.cfg.eval.batch_size, log, self.count_tokens)

    def save_state(self, path: Path) -> list:
        """The update's state (policy, trainer ranks, critic) under ``path``; returns the rollout workers' RNG
        states, for the driver to store beside its own."""
        self.update.save_state(path)
        if self.refresher is not None:
            self.refresher.save_state(path)
        return self.rollout.rng_states()

    def load_state(self, path: Path, rollout_rng: list, version: int, guard: dict) -> None:
        """Back to a checkpoint written by ``save_state``: the update's state, the workers' RNGs, the policy's
        weights (sent to the rollout workers with the checkpoint's version) and the guard's counts."""
        self.update.load_state(path)
        if self.refresher is not None:
            self.refresher.load_state(path)
        self.rollout.set_rng_states(rollout_rng)
        self.rollout.sync(version)
        self.guard.load_state(guard)

    def shutdown(self) -> None:
        try:
            self.update.shutdown()
            if self.refresher is not None:
                self.refresher.shutdown()
        finally:
            self.reward.shutdown()
