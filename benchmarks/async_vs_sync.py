"""The quickstart RL run three times from the same warm-up student: synchronous, one-step-off asynchronous
rollout, and fully asynchronous with partial rollouts.

    python benchmarks/async_vs_sync.py [--config configs/quickstart_verifier.yaml] [--out runs/async_vs_sync]
                                       [--warmup-dir DIR] [--rollout-threads N] [--partial-staleness K]
                                       [--modes sync,async,partial] [key=value ...]

The third run (``partial``) is ``rollout.partial_rollouts=true`` with ``rollout.max_staleness=K`` (default 2):
K batches launched ahead, new weights installed between decoding steps, tokens older than K updates masked out
of the loss (rollout/partial.py). Its speed-up is reported against the one-step-off run.

First the config's warm-up (or a warmed-up student from ``--warmup-dir``, e.g. an earlier run's ``warmup/``), then
two runs from that same student, each eval -> RL -> eval with the same seeds, steps and batch sizes: synchronous
(generate, score, update, sync, in turn), then with ``rollout.asynchronous=true`` (max_staleness 1), where the
rollout workers generate batch k+1 while the trainer updates on batch k. Both runs use truncated importance sampling (``algorithm.tis_cap``, 2 unless overridden), so they
optimise the same objective; in the synchronous run it only corrects the engines' numerical mismatch.

The overlap only pays if generation and training run on different cores at the same time, so the rollout workers
get the cores the trainer ranks leave (``--rollout-threads``, by default max(1, cores - trainer.num_ranks x
trainer.threads)), in both runs: the only difference between them is the schedule. (On a loaded 2-core machine,
2 rollout threads instead of 1 made the synchronous run's generation several times slower, not faster.) Steps per second are RL steps over the RL stage's wall time (warm-up
and evaluation excluded). Prints a table, then one JSON object: steps/s and final held-out accuracy of both, the
speed-up and the accuracy difference.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch

from rlhf.cli import _quiet_libraries
from rlhf.core.config.run_config import load_config
from rlhf.api import run
from rlhf.stages.run_dir import build_policy
from rlhf.core.models.build import save_student
from rlhf.stages.warmup import run_warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart_verifier.yaml")
    parser.add_argument("--out", default="runs/async_vs_sync")
    parser.add_argument("--warmup-dir", default=None, help="start both runs from this warmed-up student")
    parser.add_argument("--rollout-threads", type=int, default=None,
                        help="torch threads per rollout worker in both runs (default: the cores the trainer ranks "
                             "leave, at least 1)")
    parser.add_argument("--partial-staleness", type=int, default=2,
                        help="rollout.max_staleness of the partial-rollout run (batches ahead; token age bound)")
    parser.add_argument("--modes", default="sync,async,partial", help="which runs, comma-separated")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, applied to every run")
    args = parser.parse_args()
    _quiet_libraries()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    common = ["algorithm.tis_cap=2.0", *args.overrides, "reward.audit_every=0"]

    warmup_dir = args.warmup_dir
    if warmup_dir is None:
        # As rlhf.Trainer does it: seeded, in this process, before any actor starts.
        cfg = load_config(args.config, common)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        student, tokenizer = build_policy(cfg, log=lambda line: print(f"[warmup] {line}", flush=True))
        run_warmup(student, tokenizer, cfg.warmup, cfg.seed, lambda line: print(f"[warmup] {line}", flush=True))
        warmup_dir = str(out / "warmup")
        save_student(student, tokenizer, warmup_dir)
    t = load_config(args.config, common).trainer
    threads = args.rollout_threads or max(1, (os.cpu_count() or 1) - t.num_ranks * t.threads)
    start = [*common, "stages=[rl,eval]", f"model.model_name_or_path={warmup_dir}", f"rollout.threads={threads}"]

    modes = {"sync": ["rollout.asynchronous=false"],
             "async": ["rollout.asynchronous=true", "rollout.max_staleness=1"],
             "partial": ["rollout.asynchronous=true", "rollout.partial_rollouts=true",
                         f"rollout.max_staleness={args.partial_staleness}"]}
    chosen = [m for m in args.modes.split(",") if m]
    if unknown := [m for m in chosen if m not in modes]:
        raise SystemExit(f"error: --modes: unknown {unknown}; choose from {sorted(modes)}")

    def figures(summary: dict, cfg) -> dict:
        return {"steps_per_s": round(summary["steps"] / summary["stage_s"]["rl"], 4),
                "rl_s": summary["stage_s"]["rl"],
                "accuracy_before": summary["eval_before"]["accuracy"],
                "accuracy_after": summary["eval_after"]["accuracy"],
                "rollout_threads": cfg.rollout.threads}

    result: dict = {"cores": os.cpu_count()}
    for mode in chosen:
        cfg = load_config(args.config, [*start, f"output_dir={out / mode}", *modes[mode]])
        summary = run(cfg, log=lambda line, m=mode: print(f"[{m}] {line}", flush=True)).summary
        result[mode], result["steps"], result["rollout_rows_per_step"] = figures(summary, cfg), summary["steps"], cfg.rollout_rows
    for mode, base in (("async", "sync"), ("partial", "async"), ("partial", "sync")):
        if mode in result and base in result:
            result[f"speedup_{mode}_vs_{base}"] = round(result[mode]["steps_per_s"] / result[base]["steps_per_s"], 3)
            result[f"accuracy_diff_{mode}_vs_{base}"] = round(
                result[mode]["accuracy_after"] - result[base]["accuracy_after"], 4)
    print(f"{'mode':<8}{'rollout threads':>16}{'RL s':>8}{'steps/s':>9}{'acc before':>12}{'acc after':>11}")
    for mode in chosen:
        f = result[mode]
        print(f"{mode:<8}{f['rollout_threads']:>16}{f['rl_s']:>8.1f}{f['steps_per_s']:>9.3f}"
              f"{f['accuracy_before']:>12.3f}{f['accuracy_after']:>11.3f}")
    print(", ".join(f"{k} {v}" for k, v in result.items() if k.startswith(("speedup", "accuracy_diff")))
          + f" ({result['steps']} steps of {result['rollout_rows_per_step']} rollout rows, {result['cores']} cores)")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
