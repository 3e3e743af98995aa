"""The real-model recipe's figures (issue 31), read from finished runs of ``configs/smollm2_distil.yaml``: held-out
accuracy of the base model, the SFT student, RL with the distilled RM, RL with the verifier (the oracle arm) and the
adaptive-thinking variant, each with its standard error; the gains; the wall-clock; the issue's checks as booleans.

    python benchmarks/real_pipeline.py --rm runs/smollm2_distil --oracle runs/smollm2_oracle \\
        [--adaptive runs/smollm2_adaptive] [--base runs/smollm2_base] [--plot learning_curve.png] \\
        [--paired SFT.json RL.json [ORACLE.json]]

Each argument is a run directory with its summary.json (the commands are in the config's header). ``--base`` is a
run with ``stages=[eval]`` on the base model. The SFT student's accuracy is the RM run's ``eval_before`` (its
evaluation before the first RL step). Standard errors are those of a proportion over the held-out problems; a
gain's is that of the difference of two independent proportions (conservative: the same problems are asked twice).
``--paired`` takes ``distilrl eval CHECKPOINT --show 400`` outputs (every answer with its verdict) of the SFT
student, the RL policy with the RM (and the oracle arm's): a gain's paired standard error, over the same problems.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported by a test
from accuracy_stats import paired_difference, se  # noqa: E402


def gain(before: dict, after: dict) -> dict:
    """after - before in accuracy points, with the standard error of the difference."""
    diff = after["accuracy"] - before["accuracy"]
    err = math.hypot(se(before["accuracy"], before["n"]), se(after["accuracy"], after["n"]))
    return {"points": round(100 * diff, 1), "se_points": round(100 * err, 1),
            "beyond_2se": diff > 2 * err}


def paired_gain(before: Path, after: Path) -> dict:
    """The gain over the same problems, from two ``distilrl eval --show N`` outputs: its paired standard error
    (of the mean per-problem difference) and how many problems each side alone got right."""
    a, b = (json.loads(Path(p).read_text())["answers"] for p in (before, after))
    if [x["prompt"] for x in a] != [x["prompt"] for x in b]:
        raise SystemExit(f"error: {before} and {after} answered different problems: evaluate both on the same set")
    d = paired_difference([x["correct"] for x in a], [y["correct"] for y in b])
    return {"points": d["points"], "paired_se_points": d["se_points"], "beyond_2se": d["points"] > 2 * d["se_points"],
            "n": d["n"], "only_after_right": d["only_other_right"], "only_before_right": d["only_base_right"]}


def figures(evaluation: dict) -> dict:
    """Accuracy with its standard error, tokens, per difficulty."""
    out = {"accuracy": evaluation["accuracy"], "se": round(se(evaluation["accuracy"], evaluation["n"]), 4),
           "n": evaluation["n"], "mean_response_tokens": evaluation.get("mean_response_tokens")}
    out["by_difficulty"] = {level: {"accuracy": f["accuracy"], "se": round(se(f["accuracy"], f["n"]), 4),
                                    "mean_response_tokens": f.get("mean_response_tokens"), "n": f["n"]}
                            for level, f in sorted((evaluation.get("by_difficulty") or {}).items())}
    return out


def summary(run: Path) -> dict:
    path = run / "summary.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: finish that run first (commands in configs/smollm2_distil.yaml)")
    return json.loads(path.read_text())


def adaptive_check(rm_after: dict, adaptive_after: dict) -> dict:
    """The adaptive variant against RL with the RM alone: easiest-level tokens cut (>= 30%) at hardest-level
    accuracy within 2 points."""
    levels = sorted(rm_after.get("by_difficulty") or {}, key=float)
    easy, hard = levels[0], levels[-1]
    a, b = rm_after["by_difficulty"], adaptive_after["by_difficulty"]
    cut = 1 - b[easy]["mean_response_tokens"] / a[easy]["mean_response_tokens"]
    hard_diff = 100 * (b[hard]["accuracy"] - a[hard]["accuracy"])
    return {"easiest_level": easy, "easiest_tokens_rm": a[easy]["mean_response_tokens"],
            "easiest_tokens_adaptive": b[easy]["mean_response_tokens"], "easiest_tokens_cut": round(cut, 3),
            "hardest_level": hard, "hardest_accuracy_diff_points": round(hard_diff, 1),
            "ok": cut >= 0.30 and abs(hard_diff) <= 2.0}


def rollout_accuracy(run: Path, window: int = 8) -> tuple[list[int], list[float]]:
    """The verifier's accuracy on each RL step's rollouts (temperature 1), as a trailing mean over ``window`` steps."""
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = [m["reward/accuracy"] for m in steps]
    return [m["step"] for m in steps], [sum(acc[max(0, i - window + 1):i + 1]) / len(acc[max(0, i - window + 1):i + 1])
                                        for i in range(len(acc))]


def plot(runs: dict[str, Path], held_out: dict[str, dict], path: Path) -> None:
    """Left: each arm's rollout accuracy over the RL steps; right: held-out accuracy with 1 standard error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    for name, run in runs.items():
        steps, acc = rollout_accuracy(run)
        left.plot(steps, [100 * a for a in acc], label=name)
    left.set(xlabel="RL step", ylabel="rollout accuracy, % (8-step mean)", title="During RL (64 samples a step)")
    left.grid(alpha=0.3)
    left.legend()
    names = list(held_out)
    right.bar(names, [100 * f["accuracy"] for f in held_out.values()],
              yerr=[100 * f["se"] for f in held_out.values()], capsize=4, color="tab:gray")
    low = min(100 * f["accuracy"] for f in held_out.values())
    right.set(ylim=(max(0, low - 15), None), ylabel=f"held-out accuracy, % ({next(iter(held_out.values()))['n']})",
              title="Held out, greedy")
    right.tick_params(axis="x", labelrotation=20)
    fig.suptitle("SmolLM2-135M-Instruct, arithmetic in words, 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rm", type=Path, required=True, help="the run of configs/smollm2_distil.yaml")
    parser.add_argument("--oracle", type=Path, required=True, help="the same RL rewarded by the verifier")
    parser.add_argument("--adaptive", type=Path, help="the RM plus the adaptive-thinking component")
    parser.add_argument("--base", type=Path, help="stages=[eval] on the base model")
    parser.add_argument("--plot", type=Path, help="write the learning curves here (PNG)")
    parser.add_argument("--paired", type=Path, nargs="+", metavar="EVAL_JSON",
                        help="distilrl eval --show N outputs: the SFT student, the RM arm's policy[, the oracle's]")
    args = parser.parse_args(argv)
    rm, oracle = summary(args.rm), summary(args.oracle)
    out: dict = {"accuracy": {}}
    if args.base:
        out["accuracy"]["base"] = figures(summary(args.base)["eval_after"])
    out["accuracy"]["sft"] = figures(rm["eval_before"])
    out["accuracy"]["rl_rm"] = figures(rm["eval_after"])
    out["accuracy"]["rl_verifier"] = figures(oracle["eval_after"])
    out["gain_rm"] = gain(rm["eval_before"], rm["eval_after"])
    out["gain_verifier"] = gain(oracle["eval_before"], oracle["eval_after"])
    ratio = out["gain_rm"]["points"] / out["gain_verifier"]["points"] if out["gain_verifier"]["points"] > 0 else None
    out["gain_ratio_rm_to_verifier"] = None if ratio is None else round(ratio, 2)
    out["wall_s"] = {"rm": rm["wall_s"], "verifier": oracle["wall_s"]}
    out["stage_s"] = {"rm": rm.get("stage_s"), "verifier": oracle.get("stage_s")}
    if args.paired:
        out["gain_rm"]["paired"] = paired_gain(args.paired[0], args.paired[1])
        if len(args.paired) > 2:
            out["gain_verifier"]["paired"] = paired_gain(args.paired[0], args.paired[2])
    beyond = (out["gain_rm"].get("paired") or out["gain_rm"])["beyond_2se"]
    out["checks"] = {"pipeline_within_60_min": rm["wall_s"] <= 3600,
                     "rm_gain_at_least_5_points_beyond_2se": out["gain_rm"]["points"] >= 5 and beyond,
                     "rm_gain_at_least_0.8x_verifier": ratio is not None and ratio >= 0.8}
    curves = {"RL, distilled RM": args.rm, "RL, verifier": args.oracle}
    if args.adaptive:
        adaptive = summary(args.adaptive)
        out["accuracy"]["rl_adaptive"] = figures(adaptive["eval_after"])
        out["wall_s"]["adaptive"] = adaptive["wall_s"]
        out["adaptive"] = adaptive_check(rm["eval_after"], adaptive["eval_after"])
        out["checks"]["adaptive_cuts_easiest_tokens_30pct_at_hardest_within_2"] = out["adaptive"]["ok"]
        curves["RL, RM + adaptive"] = args.adaptive
    if args.plot:
        labels = {"base": "base", "sft": "SFT", "rl_rm": "RL, RM", "rl_verifier": "RL, verifier",
                  "rl_adaptive": "RL, adaptive"}
        plot(curves, {labels[k]: f for k, f in out["accuracy"].items()}, args.plot)
    print("| | held-out accuracy | mean tokens |")
    print("|---|---|---|")
    for name, f in out["accuracy"].items():
        print(f"| {name} | {100 * f['accuracy']:.1f} +- {100 * f['se']:.1f} | {f['mean_response_tokens']:.1f} |")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
