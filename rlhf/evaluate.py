"""Held-out evaluation figures: accuracy and response length, overall and per difficulty bin."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

from rlhf.config import RunConfig
from rlhf.data import PromptRow
from rlhf.progress import Progress
from rollout.engine import Sample


def evaluate_policy(rows: list[PromptRow], generate: Callable[[list[str]], list[Sample]],
                    verify: Callable[[list[str], list[str]], list[dict]], batch_size: int,
                    log: Callable[[str], None] = print) -> dict:
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
    return score_eval(rows, samples, verdicts)


def evaluate_checkpoint(cfg: RunConfig, checkpoint: str, log: Callable[[str], None] = print) -> dict:
    """``evaluate_policy`` on a saved policy, in this process (no Ray): the held-out prompts of ``cfg.task``,
    greedy answers of up to ``eval.max_new_tokens`` tokens, the reward workers' verifier. What ``distilrl eval``
    prints."""
    from reward.worker import RewardWorker
    from rlhf.data import load_rows
    from rollout.worker import RolloutWorker

    _, rows = load_rows(cfg.task, cfg.seed)
    policy = RolloutWorker(checkpoint, cfg.rollout.threads, cfg.seed)
    verifier = RewardWorker({"verifier": 1.0}, cfg.reward.correct, cfg.reward.unparseable)
    log(f"evaluating {checkpoint} on {len(rows)} held-out prompts")
    return evaluate_policy(rows, lambda prompts: policy.generate(prompts, 1, cfg.eval.max_new_tokens, 1.0, True, 0),
                           verifier.verify, cfg.eval.batch_size, log)


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
