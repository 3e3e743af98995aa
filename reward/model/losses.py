"""Losses for distilling a teacher's judgments into the reward model: pure tensor functions.

Targets that the teacher did not give are NaN (a NaN score, or a whole NaN row of probabilities) and are left out.
Each loss is a mean over the rows that have a target; ``denom`` replaces that count, so that a batch split across
trainer ranks and micro-batches can divide every part by the *whole* batch's count: the parts' losses then sum
to the whole-batch loss (``loss_counts`` gives those counts, see reward/model/ranks.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_SCORES = 10  # the teacher's RV and CD scales are 0..9 (as reward.model.distilled.NUM_SCORES)

# Loss weights the trainer uses unless told otherwise. The RV/CD regressions are on the 0-9 scale, so their squared
# errors start an order of magnitude above the other terms: a smaller weight keeps them from dominating.
DEFAULT_WEIGHTS = {"bt": 1.0, "quality": 1.0, "rv": 0.1, "cd": 0.1, "kl": 1.0}


def _mean(values: torch.Tensor, mask: torch.Tensor, denom: float | None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` over ``denom`` (default: the mask's count); 0, still on the autograd
    graph, when nothing is selected."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    count = mask.sum().item() if denom is None else denom
    return total / max(float(count), 1.0)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       denom: float | None = None) -> torch.Tensor:
    """-log sigmoid(chosen - rejected - margin), mean over pairs.

    ``margin`` (B,), e.g. the teacher's quality difference scaled, asks for a larger gap where the teacher saw a
    larger difference; a NaN margin counts as 0.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - torch.nan_to_num(margin.to(diff.dtype), nan=0.0)
    return _mean(-F.logsigmoid(diff), torch.ones_like(diff, dtype=torch.bool), denom)


def pointwise_regression_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                              denom: float | None = None) -> torch.Tensor:
    """Mean squared error over rows with a (finite) target and, if given, ``mask`` true."""
    has = torch.isfinite(target)
    if mask is not None:
        has = has & mask.bool()
    # Substitute the missing targets before subtracting: NaN * 0 would still be NaN in the sum (and its gradient).
    safe = torch.where(has, target.to(pred.dtype), pred.detach())
    return _mean((pred - safe).square(), has, denom)


def soft_label_kl(logits: torch.Tensor, target_probs: torch.Tensor, mask: torch.Tensor | None = None,
                  denom: float | None = None) -> torch.Tensor:
    """KL(target || softmax(logits)) summed over the classes, mean over rows whose target is all finite (and
    ``mask`` true). 0 * log 0 counts as 0, so one-hot targets (``hard_to_probs``) are fine."""
    has = torch.isfinite(target_probs).all(dim=-1)
    if mask is not None:
        has = has & mask.bool()
    target = torch.where(has.unsqueeze(-1), target_probs.to(logits.dtype), torch.zeros_like(logits))
    kl = (torch.xlogy(target, target) - target * logits.log_softmax(dim=-1)).sum(dim=-1)
    return _mean(kl, has, denom)


def hard_to_probs(scores: torch.Tensor, num_classes: int = NUM_SCORES) -> torch.Tensor:
    """One-hot rows (B, num_classes) for integer-valued 0..9 scores (rounded, clipped); NaN rows where a score is
    NaN, so they drop out of ``soft_label_kl`` like absent soft labels."""
    has = torch.isfinite(scores)
    index = torch.where(has, scores, torch.zeros_like(scores)).round().clamp(0, num_classes - 1).long()
    probs = F.one_hot(index, num_classes).float()
    return torch.where(has.unsqueeze(-1), probs, torch.full_like(probs, float("nan")))


# ----------------------------------------------------------------------------------------- the trainer's loss

SIDES = ("chosen", "rejected")


def kl_targets(batch: dict[str, torch.Tensor], side: str, name: str) -> torch.Tensor:
    """Target distribution over the 0..9 ``name`` score (rv or cd) for one side: the teacher's soft label where
    it gave one, else a one-hot of its hard score, else a NaN row."""
    hard = hard_to_probs(batch[f"{side}_{name}"].float())
    soft = batch.get(f"{side}_{name}_probs")
    if soft is None:
        return hard
    soft = soft.float()
    return torch.where(torch.isfinite(soft).all(dim=-1, keepdim=True), soft, hard)


