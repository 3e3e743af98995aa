"""Held-out evaluation figures: accuracy, response length and thinking, overall and per difficulty bin.

The same per-bin figures are logged during RL (``difficulty/<bin>/*`` in metrics.jsonl), so the length of the
policy's reasoning can be followed against difficulty as it trains.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

from rlhf.base import think
from rlhf.base.config import RunConfig
from rlhf.base.data import PromptRow
from rlhf.base.progress import Progress
from rlhf.base.samples import Sample

# (correct, response tokens, thought: has a non-empty think block, reasoning tokens)
Item = tuple[bool, int, bool, int]

def evaluate_policy(rows: list[PromptRow], generate: Callable[[list[str]], list[Sample]],
                    verify: Callable[[list[str], list[str]], list[dict]], batch_size: int,
                    log: Callable[[str], None] = print, count_tokens: Callable[[str], int] | None = None) -> dict:
    """Greedy answers to the held-out ``rows`` in batches of ``batch_size`` (``generate``: one sample per prompt),
    checked by ``verify`` (texts, references) -> verdicts; the figures of ``score_eval``. Shared by the run's
    actors and ``distilrl eval``, so a checkpoint scores the same either way."""
    samples: list[Sample] = []
    with Progress(len(rows), "eval", "prompt", log) as progress:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            samples += generate([r.prompt for r in batch])
            progress.update(len(batch))
    verdicts = verify([s.text for s in samples], [r.answer for r in rows])
    return score_eval(rows, samples, verdicts, count_tokens)


def evaluate_checkpoint(cfg: RunConfig, checkpoint: str, log: Callable[[str], None] = print) -> dict:
    """``evaluate_policy`` on a saved policy, in this process (no Ray): the held-out prompts of ``cfg.task``
    (rendered with the checkpoint's tokenizer, with the think switch ``think.mode`` asks for), greedy answers of up
    to ``eval.max_new_tokens`` tokens, the task's verifier. What ``distilrl eval`` prints."""
    from reward.verifiers import make_verifier, verdict_figures
    from rlhf.base.data import load_rows
    from rollout.worker import RolloutWorker

    policy = RolloutWorker(checkpoint, cfg.rollout, cfg.seed)
    _, rows = load_rows(cfg.task, cfg.seed, tokenizer=policy.tokenizer)
    verifier = make_verifier(cfg.task.verifier, cfg.task.answer_regex)
    log(f"evaluating {checkpoint} on {len(rows)} held-out prompts")

    def generate(prompts: list[str]) -> list[Sample]:
        prompts = [think.with_switch(p, cfg.think.mode) for p in prompts]
        return policy.generate(prompts, 1, cfg.eval.max_new_tokens, 1.0, True, 0)

    def count_tokens(text: str) -> int:
        return len(policy.tokenizer(text, add_special_tokens=False).input_ids)

    return evaluate_policy(rows, generate, lambda texts, refs: verdict_figures(verifier, texts, refs),
                           cfg.eval.batch_size, log, count_tokens)


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
