"""Held-out evaluation figures: accuracy, response length and thinking, overall and per difficulty bin.

The same per-bin figures are logged during RL (``difficulty/<bin>/*`` in metrics.jsonl), so the length of the
policy's reasoning can be followed against difficulty as it trains.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

from rlhf import think
from rlhf.data import PromptRow
from rollout.engine import Sample

# (correct, response tokens, thought: has a non-empty think block, reasoning tokens)
Item = tuple[bool, int, bool, int]


def score_eval(rows: list[PromptRow], samples: list[Sample], verdicts: list[dict],
               count_tokens: Callable[[str], int] | None = None) -> dict:
    """``verdicts`` are the reward workers' results for the samples (``correct`` is 1.0 or 0.0). Per-difficulty
    figures (``by_difficulty``: {bin: {accuracy, mean_response_tokens, think_rate, mean_reasoning_tokens, n}})
    appear when the rows carry a difficulty (the arithmetic level, or a dataset field). ``count_tokens`` measures
    reasoning text in the policy's tokens (default: characters)."""
    items = _items(samples, [v["correct"] > 0.5 for v in verdicts], count_tokens)
    result = _figures(items)
    by_bin = _by_bin([r.difficulty for r in rows], items)
    if by_bin:
        result["by_difficulty"] = {str(level): _figures(group) for level, group in by_bin.items()}
    return result


def difficulty_metrics(difficulties: list[int | None], samples: list[Sample], correct: list[bool],
                       count_tokens: Callable[[str], int] | None = None) -> dict[str, float]:
    """The per-bin figures of one RL batch as flat metrics: ``difficulty/<bin>/accuracy``, ``response_tokens``,
    ``think_rate``, ``reasoning_tokens``; plus the batch's ``charts/think_rate`` and ``charts/reasoning_tokens``."""
    items = _items(samples, correct, count_tokens)
    overall = _figures(items)
    out = {"charts/think_rate": overall["think_rate"], "charts/reasoning_tokens": overall["mean_reasoning_tokens"]}
    for level, group in _by_bin(difficulties, items).items():
        f = _figures(group)
        out.update({f"difficulty/{level}/accuracy": f["accuracy"],
                    f"difficulty/{level}/response_tokens": f["mean_response_tokens"],
                    f"difficulty/{level}/think_rate": f["think_rate"],
                    f"difficulty/{level}/reasoning_tokens": f["mean_reasoning_tokens"]})
    return out


def _items(samples: list[Sample], correct: list[bool], count_tokens: Callable[[str], int] | None) -> list[Item]:
    count = count_tokens or len
    items = []
    for sample, ok in zip(samples, correct, strict=True):
        parts = think.split_think(sample.text)
        reasoning = think.reasoning_text(sample.text)
        items.append((bool(ok), len(sample.response_ids), parts.thought, count(reasoning) if reasoning else 0))
    return items


def _by_bin(difficulties: list[int | None], items: list[Item]) -> dict[int, list[Item]]:
    by_bin: dict[int, list[Item]] = defaultdict(list)
    for difficulty, item in zip(difficulties, items, strict=True):
        if difficulty is not None:
            by_bin[difficulty].append(item)
    return dict(sorted(by_bin.items()))


def _figures(items: list[Item]) -> dict:
    n = max(1, len(items))
    return {
        "accuracy": round(sum(i[0] for i in items) / n, 4),
        "mean_response_tokens": round(sum(i[1] for i in items) / n, 2),
        "think_rate": round(sum(i[2] for i in items) / n, 4),
        "mean_reasoning_tokens": round(sum(i[3] for i in items) / n, 2),
        "n": len(items),
    }
