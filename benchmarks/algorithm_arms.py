"""GRPO, GSPO and CISPO with the distilled RM, and DPO on the teacher's pairs, all from one quickstart warm-up.

    python benchmarks/algorithm_arms.py [--config configs/quickstart.yaml] [--out runs/algorithm_arms]
                                        [--steps N] [--arms grpo,gspo,cispo,dpo] [--base DIR] [key=value ...]

Phase 0 (shared, ``OUT/base``): the config's warm-up, the teacher labelling student samples, the distilled RM
trained on those labels. Then, each from phase 0's warm-up student, with the same seeds:

    grpo   the quickstart's own RL: GRPO (``policy_loss: vanilla``) rewarded by the distilled RM, ``--steps`` steps
    gspo   the same with ``policy_loss: gspo`` (one length-normalised ratio per sequence, ``seq-mean``, the
           paper's clip 3e-4 / 4e-4)
    cispo  the same with ``policy_loss: cispo`` (the clipped ratio as a constant weight; clip_low 1, clip_high 0.28)
    dpo    ``stages: [dpo, eval]`` on phase 0's teacher pairs (``labels/``; the ``dpo`` section: one epoch by
           default), no RM and no rollouts

With one optimizer step per rollout batch (the quickstart: ``ppo_epochs 1``, ``trainer.mini_batches_per_step 1``)
the ratio of every token is exactly 1 when the loss is taken, so CISPO's gradient is GRPO's and GSPO differs from it
only by averaging each response's tokens first (``seq-mean``); the losses part only with more updates per batch
(``trainer.mini_batches_per_step=4`` as an override).

Per arm: held-out accuracy before and after (``summary.json``), its standard error sqrt(p(1-p)/n), mean held-out
response tokens, the seconds of the arm's training stage (``stage_s``: rl or dpo) and from the warm-up on (label +
train_rm + rl, or label + dpo). Differences from GRPO and from the warm-up are paired, over the same held-out
problems: each final policy (and the warm-up) is evaluated again in this process with every answer kept (as
``distilrl eval --show N``), and the re-evaluation's accuracy is checked against the run's. ``--base DIR`` reuses
an earlier phase 0 (its warmup/, labels/, reward_model/). Prints a table, then one JSON object (also OUT/result.json).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from rlhf.api import run
from rlhf.cli import _quiet_libraries
from rlhf.core.config.run_config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported by a test
from accuracy_stats import difference, se  # noqa: E402

ARMS = {
    "grpo": ["algorithm.policy_loss=vanilla"],
    "gspo": ["algorithm.policy_loss=gspo", "algorithm.loss_aggregation=seq-mean", "algorithm.clip_low=3e-4",
             "algorithm.clip_high=4e-4"],
    "cispo": ["algorithm.policy_loss=cispo", "algorithm.clip_low=1.0", "algorithm.clip_high=0.28"],
    "dpo": [],
}


def arm_overrides(name: str, base: Path, out: Path, steps: int | None) -> list[str]:
    """The config overrides of one arm, from phase 0's warm-up student (and RM, for the RL arms)."""
    common = [f"output_dir={out / name}", f"model.model_name_or_path={base / 'warmup'}"]
    if name == "dpo":  # eval checks answers with the verifier; no RM is loaded
        return [*common, "stages=[dpo,eval]", "reward.components={verifier: 1.0}", "reward.audit_every=0"]
    steps_key = [f"algorithm.steps={steps}"] if steps is not None else []
    return [*common, "stages=[rl,eval]", f"reward_model.path={base / 'reward_model'}", "reward.components={rm: 1.0}",
            *steps_key, *ARMS[name]]


def policy_dir(out: Path, name: str) -> Path:
    """Where an arm's final policy is: ``dpo/`` for the dpo stage, ``policy/`` after RL."""
    return out / name / ("dpo" if name == "dpo" else "policy")


def phase0(args, out: Path) -> tuple[Path, dict]:
    """The shared warm-up, labels and RM (or ``--base``'s); returns (its directory, its summary)."""
    if args.base:
        base = Path(args.base)
        return base, json.loads((base / "summary.json").read_text())
    base = out / "base"
    cfg = load_config(args.config, [*args.overrides, f"output_dir={base}", "stages=[warmup,label,train_rm]",
                                    "reward.components={rm: 1.0}"])
    return base, run(cfg, log=lambda line: print(f"[base] {line}", flush=True)).summary


def run_arm(args, out: Path, base: Path, name: str) -> dict:
    """One arm's run; returns its summary.json."""
    if name == "dpo":  # the dpo stage reads the teacher's pairs from its own run directory
        shutil.copytree(base / "labels", out / name / "labels")
    cfg = load_config(args.config, [*args.overrides, *arm_overrides(name, base, out, args.steps)])
    return run(cfg, log=lambda line: print(f"[{name}] {line}", flush=True)).summary


def reevaluate(args, out: Path, directory: Path, n: int) -> tuple[dict, list[bool]]:
    """The held-out evaluation of a saved policy in this process, every answer kept: (figures, verdicts)."""
    from rlhf.rl.evaluate import evaluate_checkpoint

    cfg = load_config(args.config, [*args.overrides, f"output_dir={out / 'reeval'}"])
    figures = evaluate_checkpoint(cfg, str(directory), log=lambda line: None, show=n)
    return figures, [a["correct"] for a in figures.pop("answers")]


