"""Held-out accuracy differences with their standard errors, shared by the benchmarks that compare runs
(algorithm_arms, reward_hacking, real_pipeline): a proportion's SE, a paired difference over the same problems,
an unpaired one from two summaries."""
from __future__ import annotations

import math


def se(p: float, n: int) -> float:
    """The standard error of a proportion p over n problems."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def paired_difference(base: list[bool], other: list[bool]) -> dict:
    """other - base in accuracy points over the same problems (per-problem verdicts in the same order), with the
    standard error of the mean per-problem difference, and how many problems only one side got right."""
    if len(base) != len(other) or not base:
        raise ValueError(f"paired verdicts need the same problems: {len(base)} against {len(other)}")
    diffs = [int(b) - int(a) for a, b in zip(base, other)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return {"points": round(100 * mean, 1), "se_points": round(100 * math.sqrt(var / n), 1), "paired": True,
            "n": n, "only_other_right": diffs.count(1), "only_base_right": diffs.count(-1)}


def unpaired_difference(base: dict, other: dict) -> dict:
    """other - base from two summaries' accuracy and n alone: independent proportions (conservative when the
    problems are the same)."""
    err = math.hypot(se(base["accuracy"], base["n"]), se(other["accuracy"], other["n"]))
    return {"points": round(100 * (other["accuracy"] - base["accuracy"]), 1), "se_points": round(100 * err, 1),
            "paired": False, "n": other["n"]}


def difference(base_eval: dict, other_eval: dict, base_answers: list[bool] | None,
               other_answers: list[bool] | None) -> dict:
    """Paired where both sides' per-problem verdicts are known, else unpaired; ``beyond_2se`` either way."""
    if base_answers is not None and other_answers is not None:
        d = paired_difference(base_answers, other_answers)
    else:
        d = unpaired_difference(base_eval, other_eval)
    return {**d, "beyond_2se": abs(d["points"]) > 2 * d["se_points"]}