def loss_counts(batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """How many rows each term averages over, in this batch: pairs, and targets over both sides."""
    counts = {"pairs": float(batch["margin"].shape[0])}
    for name in ("quality", "rv", "cd"):
        counts[name] = float(sum(torch.isfinite(batch[f"{side}_{name}"]).sum().item() for side in SIDES))
    for name in ("rv", "cd"):
        counts[f"{name}_kl"] = float(sum(torch.isfinite(kl_targets(batch, side, name)).all(dim=-1).sum().item()
                                         for side in SIDES))
    return counts


def reward_model_loss(out_chosen, out_rejected, batch: dict[str, torch.Tensor], weights: dict[str, float] | None = None,
                      counts: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The trainer's loss: weights["bt"] * Bradley-Terry (teacher margin) + weights["quality"] * quality MSE +
    weights["rv"|"cd"] * expected-score MSE + weights["kl"] * (RV KL + CD KL), the pointwise terms over both sides.

    ``out_*`` are ``RewardOutput``s; ``batch`` holds margin (B,), {chosen,rejected}_{quality,rv,cd} (B,) with NaN
    where absent, optionally {chosen,rejected}_{rv,cd}_probs (B, 10). ``counts`` (default ``loss_counts(batch)``)
    are the denominators; with the whole batch's counts, the losses and metrics of its parts add up to its own.
    Metrics: ``rm/loss``, ``rm/bt_loss``, ``rm/quality_mse``, ``rm/rv_mse``, ``rm/cd_mse``, ``rm/rv_kl``,
    ``rm/cd_kl``, ``rm/accuracy`` (chosen scored strictly above rejected), ``rm/reward_gap`` (chosen - rejected).
    """
    unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown reward-model loss weights {sorted(unknown)}: use {sorted(DEFAULT_WEIGHTS)}")
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    counts = loss_counts(batch) if counts is None else counts
    outs = {"chosen": out_chosen, "rejected": out_rejected}

    def both(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions and targets of one pointwise score, chosen rows then rejected rows."""
        pred = torch.cat([getattr(outs[side], name) for side in SIDES])
        target = torch.cat([batch[f"{side}_{name}"].float() for side in SIDES]).to(pred.device)
        return pred, target

    terms = {"bt": bradley_terry_loss(out_chosen.quality, out_rejected.quality,
                                      batch["margin"].to(out_chosen.quality.device), denom=counts["pairs"])}
    for name in ("quality", "rv", "cd"):
        terms[name] = pointwise_regression_loss(*both(name), denom=counts[name])
    for name in ("rv", "cd"):
        logits = torch.cat([getattr(outs[side], f"{name}_logits") for side in SIDES])
        target = torch.cat([kl_targets(batch, side, name) for side in SIDES]).to(logits.device)
        terms[f"{name}_kl"] = soft_label_kl(logits, target, denom=counts[f"{name}_kl"])

    loss = (w["bt"] * terms["bt"] + w["quality"] * terms["quality"] + w["rv"] * terms["rv"] + w["cd"] * terms["cd"]
            + w["kl"] * (terms["rv_kl"] + terms["cd_kl"]))
    with torch.no_grad():
        gap = (out_chosen.quality - out_rejected.quality).float()
        pairs = max(counts["pairs"], 1.0)
        metrics = {
            "rm/loss": loss.item(),
            "rm/bt_loss": terms["bt"].item(),
            "rm/quality_mse": terms["quality"].item(),
            "rm/rv_mse": terms["rv"].item(),
            "rm/cd_mse": terms["cd"].item(),
            "rm/rv_kl": terms["rv_kl"].item(),
            "rm/cd_kl": terms["cd_kl"].item(),
            "rm/accuracy": (gap > 0).float().sum().item() / pairs,
            "rm/reward_gap": gap.sum().item() / pairs,
        }
    return loss, metrics