def arm_figures(name: str, summary: dict, base_summary: dict) -> dict:
    """One arm's row: accuracies with their SE, held-out tokens, training seconds."""
    after, before = summary["eval_after"], summary.get("eval_before")
    stage = "dpo" if name == "dpo" else "rl"
    seconds = summary["stage_s"].get(stage, 0.0)
    shared = base_summary.get("stage_s", {})
    upstream = shared.get("label", 0.0) + (0.0 if name == "dpo" else shared.get("train_rm", 0.0))
    row = {"accuracy_before": before["accuracy"] if before else None,
           "accuracy_after": after["accuracy"], "se_after": round(se(after["accuracy"], after["n"]), 4),
           "n": after["n"], "heldout_tokens_after": after["mean_response_tokens"],
           "train_stage": stage, "train_s": seconds, "from_warmup_s": round(upstream + seconds, 1),
           "wall_s": summary["wall_s"], "steps": summary["dpo"]["steps"] if name == "dpo" else summary["steps"]}
    if name == "dpo":
        row.update({k: summary["dpo"].get(k) for k in ("train_pairs", "pair_accuracy_before",
                                                        "pair_accuracy_after", "reward_accuracy")})
    return row


def compare(arms: dict, warmup: dict, answers: dict[str, list[bool] | None]) -> None:
    """Adds to each arm its difference from the warm-up and from GRPO (paired where ``answers`` has both)."""
    for name, row in arms.items():
        after = {"accuracy": row["accuracy_after"], "n": row["n"]}
        row["vs_warmup"] = difference(warmup, after, answers.get("warmup"), answers.get(name))
        if "grpo" in arms and name != "grpo":
            grpo = {"accuracy": arms["grpo"]["accuracy_after"], "n": arms["grpo"]["n"]}
            row["vs_grpo"] = difference(grpo, after, answers.get("grpo"), answers.get(name))


def _signed(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{d['points']:+.1f} ({d['se_points']:.1f}{'' if d['paired'] else ', unpaired'})"


def table(result: dict) -> str:
    """The arms as a fixed-width table (accuracy after with its SE; differences in points with their SE)."""
    warmup = result["warmup"]
    lines = [f"held-out problems: {warmup['n']}; warm-up student accuracy {warmup['accuracy']:.3f} "
             f"(SE {warmup['se']:.3f}), {warmup['mean_response_tokens']} tokens",
             f"{'arm':<7}{'steps':>6}{'acc after (SE)':>17}{'vs warm-up, pts (SE)':>24}{'vs GRPO, pts (SE)':>24}"
             f"{'tokens':>8}{'train s':>9}{'from warm-up s':>16}"]
    for name, r in result["arms"].items():
        lines.append(f"{name:<7}{r['steps']:>6}{r['accuracy_after']:>10.3f} ({r['se_after']:.3f})"
                     f"{_signed(r['vs_warmup']):>24}{_signed(r.get('vs_grpo')):>24}"
                     f"{r['heldout_tokens_after']:>8.1f}{r['train_s']:>9.1f}{r['from_warmup_s']:>16.1f}")
    return "\n".join(lines)


def warmup_figures(base_summary: dict, arms: list[str], summaries: dict, reevaluated: dict) -> dict:
    """The warm-up student's held-out figures: an RL arm's eval_before where one ran, else the re-evaluation."""
    before = next((summaries[n]["eval_before"] for n in arms if summaries[n].get("eval_before")), None)
    figures = before or reevaluated.get("warmup")
    if figures is None:
        raise ValueError("no evaluation of the warm-up student: run an RL arm or the re-evaluation")
    return {"accuracy": figures["accuracy"], "se": round(se(figures["accuracy"], figures["n"]), 4),
            "n": figures["n"], "mean_response_tokens": figures["mean_response_tokens"],
            "rm_pairwise_accuracy": base_summary.get("reward_model", {}).get("pairwise_accuracy"),
            "rm_spearman": base_summary.get("reward_model", {}).get("spearman"),
            "teacher_pairs": {k: v.get("pairwise") for k, v in base_summary.get("labels", {}).items()},
            "shared_stage_s": base_summary.get("stage_s", {})}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="runs/algorithm_arms")
    parser.add_argument("--steps", type=int, help="RL steps of every RL arm (default: the config's algorithm.steps)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--base", help="reuse this earlier phase 0 directory (warmup/, labels/, reward_model/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, applied to phase 0 and every arm")
    args = parser.parse_args(argv)
    names = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in names if a not in ARMS]:
        parser.error(f"unknown arm(s) {unknown}: choose from {list(ARMS)}")
    _quiet_libraries()
    out = Path(args.out)
    for name in [*names, "base" if not args.base else None, "reeval"]:
        if name:
            shutil.rmtree(out / name, ignore_errors=True)

    base, base_summary = phase0(args, out)
    summaries = {name: run_arm(args, out, base, name) for name in names}
    n = next(iter(summaries.values()))["eval_after"]["n"]
    reevaluated, answers = {}, {}
    for name, directory in [("warmup", base / "warmup"), *((x, policy_dir(out, x)) for x in names)]:
        reevaluated[name], answers[name] = reevaluate(args, out, directory, n)
    arms = {name: arm_figures(name, summaries[name], base_summary) for name in names}
    warmup = warmup_figures(base_summary, names, summaries, reevaluated)
    for row in arms.values():  # dpo's run evaluates once, after: before is the warm-up student
        row["accuracy_before"] = warmup["accuracy"] if row["accuracy_before"] is None else row["accuracy_before"]
    matches = {name: reevaluated[name]["accuracy"] == arms[name]["accuracy_after"] for name in names}
    matches["warmup"] = reevaluated["warmup"]["accuracy"] == warmup["accuracy"]
    paired = {k: v if matches[k] else None for k, v in answers.items()}  # a mismatch: the unpaired SE instead
    compare(arms, warmup, paired)
    result = {"config": args.config, "overrides": args.overrides, "warmup": warmup, "arms": arms,
              "reevaluation_matches_run": matches}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
