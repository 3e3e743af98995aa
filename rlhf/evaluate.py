"""Held-out evaluation figures: accuracy and response length, overall and per difficulty bin."""
from __future__ import annotations

from collections import defaultdict

from rlhf.data import PromptRow
from rollout.engine import Sample


def score_eval(rows: list[PromptRow], samples: list[Sample], verdicts: list[dict]) -> dict:
    """``verdicts`` are the reward workers' results for the samples (``correct`` is 1.0 or 0.0). Per-difficulty
    figures appear when the rows carry a difficulty (the arithmetic level, or a dataset field)."""
    items = [(v["correct"] > 0.5, len(s.response_ids)) for s, v in zip(samples, verdicts, strict=True)]
    result = _figures(items)
    by_bin: dict[int, list[tuple[bool, int]]] = defaultdict(list)
    for row, item in zip(rows, items, strict=True):
        if row.difficulty is not None:
            by_bin[row.difficulty].append(item)
    if by_bin:
        result["by_difficulty"] = {str(level): _figures(group) for level, group in sorted(by_bin.items())}
    return result


def _figures(items: list[tuple[bool, int]]) -> dict:
    n = max(1, len(items))
    return {
        "accuracy": round(sum(c for c, _ in items) / n, 4),
        "mean_response_tokens": round(sum(t for _, t in items) / n, 2),
        "n": len(items),
    }
