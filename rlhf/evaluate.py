"""Held-out evaluation: greedy answers to problems the student never trained on, judged by the oracle."""
from __future__ import annotations

from collections import defaultdict

from rlhf.tasks.arithmetic import Problem, judge
from rollout.engine import Sample


def score_eval(problems: list[Problem], samples: list[Sample]) -> dict:
    """Accuracy and mean response length overall and per difficulty level (the number of operations)."""
    by_level: dict[int, list[tuple[bool, int]]] = defaultdict(list)
    for problem, sample in zip(problems, samples, strict=True):
        by_level[problem.level].append((judge(problem, sample.text).correct, len(sample.response_ids)))
    everything = [item for items in by_level.values() for item in items]
    result = _figures(everything)
    result["by_difficulty"] = {str(level): _figures(items) for level, items in sorted(by_level.items())}
    return result


def _figures(items: list[tuple[bool, int]]) -> dict:
    n = max(1, len(items))
    return {
        "accuracy": round(sum(c for c, _ in items) / n, 4),
        "mean_response_tokens": round(sum(t for _, t in items) / n, 2),
        "n": len(items),
    }
