"""Per-token policy-gradient losses: PPO's clipped surrogate, the truncated importance weights that correct for
tokens sampled by another policy, and the per-token regularisers (entropy bonus, KL to the reference)."""
from __future__ import annotations

import math

import torch


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


def truncated_importance_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS) weights for the policy-gradient term, per token:

        w_t = min(exp(old_logprob_t - rollout_logprob_t), cap)   on response tokens, 0 elsewhere.

    ``old_logprobs``: the trainer's log-probs before this batch's first update (the PPO ratio's denominator);
    ``rollout_logprobs``: the sampler's, which actually drew the tokens. They differ because the inference engine
    computes differently from the trainer (kernels, precision) and, with asynchronous rollout, because the sampler
    held older weights. Weighting by their ratio corrects the gradient for sampling from the wrong policy; the cap
    bounds the variance a few tokens the sampler found unlikely would otherwise add. Computed as
    exp(min(log-ratio, log cap)): the same value, without overflowing to inf first. No gradient flows through it.
    """
    if cap <= 0:
        raise ValueError(f"truncated importance sampling cap must be > 0, not {cap}")
    log_ratio = (old_logprobs.detach() - rollout_logprobs.detach()).float()
    return log_ratio.clamp(max=math.log(cap)).exp() * mask.float()


def policy_token_loss(pg_loss: torch.Tensor, entropy: torch.Tensor | None = None, kl: torch.Tensor | None = None,
                      entropy_coef: float = 0.0, kl_coef: float = 0.0) -> torch.Tensor:
    """The per-token loss the trainer minimises (before the aggregation weights):

        loss_t = pg_t - entropy_coef * H_t + kl_coef * KL_t

    The entropy bonus (minus sign: higher entropy lowers the loss) keeps the policy from collapsing onto one
    answer early; the KL term holds it near the reference. A term whose coefficient is 0 is skipped, not added
    as 0 * x, so the default loss is exactly the policy-gradient term (and a NaN in an unused input stays out).
    """
    loss = pg_loss
    if entropy_coef:
        loss = loss - entropy_coef * entropy
    if kl_coef:
        loss = loss + kl_coef * kl
    return loss
