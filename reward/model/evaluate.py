"""How well a reward model imitates its teacher, on held-out labelled rows (numpy only; scoring is the caller's).

Pairwise rows {prompt, chosen, rejected, optional difficulty, cd or chosen_cd} give ``pairwise_accuracy`` (chosen
scored strictly above rejected), ``by_difficulty`` (the same per task difficulty, where the data has one) and
``by_cd`` (per the teacher's cognitive-difficulty score, a judgment of its own). Pointwise rows {prompt, response,
quality, optional rv, cd, correct} give Spearman rank correlations with the teacher (``spearman`` for quality,
``rv_spearman``, ``cd_spearman``) and, where rows say whether the response is ``correct``, ``calibration``.
A figure with nothing to compute from is None (JSON null), never NaN.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

ScoreFn = Callable[[list[str], list[str]], list]


def evaluate_reward_model(scorer, pairwise_rows: Sequence[dict] = (), pointwise_rows: Sequence[dict] = (),
                          tokenizer=None, batch_size: int = 16, calibration_bins: int = 5,
                          max_length: int | None = None) -> dict:
    """Score every text once and compute the figures described in the module docstring.

    ``scorer`` is a ``DistilledRewardModel`` when ``tokenizer`` is given; otherwise a function
    (prompts, responses) -> one result per pair: a dict with ``quality`` (and ``rv``, ``cd`` if it predicts
    them) or a plain float quality (e.g. ``RemoteRewardClient.score``).
    """
    score_fn = _model_score_fn(scorer, tokenizer, batch_size, max_length) if tokenizer is not None else scorer
    prompts = ([r["prompt"] for r in pairwise_rows] * 2 + [r["prompt"] for r in pointwise_rows])
    responses = ([r["chosen"] for r in pairwise_rows] + [r["rejected"] for r in pairwise_rows]
                 + [r["response"] for r in pointwise_rows])
    scores = [s if isinstance(s, dict) else {"quality": float(s)} for s in score_fn(prompts, responses)] \
        if prompts else []
    if len(scores) != len(prompts):
        raise ValueError(f"the scorer returned {len(scores)} results for {len(prompts)} texts")
    n = len(pairwise_rows)
    chosen, rejected, pointwise = scores[:n], scores[n:2 * n], scores[2 * n:]

    result = {"pairwise_count": n, "pointwise_count": len(pointwise_rows)}
    result.update(pairwise_figures([c["quality"] for c in chosen], [r["quality"] for r in rejected],
                                   [_row_cd(row) for row in pairwise_rows],
                                   [_row_difficulty(row) for row in pairwise_rows]))
    for name, key in (("quality", "spearman"), ("rv", "rv_spearman"), ("cd", "cd_spearman")):
        pairs = [(s[name], row[name]) for s, row in zip(pointwise, pointwise_rows)
                 if _present(s.get(name)) and _present(row.get(name))]
        result[key] = spearman([p for p, _ in pairs], [t for _, t in pairs])
    labelled = [(s["quality"], float(row["correct"])) for s, row in zip(pointwise, pointwise_rows)
                if _present(row.get("correct"))]
    result["calibration"] = (calibration([q for q, _ in labelled], [c for _, c in labelled], calibration_bins)
                             if labelled else None)
    return result


def _model_score_fn(model, tokenizer, batch_size: int, max_length: int | None) -> ScoreFn:
    from reward.model.distilled import score_texts  # torch only where a model is actually scored

    return lambda prompts, responses: score_texts(model, tokenizer, prompts, responses, batch_size, max_length)


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _row_cd(row: dict):
    cd = row.get("cd", row.get("chosen_cd"))
    return cd if _present(cd) else None


def _row_difficulty(row: dict):
    level = row.get("difficulty")
    return level if _present(level) else None


# -------------------------------------------------------------------------------------------------- figures


def pairwise_figures(chosen: Sequence[float], rejected: Sequence[float], cds: Sequence | None = None,
                     difficulties: Sequence | None = None) -> dict:
    """``pairwise_accuracy``: fraction of pairs with chosen strictly above rejected (a tie is a miss: the model
    did not tell them apart); ``by_difficulty``: {task difficulty: {accuracy, count}} over pairs with one, and
    ``by_cd``: the same per the teacher's CD score; None where no pair has one."""
    wins = [float(c > r) for c, r in zip(chosen, rejected, strict=True)]
    return {
        "pairwise_accuracy": float(np.mean(wins)) if wins else None,
        "by_difficulty": _accuracy_by(wins, difficulties),
        "by_cd": _accuracy_by(wins, cds),
    }


def _accuracy_by(wins: list[float], levels: Sequence | None) -> dict | None:
    """{level: {accuracy, count}} over the pairs with a level (rounded to an integer bin), or None."""
    groups: dict[int, list[float]] = {}
    for win, level in zip(wins, levels or [None] * len(wins), strict=True):
        if level is not None:
            groups.setdefault(int(round(float(level))), []).append(win)
    return {level: {"accuracy": float(np.mean(w)), "count": len(w)} for level, w in sorted(groups.items())} \
        if groups else None


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span (e.g. [5, 7, 7, 9] -> [1, 2.5, 2.5, 4])."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and values[order[end + 1]] == values[order[start]]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1  # mean of positions start..end, counted from 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson's on average ranks. None with fewer than 2 points or when one side is
    constant (no ordering to agree with)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else None


def calibration(quality: Sequence[float], correct: Sequence[float], bins: int = 5) -> dict:
    """Does the reward track correctness?

    ``ece`` and ``bins``: confidence = sigmoid(quality) in ``bins`` equal-width bins of [0, 1]; per non-empty bin
    its range, count, mean confidence and fraction correct; ECE = sum over bins of count/N * |confidence -
    fraction correct|. Meaningful when quality is trained as a logit of correctness; a pairwise-trained reward
    has no fixed offset, so also ``by_quantile``: rows sorted by quality in ``bins`` equal-count groups
    (lowest first), each with its quality range and fraction correct, which only needs the ranking to be right.
    """
    q = np.asarray(quality, dtype=float)
    c = np.asarray(correct, dtype=float)
    if len(q) != len(c) or not len(q):
        raise ValueError("calibration needs one correctness label per score, and at least one")
    confidence = 1.0 / (1.0 + np.exp(-q))
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = index == b
        if sel.any():
            conf, acc = float(confidence[sel].mean()), float(c[sel].mean())
            table.append({"lo": b / bins, "hi": (b + 1) / bins, "count": int(sel.sum()), "confidence": conf,
                          "fraction_correct": acc})
            ece += sel.sum() / len(q) * abs(conf - acc)
    order = np.argsort(q, kind="stable")
    by_quantile = [{"quality_min": float(q[part].min()), "quality_max": float(q[part].max()), "count": len(part),
                    "fraction_correct": float(c[part].mean())}
                   for part in np.array_split(order, min(bins, len(q)))]
    return {"ece": float(ece), "bins": table, "by_quantile": by_quantile}
