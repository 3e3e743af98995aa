"""On-policy distillation against GRPO on the quickstart task, from one warm-up student, same steps and seeds.

    python benchmarks/onpolicy_distillation.py [--steps 30] [--eval-every 5] [--teacher-steps N] [--out DIR] [k=v ...]

First a larger teacher is warmed up (configs/arithmetic_teacher.yaml) and the student as in
configs/quickstart_verifier.yaml. Then three RL runs from that student: (a) GRPO rewarded by the verifier; (b)
on-policy distillation alone (the teacher's per-token log-ratio as the advantage, on_policy_distillation); (c)
both: GRPO over the verifier's reward plus the teacher's per-token term. Held-out accuracy (and
per difficulty) is measured every --eval-every steps. Prints a table, then one JSON object: each arm's final
accuracy, the first step at which (b) and (c) reach (a)'s final accuracy (null: not within the steps), and the
teacher's own accuracy. key=value overrides apply to every run (e.g. algorithm.steps is --steps).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from rlhf.api import Trainer, run
from rlhf.core.config.run_config import load_config
from rlhf.cli import _quiet_libraries

ARMS = {
    "a_grpo_verifier": ["reward.components={verifier: 1.0}", "algorithm.advantage=grpo"],
    "b_onpolicy": ["reward.components={teacher_kl: 1.0}", "algorithm.advantage=on_policy_distillation"],
    "c_both": ["reward.components={verifier: 1.0, teacher_kl: 0.1}", "algorithm.advantage=grpo"],
}


def arm(name: str, overrides: list[str], steps: int, every: int, log) -> list[dict]:
    """(step, held-out figures) every ``every`` steps of one RL run, from step 0."""
    cfg = load_config("configs/quickstart_verifier.yaml", overrides + [f"algorithm.steps={steps}"])
    curve = []
    with Trainer(cfg, log=lambda line: log(f"[{name}] {line}")) as trainer:
        curve.append({"step": 0, **trainer.evaluate()})
        while trainer.steps < steps:
            trainer.train(min(every, steps - trainer.steps))
            curve.append({"step": trainer.steps, **trainer.evaluate()})
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--out", default="runs/onpolicy")
    parser.add_argument("--teacher-steps", type=int, help="the teacher's warm-up steps (default: its config's)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    _quiet_libraries()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    log = lambda line: print(line, flush=True)  # noqa: E731

    teacher_steps = [f"warmup.steps={args.teacher_steps}"] if args.teacher_steps else []
    teacher = run(load_config("configs/arithmetic_teacher.yaml", [*args.overrides, f"output_dir={out / 'teacher'}",
                                                                 *teacher_steps]),
                  log=lambda line: log(f"[teacher] {line}")).summary
    run(load_config("configs/quickstart_verifier.yaml", [*args.overrides, f"output_dir={out / 'student'}",
                                                        "stages=[warmup]"]), log=lambda line: log(f"[student] {line}"))
    common = [*args.overrides, f"model.model_name_or_path={out / 'student' / 'warmup'}", "stages=[rl,eval]",
              f"reward.teacher_model_path={out / 'teacher' / 'warmup'}"]
    curves = {name: arm(name, [*common, f"output_dir={out / name}", *extra], args.steps, args.eval_every, log)
              for name, extra in ARMS.items()}

    target = curves["a_grpo_verifier"][-1]["accuracy"]
    result = {"teacher_accuracy": teacher["eval_after"]["accuracy"], "steps": args.steps,
              "accuracy_before": curves["a_grpo_verifier"][0]["accuracy"]}
    print(f"{'arm':<18}{'before':>8}{'after':>8}{'reaches (a) at step':>22}")
    for name, curve in curves.items():
        reached = next((c["step"] for c in curve if c["accuracy"] >= target), None)
        result[name] = {"accuracy_after": curve[-1]["accuracy"], "reaches_a_at_step": reached,
                        "by_difficulty_after": {k: v["accuracy"] for k, v in curve[-1].get("by_difficulty", {}).items()},
                        "curve": [(c["step"], c["accuracy"]) for c in curve]}
        print(f"{name:<18}{curve[0]['accuracy']:>8.3f}{curve[-1]['accuracy']:>8.3f}{str(reached):>22}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
