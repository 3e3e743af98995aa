"""Held-out evaluation figures: accuracy, response length and thinking, overall and per difficulty bin.

Thinking figures (``think_rate``, reasoning tokens) appear only where think blocks are in use: when some response
of the batch has a ``<think>`` block. Elsewhere (a MATH or GSM8K run without them) the arithmetic task's rule,
steps written before the ``#`` answer mark, would count whole responses as reasoning and report nonsense.

The same per-bin figures are logged during RL (``difficulty/<bin>/*`` in metrics.jsonl), so the length of the
policy's reasoning can be followed against difficulty as it trains.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

from rlhf.core.data import think
from rlhf.core.config.run_config import RunConfig
from rlhf.core.data.datasets import PromptRow
from rlhf.core.progress import Progress
from rlhf.core.data.samples import Sample
from rollout.multi_turn import episode_figures

# (correct, response tokens, thought: has a non-empty think block, reasoning tokens, has a think tag at all)
Item = tuple[bool, int, bool, int, bool]

def evaluate_policy(rows: list[PromptRow], generate: Callable[[list[str]], list[Sample]],
                    verify: Callable[[list[str], list[str]], list[dict]], batch_size: int,
                    log: Callable[[str], None] = print, count_tokens: Callable[[str], int] | None = None,
                    show: int = 0) -> dict:
    """Greedy answers to the held-out ``rows`` in batches of ``batch_size`` (``generate``: one sample per prompt),
    checked by ``verify`` (texts, references) -> verdicts; the figures of ``score_eval``, with the first ``show``
    answers under ``answers`` (``shown_answers``). Shared by the run's actors and ``distilrl eval``, so a checkpoint
    scores the same either way."""
    samples: list[Sample] = []
    with Progress(len(rows), "eval", "prompt", log) as progress:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            samples += generate([r.prompt for r in batch])
            progress.update(len(batch))
    verdicts = verify([s.verified_text for s in samples], [r.answer for r in rows])
    figures = score_eval(rows, samples, verdicts, count_tokens)
    if show:
        figures["answers"] = shown_answers(rows[:show], samples, verdicts)
    return figures


def shown_answers(rows: list[PromptRow], samples: list[Sample], verdicts: list[dict]) -> list[dict]:
    """One record per row (zipped with its sample and verdict): prompt, response, reference answer, correct."""
    return [{"prompt": row.prompt, "response": sample.text, "reference": row.answer,
             "correct": verdict["correct"] > 0.5, "response_tokens": len(sample.response_ids)}
            for row, sample, verdict in zip(rows, samples, verdicts)]


def answers_text(answers: list[dict]) -> str:
    """``shown_answers`` for a terminal: each answer under a header line with its verdict."""
    blocks = []
    for i, a in enumerate(answers, 1):
        verdict = "correct" if a["correct"] else f"wrong (reference {a['reference']!r})"
        blocks.append(f"--- answer {i} of {len(answers)}: {verdict}, {a['response_tokens']} tokens\n"
                      f"[prompt]\n{a['prompt']}\n[response]\n{a['response']}")
    return "\n".join(blocks)


def evaluate_checkpoint(cfg: RunConfig, checkpoint: str, log: Callable[[str], None] = print, show: int = 0) -> dict:
    """``evaluate_policy`` on a saved policy, in this process (no Ray): the held-out prompts of ``cfg.task``
    (rendered with the checkpoint's tokenizer, with the think switch ``think.mode`` asks for), greedy answers of up
    to ``eval.max_new_tokens`` tokens, the task's verifier; ``show``: that many answers kept to read. What
    ``distilrl eval`` prints."""
    from reward.scoring.verifiers import make_verifier, verdict_figures
    from rlhf.core.data.datasets import load_rows
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
                           cfg.eval.batch_size, log, count_tokens, show)


def curve_point(step: int, figures: dict) -> dict:
    """One point of a run's held-out learning curve (``eval.every``): the step and the overall and per-difficulty
    accuracy and response length."""
    keep = ("accuracy", "mean_response_tokens", "n")
    return {"step": step, **{k: figures[k] for k in keep if k in figures},
            "by_difficulty": {level: {k: f[k] for k in keep[:2] if k in f}
                              for level, f in (figures.get("by_difficulty") or {}).items()}}


def score_eval(rows: list[PromptRow], samples: list[Sample], verdicts: list[dict],
               count_tokens: Callable[[str], int] | None = None) -> dict:
    """``verdicts`` are the reward workers' results for the samples (``correct`` is 1.0 or 0.0). Per-difficulty
    figures (``by_difficulty``: {bin: {accuracy, mean_response_tokens, think_rate, mean_reasoning_tokens, n}})
    appear when the rows carry a difficulty (the arithmetic level, or a dataset field). ``count_tokens`` measures
    reasoning text in the policy's tokens (default: characters)."""
    items = _items(samples, [v["correct"] > 0.5 for v in verdicts], count_tokens)
    thinking = _thinking(items)
    result = _figures(items, thinking)
    by_bin = _by_bin([r.difficulty for r in rows], items)
    if by_bin:
        result["by_difficulty"] = {str(level): _figures(group, thinking) for level, group in by_bin.items()}
    if any(s.episode is not None for s in samples):  # multi-turn: tool use, overall and per bin
        result.update(episode_figures(samples))
        for level, figures in result.get("by_difficulty", {}).items():
            figures.update(episode_figures([s for s, r in zip(samples, rows) if str(r.difficulty) == level]))
    return result


def difficulty_metrics(difficulties: list[int | None], samples: list[Sample], correct: list[bool],
                       count_tokens: Callable[[str], int] | None = None) -> dict[str, float]:
    """The per-bin figures of one RL batch as flat metrics: ``difficulty/<bin>/accuracy``, ``response_tokens``,
    ``think_rate``, ``reasoning_tokens``; plus the batch's ``charts/think_rate`` and ``charts/reasoning_tokens``
    (the thinking figures only where think blocks are in use)."""
    items = _items(samples, correct, count_tokens)
    thinking = _thinking(items)
    out = {}
    if thinking:
        overall = _figures(items, thinking)
        out = {"charts/think_rate": overall["think_rate"], "charts/reasoning_tokens": overall["mean_reasoning_tokens"]}
    for level, group in _by_bin(difficulties, items).items():
        f = _figures(group, thinking)
        out.update({f"difficulty/{level}/accuracy": f["accuracy"],
                    f"difficulty/{level}/response_tokens": f["mean_response_tokens"]})
        if thinking:
            out.update({f"difficulty/{level}/think_rate": f["think_rate"],
                        f"difficulty/{level}/reasoning_tokens": f["mean_reasoning_tokens"]})
    return out


def _items(samples: list[Sample], correct: list[bool], count_tokens: Callable[[str], int] | None) -> list[Item]:
    count = count_tokens or len
    items = []
    for sample, ok in zip(samples, correct, strict=True):
        parts = think.split_think(sample.text)
        reasoning = think.reasoning_text(sample.text)
        tokens = len(sample.response_ids) if sample.loss_mask is None else sum(sample.loss_mask)  # the model's own
        # Reasoning is part of the response: never counted longer than it (a re-tokenised text can come out longer).
        items.append((bool(ok), tokens, parts.thought, min(count(reasoning), tokens) if reasoning else 0,
                      parts.has_block))
    return items


def _thinking(items: list[Item]) -> bool:
    """Whether think blocks are in use: some response has one (an empty block, Qwen3's no-think output, counts)."""
    return any(item[4] for item in items)


def _by_bin(difficulties: list[int | None], items: list[Item]) -> dict[int, list[Item]]:
    by_bin: dict[int, list[Item]] = defaultdict(list)
    for difficulty, item in zip(difficulties, items, strict=True):
        if difficulty is not None:
            by_bin[difficulty].append(item)
    return dict(sorted(by_bin.items()))


def _figures(items: list[Item], thinking: bool) -> dict:
    n = max(1, len(items))
    figures = {"accuracy": round(sum(i[0] for i in items) / n, 4),
               "mean_response_tokens": round(sum(i[1] for i in items) / n, 2)}
    if thinking:
        figures["think_rate"] = round(sum(i[2] for i in items) / n, 4)
        figures["mean_reasoning_tokens"] = round(sum(i[3] for i in items) / n, 2)
    return {**figures, "n": len(items)}
