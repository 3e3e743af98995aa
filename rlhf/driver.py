"""The central driver: warm-up, then GRPO with Ray actors, then evaluation, writing the run directory.

Before RL, optionally: label (the teacher judges student samples) -> train the distilled reward model on the
labels (DeepSpeed ranks) -> evaluate it against the teacher on held-out samples.

One RL step, as data: pick prompts -> rollout workers sample n responses each -> reward workers score them ->
group-normalised advantages -> trainer ranks update (DeepSpeed; the reference model for the KL term lives on the
ranks, beside the data it needs) -> new weights, with a version number, to the rollout workers -> metrics.
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path

import ray
import torch

from reward import distill
from rlhf import actors
from rlhf.algorithms import ADVANTAGE_ESTIMATORS
from rlhf.batch import make_train_batch
from rlhf.checkpoint import write_json_atomic
from rlhf.config import RunConfig, save_config
from rlhf.data import DatasetError, PromptRow, load_rows
from rlhf.evaluate import score_eval
from rlhf.models import build_student, build_tokenizer, load_student, save_student
from rlhf.trainer import TrainerGroup
from rlhf.warmup import run_warmup


class RunDirError(ValueError):
    pass


def run(cfg: RunConfig, log=print) -> dict:
    """Run the configured stages; returns the summary also written to ``output_dir/summary.json``."""
    start = time.perf_counter()
    out = prepare_run_dir(cfg)
    # Data first: a bad dataset row should stop the run before minutes of warm-up, not after.
    train_pool, eval_set = load_rows(cfg.task, cfg.seed)
    if len(train_pool) < cfg.rollout.prompts_per_step:
        raise DatasetError(f"only {len(train_pool)} training prompts for rollout.prompts_per_step="
                           f"{cfg.rollout.prompts_per_step}")
    log(cfg.describe_batches())
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # The student: loaded from a local directory, or built at the configured size.
    if cfg.model.model_name_or_path:
        student, tokenizer = load_student(cfg.model.model_name_or_path)
    else:
        tokenizer = build_tokenizer(cfg.model.tokenizer)
        student = build_student(cfg.model, tokenizer, cfg.seed)
    log(f"student: {type(student).__name__}, {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters")

    summary: dict = {}
    timer = StageTimer()
    if "warmup" in cfg.stages:
        with timer("warmup"):
            summary["warmup"] = run_warmup(student, tokenizer, cfg.warmup, cfg.seed, log)
    # Every actor loads the starting policy from this directory: one copy on disk, no pickled model in flight.
    start_dir = str(out / "warmup")
    save_student(student, tokenizer, start_dir)
    del student

    actors.start_ray(cfg)
    rollout, loop = [], None
    try:
        rollout = actors.make_rollout_workers(cfg, start_dir)
        rm_dir = cfg.reward_model.path
        if "label" in cfg.stages:
            with timer("label"):
                summary["labels"] = distill.label_stage(cfg, rollout, train_pool, eval_set, out, log)
        if "train_rm" in cfg.stages:
            with timer("train_rm"):
                rm_dir, summary["reward_model"] = distill.reward_model_stage(cfg, start_dir, out, log)

        loop = GRPOLoop(cfg, start_dir, tokenizer, rollout, rm_dir)
        if "eval" in cfg.stages:
            with timer("eval"):
                summary["eval_before"] = loop.evaluate(eval_set)
            log(f"eval before RL: accuracy {summary['eval_before']['accuracy']:.3f}")
        steps = cfg.algorithm.steps if "rl" in cfg.stages else 0
        order = random.Random(cfg.seed + 3)
        rl_start = time.perf_counter()
        for step in range(1, steps + 1):
            prompts = order.sample(train_pool, cfg.rollout.prompts_per_step)
            metrics = loop.step(step, prompts)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            log(progress_line(step, steps, metrics))
            if cfg.save_every and step % cfg.save_every == 0 and step < steps:
                loop.trainer.save_pretrained(str(out / "checkpoints" / f"step_{step}"))
        timer.add("rl", time.perf_counter() - rl_start)
        if "eval" in cfg.stages:
            with timer("eval"):
                summary["eval_after"] = loop.evaluate(eval_set)
            log(f"eval after RL: accuracy {summary['eval_after']['accuracy']:.3f}")
        if steps:
            loop.trainer.save_pretrained(str(out / "policy"))
        summary["steps"] = steps
    finally:
        if loop is not None:
            loop.shutdown()
        for worker in rollout:
            ray.kill(worker)
        ray.shutdown()
    summary["stage_s"] = timer.seconds
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    write_json_atomic(out / "summary.json", summary)
    log(f"wrote {out / 'summary.json'} ({summary['wall_s']:.0f} s)")
    return summary


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


def prepare_run_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    if (out / "summary.json").exists():
        raise RunDirError(f"output_dir {out} holds a finished run: choose another output_dir (or delete it)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")
    return out


def progress_line(step: int, steps: int, m: dict) -> str:
    return (f"step {step}/{steps}  reward {m['reward/mean']:.3f}  acc {m['reward/accuracy']:.3f}  "
            f"kl {m.get('losses/kl', 0.0):.4f}  len {m['charts/response_tokens']:.1f}  {m['perf/step_s']:.1f} s")


class GRPOLoop:
    """The actors of one run and the GRPO step over them."""

    def __init__(self, cfg: RunConfig, model_dir: str, tokenizer, rollout: list, rm_dir: str | None):
        self.cfg, self.tokenizer, self.rollout = cfg, tokenizer, rollout
        self.timeout = cfg.call_timeout_s
        self.reward = actors.make_reward_workers(cfg, rm_dir)
        self.auditor = distill.make_teacher(cfg.label) if cfg.reward.audit_every else None
        t, a = cfg.trainer, cfg.algorithm
        self.trainer = TrainerGroup(model_dir, {
            "zero_stage": t.zero_stage, "lr": t.lr, "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm,
            "micro_batch_size": t.micro_batch_size, "threads": t.threads, "seed": cfg.seed,
            "clip_low": a.clip_low, "clip_high": a.clip_high, "kl_coef": a.kl_coef, "kl_estimator": a.kl_estimator,
            "temperature": cfg.rollout.temperature, "timeout_s": self.timeout,
        }, t.num_ranks, self.timeout)
        self.version = 0  # weights version the rollout workers hold; bumped by every trainer update

    def step(self, step: int, rows: list[PromptRow]) -> dict:
        cfg, n = self.cfg, self.cfg.rollout.samples_per_prompt
        timings: dict[str, float] = {}
        t0 = time.perf_counter()

        samples = self.generate([r.prompt for r in rows], n, greedy=False)
        timings["perf/generate_s"] = time.perf_counter() - t0

        t = time.perf_counter()
        scores = self.score(rows, samples)
        rewards = torch.tensor([s["reward"] for s in scores])
        timings["perf/score_s"] = time.perf_counter() - t

        advantages = ADVANTAGE_ESTIMATORS[cfg.algorithm.advantage](rewards, n)
        batch = make_train_batch(samples, advantages, self.tokenizer.pad_token_id, cfg.algorithm.loss_aggregation,
                                 cfg.rollout.max_new_tokens)
        train_metrics = self.trainer.train_step(batch)

        t = time.perf_counter()
        self.sync_weights()
        timings["perf/sync_s"] = time.perf_counter() - t
        timings["perf/step_s"] = time.perf_counter() - t0

        audit = {}
        if self.auditor is not None and step % cfg.reward.audit_every == 0:
            audit = distill.audit(self.auditor, rows, samples, scores, cfg.reward)
        grouped = rewards.reshape(-1, n)
        return {
            "step": step,
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item(),
            "reward/accuracy": sum(s["correct"] for s in scores) / len(scores),
            "reward/answered": sum(s["answered"] for s in scores) / len(scores),
            "reward/zero_signal_groups": (grouped.max(1).values == grouped.min(1).values).float().mean().item(),
            "charts/response_tokens": sum(len(s.response_ids) for s in samples) / len(samples),
            "charts/truncated_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
            "charts/weights_version": self.version,
            **train_metrics,
            **audit,
            **timings,
        }

    def generate(self, prompts: list[str], n: int, greedy: bool) -> list:
        r = self.cfg.rollout
        max_new = self.cfg.eval.max_new_tokens if greedy else r.max_new_tokens
        return actors.generate(self.rollout, prompts, n, max_new, r.temperature, greedy, self.version, self.timeout)

    def score(self, rows: list[PromptRow], samples: list) -> list[dict]:
        n = len(samples) // len(rows)
        prompts = [r.prompt for r in rows for _ in range(n)]
        refs = [r.answer for r in rows for _ in range(n)]
        texts = [s.text for s in samples]
        parts = len(self.reward)
        calls = [worker.score.remote(p, t, r) for worker, p, t, r in zip(
            self.reward, actors.shards(prompts, parts), actors.shards(texts, parts), actors.shards(refs, parts))]
        return [s for part in actors.call_all(calls, "reward score", self.timeout) for s in part]

    def sync_weights(self) -> None:
        """Trainer rank 0's full weights go to every rollout worker via the object store, tagged with a version."""
        self.version += 1
        weights = self.trainer.full_state_dict_ref()
        actors.call_all([w.load_weights.remote(weights, self.version) for w in self.rollout], "weight sync",
                        self.timeout)

    def evaluate(self, rows: list[PromptRow]) -> dict:
        """Greedy answers to the held-out prompts, checked by the reward workers' verifier."""
        samples = []
        size = self.cfg.eval.batch_size
        for start in range(0, len(rows), size):
            samples += self.generate([r.prompt for r in rows[start:start + size]], 1, greedy=True)
        return score_eval(rows, samples, self.score(rows, samples))

    def shutdown(self) -> None:
        self.trainer.shutdown()
        for worker in self.reward:
            ray.kill(worker)
