"""Advantage estimators and policy losses as small pure tensor functions.

Every function here takes tensors and returns tensors; nothing reads config or talks to Ray, so each one is
tested on its own against hand-computed numbers (tests/test_algorithms.py).

Shapes: B sequences, L token positions. Per-token tensors are aligned with ``input_ids``: position t holds the
log-probability of token t given tokens < t, and ``mask`` is 1 on response tokens only.
"""
from __future__ import annotations

from typing import Callable

import torch

# ----------------------------------------------------------------------------------------------- advantages


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each sample's reward minus its group's mean, divided by the group's standard deviation.

    ``rewards`` is (B,) with the ``group_size`` samples of one prompt next to each other. A group whose rewards
    are all equal carries no signal and gets advantage 0 (not a division by ~0).
    """
    grouped = _grouped(rewards, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=True, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
    return (centred / (std + eps)).reshape(-1)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO: group-mean baseline without the std division, which over-weights near-unanimous groups."""
    grouped = _grouped(rewards, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.float().reshape(-1, group_size)


ADVANTAGE_ESTIMATORS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
}

# ------------------------------------------------------------------------------------------------- KL terms


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1, k2, k3).

    k1 is unbiased but can be negative; k3 is unbiased and non-negative, which is why GRPO uses it in the loss.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # Clamp before exp: a token the reference finds vastly likelier would otherwise overflow to inf.
        neg = (-log_ratio).clamp(max=20.0)
        return neg.exp() - neg - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1, k2 or k3")


# ---------------------------------------------------------------------------------------------- policy loss


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, with separate lower and upper clip ranges (clip-higher when
    ``clip_high > clip_low``). Returns (loss per token, 1.0 where the clip was active)."""
    ratio = (logprobs - old_logprobs).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    return loss, (clipped > unclipped).float()


# ------------------------------------------------------------------------------------------- aggregation

LOSS_AGGREGATIONS = ("token-mean", "seq-mean", "dr-grpo")


def loss_token_weights(mask: torch.Tensor, mode: str, max_response_tokens: int) -> torch.Tensor:
    """Weights w (B, L) such that the batch loss is sum(w * per_token_loss).

    Computing the weights once for the whole batch, before it is split across trainer ranks and micro-batches,
    makes the loss independent of how it is split: each part just sums its share.
      token-mean: every response token in the batch counts equally (long answers weigh more);
      seq-mean:   every sequence counts equally, tokens averaged within it;
      dr-grpo:    a constant normaliser (B * max_response_tokens), so no length bias at all.
    """
    mask = mask.float()
    if mode == "token-mean":
        return mask / mask.sum().clamp(min=1.0)
    if mode == "seq-mean":
        per_seq = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return mask / per_seq / mask.shape[0]
    if mode == "dr-grpo":
        return mask / float(mask.shape[0] * max_response_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}: use one of {', '.join(LOSS_AGGREGATIONS)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1; 0 for an all-masked input rather than NaN."""
    mask = mask.float()
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token given the ones before it, aligned with ``input_ids`` (position 0 gets 0).

    ``logits`` (B, L, V) from a causal LM over ``input_ids`` (B, L).
    """
    logits = logits[:, :-1].float()
    # gather minus logsumexp instead of a full log_softmax: with a 151k vocabulary that saves a (B, L, V) copy.
    taken = logits.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(taken, (1, 0), value=0.0)
