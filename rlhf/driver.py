"""The central driver: warm-up, then GRPO with Ray actors, then evaluation, writing the run directory.

Here are the pieces of a run (the run directory, prompts, the student, the GRPO loop over the actors);
``rlhf.api.Trainer`` holds one run's state and calls them stage by stage, and ``rlhf.api.run`` is the pipeline.

Before RL, optionally: label (the teacher judges student samples) -> train the distilled reward model on the
labels (DeepSpeed ranks) -> evaluate it against the teacher on held-out samples.

One RL step, as data: pick prompts -> rollout workers sample n responses each -> reward workers score them ->
group-normalised advantages -> trainer ranks update (DeepSpeed; the reference model for the KL term lives on the
ranks, beside the data it needs) -> new weights, with a version number, to the rollout workers -> metrics.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from reward.teachers import make_teacher
from rlhf import distill
from rlhf import actors
from rlhf.base import cluster, think
from rlhf.base.algorithms import ADVANTAGE_ESTIMATORS, informative_groups, overlong_penalty
from rlhf.base.batch import make_train_batch, response_mask
from rlhf.base.chat import template_override
from rlhf.base.config import ConfigError, RunConfig, save_config
from rlhf.base.data import DatasetError, PromptRow, load_rows, usable_rows
from rlhf.evaluate import difficulty_metrics, evaluate_policy
from rlhf.base.models import build_student, build_tokenizer, check_model_dir, load_student
from rlhf.base.models import load_tokenizer as load_model_tokenizer
from rlhf.pipeline import LaunchedRollout
from rlhf.base.guards import BatchGuard, reward_fault, update_fault
from rlhf.base.resume import complete_checkpoints
from rlhf.trainer import TrainerGroup
from rlhf.base.worker_pool import get_all

# With asynchronous rollout the trainer ranks update while the rollout workers generate, and where they share CPU
# cores the ranks run at this much lower priority. Generation runs on fewer threads than the update (one, on the
# 2-core quickstart), so at equal priority the scheduler slows both alike, the update finishes first and a core
# idles while generation ends alone. Yielding to generation keeps it at full speed, and the update takes the rest
# of the cores, then all of them once generation is done (benchmarks/RESULTS.md, async_vs_sync). It only orders
# our own processes; on machines where trainer and rollout have their own cores or GPUs it changes nothing.
ASYNC_TRAINER_NICENESS = 5


class RunDirError(ValueError):
    """An output_dir that cannot take this run (it holds a finished one, or checkpoints to resume from)."""


def load_prompts(cfg: RunConfig, train_dataset=None, eval_dataset=None, tokenizer=None, log=print,
                 stats: dict | None = None) -> tuple[list[PromptRow], list[PromptRow]]:
    """(training pool, held-out set), from the Datasets passed in or the configured task, rendered for ``tokenizer``
    (rlhf/chat.py); ``stats`` gets the counts. Loaded first in a run: a bad dataset row should stop it before
    minutes of warm-up, not after."""
    train_pool, eval_set = load_rows(cfg.task, cfg.seed, train_dataset, eval_dataset, tokenizer, log, stats)
    if len(train_pool) < cfg.rollout.prompts_per_step:
        raise DatasetError(f"only {len(train_pool)} training prompts for rollout.prompts_per_step="
                           f"{cfg.rollout.prompts_per_step}")
    return train_pool, eval_set


def load_tokenizer(cfg: RunConfig):
    """The student's tokenizer (from its directory, or built), carrying ``task.chat_template``'s override so that
    checkpoints and the policy server use the template the prompts were rendered with."""
    path = cfg.model.model_name_or_path
    tokenizer = load_model_tokenizer(check_model_dir(path)) if path else build_tokenizer(cfg.model.tokenizer)
    override = template_override(cfg.task)
    if override is not None:
        tokenizer.chat_template = override
    return tokenizer


def fitting_prompts(cfg: RunConfig, rows: list[PromptRow], tokenizer, max_positions: int, name: str,
                    log=print, at_least: int = 1) -> list[PromptRow]:
    """The rows whose prompt leaves room for the longest response the run generates within the student's
    ``max_positions``; the others are skipped and counted like any bad row (rlhf.data.usable_rows). Fewer than
    ``at_least`` left is a DatasetError."""
    new_tokens = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens,
                     cfg.label.max_new_tokens if "label" in cfg.stages else 0)
    room = max_positions - new_tokens
    if room <= 0:
        raise ConfigError(f"responses of up to {new_tokens} tokens (rollout/eval/label max_new_tokens) leave no room "
                          f"for a prompt in the student's {max_positions} positions")
    lengths = [len(ids) for ids in tokenizer([r.prompt for r in rows], add_special_tokens=False).input_ids]
    problems = [f"prompt {i} has {n} tokens, over the {room} that fit before a {new_tokens}-token response in "
                f"{max_positions} positions ({rows[i].prompt[:40]!r}...)" for i, n in enumerate(lengths) if n > room]
    kept = usable_rows([r for r, n in zip(rows, lengths) if n <= room], problems, name, log)
    if len(kept) < at_least:
        raise DatasetError(f"only {len(kept)} {name} fit for rollout.prompts_per_step={at_least}")
    return kept


def build_policy(cfg: RunConfig, log=print, tokenizer=None) -> tuple:
    """The student and its tokenizer (``tokenizer``, else the directory's or a built one): loaded from a local
    directory, or built at the configured size."""
    if cfg.model.model_name_or_path:
        student, loaded = load_student(cfg.model.model_name_or_path)
        tokenizer = tokenizer or loaded
    else:
        tokenizer = tokenizer or build_tokenizer(cfg.model.tokenizer)
        student = build_student(cfg.model, tokenizer, cfg.seed)
    log(f"student: {type(student).__name__}, {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters")
    return student, tokenizer


class StageTimer:
    """Seconds spent per pipeline stage, for summary.json (where did the run's time go?)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + seconds, 1)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)


def refuse_finished_run(cfg: RunConfig) -> None:
    out = Path(cfg.output_dir)
    if (out / "summary.json").exists():
        raise RunDirError(f"output_dir {out} holds a finished run: choose another output_dir (or delete it)")


def prepare_run_dir(cfg: RunConfig, resume: bool = False) -> Path:
    """Make ``output_dir`` ready: a new run starts afresh (metrics.jsonl removed) where no finished run and no
    checkpoint is; ``resume``: keep what is there (the caller resumes from its newest checkpoint)."""
    out = Path(cfg.output_dir)
    refuse_finished_run(cfg)
    if not resume and complete_checkpoints(out):
        raise RunDirError(f"output_dir {out} holds checkpoints of an unfinished run: continue it with --resume, or "
                          f"choose another output_dir (or delete it)")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")
    return out


def progress_line(step: int, steps: int, m: dict) -> str:
    # A script may run more steps than algorithm.steps plans; "step 5/2" would read like a bug.
    done = f"{step}/{steps}" if step <= steps else f"{step}"
    # A batch skipped for NaN rewards has no reward/mean (metrics.jsonl keeps finite numbers only).
    return (f"step {done}  reward {m.get('reward/mean', float('nan')):.3f}  acc {m['reward/accuracy']:.3f}  "
            f"kl {m.get('losses/kl', 0.0):.4f}  len {m['charts/response_tokens']:.1f}  {m['perf/step_s']:.1f} s")


def rollout_figures(rewards: torch.Tensor, scores: list[dict], samples: list) -> dict:
    """A step's rollout figures, shared by the GRPO and PPO loops: reward (over the finite rewards: a batch the
    guard skips still logs), the verifier's accuracy and answer rate, response length and truncation."""
    finite = rewards[torch.isfinite(rewards)]
    return {
        "reward/mean": finite.mean().item(),
        "reward/std": finite.std().item(),
        "reward/accuracy": sum(s["correct"] for s in scores) / len(scores),
        "reward/answered": sum(s["answered"] for s in scores) / len(scores),
        "charts/response_tokens": sum(len(s.response_ids) for s in samples) / len(samples),
        "charts/truncated_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
    }


class GRPOLoop:
    """The actors of one run and the GRPO step over them."""

    def __init__(self, cfg: RunConfig, model_dir: str, tokenizer, rollout: list, rm_dir: str | None,
                 reward_fn=None):
        self.cfg, self.tokenizer, self.rollout = cfg, tokenizer, rollout
        self.timeout = cfg.call_timeout_s
        self.reward = actors.make_reward_workers(cfg, rm_dir, reward_fn)
        # Only a custom reward function reads the prompts' source records; other runs do not ship them each step.
        self.send_records = bool(cfg.reward.components.get("custom"))
        self.auditor = make_teacher(cfg.label) if cfg.reward.audit_every else None
        t, a = cfg.trainer, cfg.algorithm
        self.trainer = TrainerGroup(model_dir, {
            "zero_stage": t.zero_stage, "lr": t.lr, "lr_warmup_steps": t.lr_warmup_steps,
            "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm,
            "micro_batch_size": t.micro_batch_size, "threads": t.threads, "seed": cfg.seed,
            "bf16": t.bf16, "gradient_checkpointing": t.gradient_checkpointing, "zero_options": t.zero_options(),
            "clip_low": a.clip_low, "clip_high": a.clip_high, "kl_coef": a.kl_coef, "kl_estimator": a.kl_estimator,
            "entropy_coef": a.entropy_coef, "epochs": a.ppo_epochs, "tis_cap": a.tis_cap,
            "mini_batches": t.mini_batches_per_step, "kl_in_reward": a.kl_in_reward,
            "temperature": cfg.rollout.temperature, "timeout_s": self.timeout,
            "niceness": ASYNC_TRAINER_NICENESS if cfg.rollout.asynchronous else 0,
            "lora": cfg.model.lora.model_dump() if cfg.model.lora else None,  # rlhf/base/lora.py
        }, t.num_ranks, self.timeout, resources=cluster.role_resources(cfg, "trainer"),
            strategy=cfg.cluster.trainer_strategy, placement_timeout_s=cfg.cluster.placement_timeout_s)
        self.version = 0  # weights version the rollout workers hold; bumped by every trainer update
        self._syncing: list = []  # weight-sync calls submitted and not yet waited for (asynchronous rollout)
        self._weights = None  # the object ref of the weights being synced, while a sync is in progress
        rollout.restore = self._restore_rollout
        self.guard = BatchGuard(cfg.max_bad_batches)  # batches skipped for NaN/inf rewards, losses, gradients

    def launch(self, rows: list[PromptRow]) -> LaunchedRollout:
        """Start generating ``rows``' samples from the weights the rollout workers will hold when they get to it:
        those of the latest sync submitted (``self.version``), since an actor runs its calls in submission order."""
        r = self.cfg.rollout
        prompts = [think.with_switch(row.prompt, self.cfg.think.mode) for row in rows]  # as generate() does
        calls = actors.launch_generate(self.rollout, prompts, r.samples_per_prompt,
                                       r.max_new_tokens, r.temperature, False, self.version)
        return LaunchedRollout(rows, self.version, calls)

    def step(self, step: int, rows: list[PromptRow], launched: LaunchedRollout | None = None) -> dict:
        """One RL step on ``rows``. ``launched``: their generation, already started by ``launch`` (asynchronous
        rollout starts it while earlier batches train, from older weights); None generates them now."""
        cfg, n = self.cfg, self.cfg.rollout.samples_per_prompt
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        restarts = self.restarts

        samples = self.collect(launched) if launched else self.generate([r.prompt for r in rows], n, greedy=False)
        generated_by = launched.version if launched else self.version  # weights version that sampled the batch
        timings["perf/generate_s"] = time.perf_counter() - t0  # asynchronous: only the wait the overlap left

        t = time.perf_counter()
        scores = self.score(rows, samples)
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
        timings["perf/score_s"] = time.perf_counter() - t
        fault = reward_fault([r.prompt for r in rows for _ in range(n)], scores)

        a, shaping = cfg.algorithm, {}
        if a.overlong_buffer:
            penalty = overlong_penalty(torch.tensor([len(s.response_ids) for s in samples]),
                                       cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_penalty)
            rewards = rewards + penalty
            shaping["reward/overlong_penalty"] = penalty.mean().item()
        # Dynamic sampling trains on the groups that carry signal, in a row count the trainer ranks can split.
        train_samples, train_rewards = samples, rewards
        if a.dynamic_sampling:
            keep = informative_groups(rewards, n, cfg.trainer.num_ranks * cfg.trainer.mini_batches_per_step)
            train_samples = [s for s, kept in zip(samples, keep.tolist()) if kept]
            train_rewards = rewards[keep]
            shaping["reward/dropped_groups"] = (len(samples) - len(train_samples)) // n

        # Updates the trainer's weights have had since they generated this batch: what the update is off-policy by.
        staleness = self.version - generated_by
        train_metrics = {}
        timings["perf/sync_s"] = 0.0
        # Empty only when dynamic sampling found no group with signal: no update, no sync. A batch with a NaN or
        # infinite reward is not trained on at all; one whose loss or gradient is not finite gets no update.
        if train_samples and fault is None:
            advantages = ADVANTAGE_ESTIMATORS[a.advantage](train_rewards, n, response_mask(train_samples))
            batch = make_train_batch(train_samples, advantages, self.tokenizer.pad_token_id, a.loss_aggregation,
                                     cfg.rollout.max_new_tokens, cfg.trainer.mini_batches_per_step)
            train_metrics = self.trainer.train_step(batch)
            fault = update_fault(train_metrics)
            if fault is None:
                t = time.perf_counter()
                self.sync_weights()
                timings["perf/sync_s"] = time.perf_counter() - t
        self.guard.record(fault)
        timings["perf/step_s"] = time.perf_counter() - t0

        audit = {}
        if self.auditor is not None and step % cfg.reward.audit_every == 0:
            audit = distill.audit(self.auditor, rows, samples, scores, cfg.reward)
        grouped = rewards.reshape(-1, n)
        per_bin = difficulty_metrics([r.difficulty for r in rows for _ in range(n)], samples,
                                     [s["correct"] > 0.5 for s in scores], self.count_tokens)
        if "adaptive" in scores[0]:
            shaping["reward/adaptive"] = sum(s["adaptive"] for s in scores) / len(scores)
        return {
            "step": step,
            **rollout_figures(rewards, scores, samples),
            "reward/zero_signal_groups": (grouped.max(1).values == grouped.min(1).values).float().mean().item(),
            "charts/weights_version": self.version,
            **per_bin,
            "charts/rollout_weights_version": generated_by,
            "perf/staleness": staleness,
            "faults/restarts": self.restarts - restarts,
            "faults/skipped_batches": self.guard.skipped,
            **shaping,
            **train_metrics,
            **audit,
            **timings,
        }

    @property
    def restarts(self) -> int:
        """Rollout and reward workers restarted after dying, over the loop's life."""
        return self.rollout.restarts + self.reward.restarts

    def generate(self, prompts: list[str], n: int, greedy: bool) -> list:
        r = self.cfg.rollout
        max_new = self.cfg.eval.max_new_tokens if greedy else r.max_new_tokens
        # The think switch goes on the policy's prompts only; rewards and the teacher see the plain prompt.
        prompts = [think.with_switch(p, self.cfg.think.mode) for p in prompts]
        return actors.generate(self.rollout, prompts, n, max_new, r.temperature, greedy, self.version, self.timeout)

    def count_tokens(self, text: str) -> int:
        """Length of a piece of text (e.g. the reasoning) in the policy's tokens."""
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def score(self, rows: list[PromptRow], samples: list) -> list[dict]:
        n = len(samples) // len(rows)
        prompts = [r.prompt for r in rows for _ in range(n)]
        refs = [r.answer for r in rows for _ in range(n)]
        texts = [s.text for s in samples]
        parts = len(self.reward)
        records = actors.shards([r.as_dict() for r in rows for _ in range(n)], parts) if self.send_records \
            else [None] * parts
        levels = actors.shards([r.difficulty for r in rows for _ in range(n)], parts)
        args = list(zip(actors.shards(prompts, parts), actors.shards(texts, parts), actors.shards(refs, parts),
                        records, levels))
        return [s for part in self.reward.call("score", args, "reward score") for s in part]

    def collect(self, launched: LaunchedRollout) -> list:
        """The samples of a launched generation (waiting for them), after any weight sync still in flight. A
        worker that died meanwhile stops the run (WorkerDiedError): these calls were issued outside the pool."""
        refs = self._syncing + launched.calls
        names = [f"rollout worker {i}" for i in range(len(self.rollout))]
        results = get_all(refs, [names[i % len(names)] for i in range(len(refs))],
                          "weight sync and rollout generate", self.timeout)
        parts, self._syncing, self._weights = results[len(self._syncing):], [], None
        return [sample for part in parts for sample in part]

    def sync_weights(self, version: int | None = None) -> None:
        """Trainer rank 0's full weights go to every rollout worker via the object store, tagged with a version
        (the next one, or ``version`` when resuming).

        Asynchronous rollout does not wait here: the workers are still generating the next batch, and load the new
        weights after it (in call order); ``collect`` and ``evaluate`` wait for the sync before going on."""
        self.version = self.version + 1 if version is None else version
        self._weights = self.trainer.full_state_dict_ref()
        if self.cfg.rollout.asynchronous:
            self._syncing += [w.load_weights.remote(self._weights, self.version) for w in self.rollout.workers]
            return
        try:
            self.rollout.call("load_weights", [(self._weights, self.version)] * len(self.rollout), "weight sync")
        finally:
            self._weights = None  # rank 0 can give them again; holding a full copy in the object store costs memory

    def _restore_rollout(self, worker) -> None:
        """A restarted rollout worker starts from the initial policy: give it the current weights and version, from
        the sync in progress or else from trainer rank 0 (which holds exactly them between syncs)."""
        if self.version == 0:
            return
        weights = self._weights if self._weights is not None else self.trainer.full_state_dict_ref()
        get_all([worker.load_weights.remote(weights, self.version)], ["restarted rollout worker"], "weight restore",
                self.timeout)

    def _finish_sync(self) -> None:
        if self._syncing:
            get_all(self._syncing, [f"rollout worker {i}" for i in range(len(self._syncing))], "weight sync",
                    self.timeout)
            self._syncing, self._weights = [], None

    def evaluate(self, rows: list[PromptRow], log=print) -> dict:
        """Greedy answers to the held-out prompts, checked by the reward workers' verifier (only: the figures mean
        the same whatever RL is rewarded by, and a custom reward function never sees held-out prompts)."""
        # Behind any in-flight generation and weight sync: the figures are for the weights after every update so far.
        self._finish_sync()

        def verify(texts: list[str], refs: list[str]) -> list[dict]:
            args = list(zip(actors.shards(texts, len(self.reward)), actors.shards(refs, len(self.reward))))
            return [v for part in self.reward.call("verify", args, "reward verify") for v in part]

        return evaluate_policy(rows, lambda prompts: self.generate(prompts, 1, greedy=True), verify,
                               self.cfg.eval.batch_size, log, self.count_tokens)

    def save_state(self, path: Path) -> list:
        """Write the policy (``path/policy``, Hugging Face format) and the trainer ranks' state (``path/trainer``);
        returns the rollout workers' RNG states, for the driver to store beside its own."""
        self.trainer.save_pretrained(str(path / "policy"))
        self.trainer.save_state(str(path / "trainer"))
        return self.rollout.call("rng_state", [()] * len(self.rollout), "rollout rng_state")

    def load_state(self, path: Path, rollout_rng: list, version: int, guard: dict) -> None:
        """Back to a checkpoint written by ``save_state``: trainer state, the workers' RNGs, the policy's weights
        (sent to the rollout workers with the checkpoint's version) and the guard's counts."""
        if len(rollout_rng) != len(self.rollout):
            raise ValueError(f"the checkpoint has {len(rollout_rng)} rollout worker RNG states for "
                             f"{len(self.rollout)} workers")
        self.trainer.load_state(str(path / "trainer"))
        self.rollout.call("set_rng_state", [(state,) for state in rollout_rng], "rollout set_rng_state")
        self.sync_weights(version)
        self.guard.load_state(guard)

    def shutdown(self) -> None:
        self.trainer.shutdown()
        self.reward.shutdown()
