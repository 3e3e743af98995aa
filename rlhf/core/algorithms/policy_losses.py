"""Per-token policy-gradient losses and ``POLICY_LOSSES``, the registry ``algorithm.policy_loss`` names; the truncated
importance weights that correct for tokens sampled by another policy; the per-token regularisers (entropy bonus,
KL to the reference).

Every loss returns (loss per token, 1.0 where its clip was active), both (B, L); the trainer weights the per-token
losses by the batch's aggregation weights (aggregation.py) and sums. ``logprobs`` carries the gradient; the old
log-probs (the policy before this batch's first update) and the advantages do not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from rlhf.core.config.registry import Registry

# exp() of a log-ratio above this overflows float32 soon after; GSPO's sequence ratio is capped here before exp.
MAX_LOG_RATIO = 10.0


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, with separate lower and upper clip ranges (clip-higher when
    ``clip_high > clip_low``): max(-A * r, -A * clamp(r, 1 - clip_low, 1 + clip_high)), r = exp(logp - old_logp).
    Returns (loss per token, 1.0 where the clip was active)."""
    ratio = (logprobs - old_logprobs).exp()
    return _clipped_surrogate(ratio, advantages, clip_low, clip_high)


def dual_clip_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                          clip_low: float = 0.2, clip_high: float = 0.2,
                          dual_clip: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-clip PPO (Ye et al., 2020): the clipped surrogate, and for a negative advantage a second bound,

        loss_t = min(max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high)), -A * dual_clip)   where A < 0.

    Where A < 0 the clipped surrogate grows without limit with the ratio: a token the sampler drew but the current
    policy now finds far likelier (r >> 1, as with stale asynchronous samples) would dominate the batch. The bound
    stops its loss at -A * c (and its gradient at 0). veRL's default policy loss does the same
    (verl/trainer/ppo/core_algos.py, ``compute_policy_loss_vanilla`` with ``clip_ratio_c``, 3 by default).
    The clip mark is 1 where either bound was active."""
    if dual_clip <= 1.0:
        raise ValueError(f"dual-clip bound {dual_clip} must be > 1 (it caps the loss of ratios above 1 + clip_high)")
    loss, clipped = clipped_policy_loss(logprobs, old_logprobs, advantages, clip_low, clip_high)
    cap = -advantages * dual_clip
    capped = (advantages < 0) & (loss > cap)
    return torch.where(capped, cap, loss), torch.maximum(clipped, capped.float())


def gspo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, clip_low: float = 3e-4, clip_high: float = 4e-4,
                     sequence_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO (Zheng et al., 2025, "Group Sequence Policy Optimization"): one importance ratio per sequence, the
    length-normalised likelihood ratio s = exp(mean over its response tokens of (logp - old_logp)), clipped as PPO's.

    Written per token in the paper's GSPO-token form, s_t = sg(s) * exp(logp_t - sg(logp_t)): the same value on
    every token of a sequence, and with one advantage per sequence the same gradient as the sequence objective
    under a seq-mean aggregation, s * mean_t grad logp_t. veRL's ``compute_policy_loss_gspo``
    (verl/trainer/ppo/core_algos.py) computes the same ratio. A token-level ratio is noisy (one token's
    ratio says little about the sequence the reward judged); the sequence ratio is what the reward is about.
    The clip ranges are ratio units of a *per-token geometric mean*, so far narrower than PPO's: the paper used
    3e-4 and 4e-4.

    ``sequence_ids`` (B, L) long: which sequence each token belongs to, for rows that pack several sequences
    (rlhf/core/data/packing.py); None: each row is one sequence. Returns (loss per token, clip mark), 0 off ``mask``.
    """
    mask = mask.float()
    log_ratio = sequence_mean((logprobs - old_logprobs).detach(), mask, sequence_ids).clamp(max=MAX_LOG_RATIO)
    ratio = (logprobs - logprobs.detach() + log_ratio).exp()
    loss, clipped = _clipped_surrogate(ratio, advantages, clip_low, clip_high)
    return loss * mask, clipped * mask


def cispo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_low: float = 1.0, clip_high: float = 0.28) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, 2025): REINFORCE weighted by the clipped importance ratio, the weight held constant,

        loss_t = -sg(clamp(r_t, 1 - clip_low, 1 + clip_high)) * A_t * logp_t,    r_t = exp(logp_t - old_logp_t).

    PPO's clip zeroes the gradient of a clipped token; in long reasoning those are often the rare tokens that
    fork the reasoning ("wait", "however"), and their gradient is lost. Clipping the *weight* under a
    stop-gradient bounds the update's size and keeps every token's gradient (A * w * grad logp). veRL's
    ``compute_policy_loss_cispo`` (verl/trainer/ppo/core_algos.py) is the same formula. MiniMax-M1 left the
    lower bound open (clip_low 1 gives weight >= 0) and tuned the upper one. The loss's value is not the
    surrogate's (it is -A * w * logp, positive for a positive advantage); its gradient is what counts. The clip
    mark is 1 where the weight was clamped."""
    ratio = (logprobs - old_logprobs).detach().clamp(max=MAX_LOG_RATIO).exp()
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return -weight * advantages * logprobs, (weight != ratio).float()


def sequence_mean(values: torch.Tensor, mask: torch.Tensor, sequence_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's sequence's mean of ``values`` over its ``mask``ed tokens, (B, L) -> (B, L). ``sequence_ids``
    (B, L) long numbers the sequences (packed rows hold several); None: each row is one. A sequence without
    masked tokens has mean 0."""
    mask = mask.float()
    return sequence_sum(values, mask, sequence_ids) / sequence_sum(mask, mask, sequence_ids).clamp(min=1.0)


def sequence_sum(values: torch.Tensor, mask: torch.Tensor, sequence_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's sequence's sum of ``values`` over its ``mask``ed tokens, (B, L) -> (B, L); ``sequence_ids`` as
    ``sequence_mean`` takes them."""
    masked = values * mask.float()
    if sequence_ids is None:
        return masked.sum(dim=1, keepdim=True).expand_as(values)
    ids = sequence_ids.reshape(-1).long()
    sums = values.new_zeros(int(ids.max()) + 1 if ids.numel() else 0).index_add(0, ids, masked.reshape(-1))
    return sums[ids].reshape(values.shape)


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                       clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


@dataclass
class PolicyLossInputs:
    """Everything a policy loss may use. ``logprobs`` (B, L) with gradient, ``old_logprobs`` and ``advantages``
    (B, L) without; ``mask`` (B, L) 1 on response tokens; ``sequence_ids`` (B, L) long for packed rows (None: a row
    is a sequence); the clip settings of ``algorithm`` (clip_low, clip_high, dual_clip)."""

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 3.0
    sequence_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class PolicyLoss:
    """A policy loss: ``compute(inputs)`` -> (loss per token, clip mark). ``sequence_level``: one ratio per
    sequence, so its tokens are averaged per sequence (``loss_aggregation: seq-mean``) and the trainer passes
    sequence ids for packed rows."""

    compute: Callable[[PolicyLossInputs], tuple[torch.Tensor, torch.Tensor]]
    sequence_level: bool = False


# ``algorithm.policy_loss`` names one of these. A new loss is a function of PolicyLossInputs plus one entry.
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")
POLICY_LOSSES.register("vanilla", PolicyLoss(lambda i: clipped_policy_loss(
    i.logprobs, i.old_logprobs, i.advantages, i.clip_low, i.clip_high)))
POLICY_LOSSES.register("dual_clip", PolicyLoss(lambda i: dual_clip_policy_loss(
    i.logprobs, i.old_logprobs, i.advantages, i.clip_low, i.clip_high, i.dual_clip)))
POLICY_LOSSES.register("gspo", PolicyLoss(lambda i: gspo_policy_loss(
    i.logprobs, i.old_logprobs, i.advantages, i.mask, i.clip_low, i.clip_high, i.sequence_ids), sequence_level=True))
POLICY_LOSSES.register("cispo", PolicyLoss(lambda i: cispo_policy_loss(
    i.logprobs, i.old_logprobs, i.advantages, i.clip_low, i.clip_high)))


def truncated_importance_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS) weights for the policy-gradient term, per token:

        w_t = min(exp(old_logprob_t - rollout_logprob_t), cap)   on response tokens, 0 elsewhere.

    ``old_logprobs``: the trainer's log-probs before this batch's first update (the PPO ratio's denominator);
    ``rollout_logprobs``: the sampler's, which actually drew the tokens. They differ because the inference engine
    computes differently from the trainer (kernels, precision) and, with asynchronous rollout, because the sampler
    held older weights. Weighting by their ratio corrects the gradient for sampling from the wrong policy; the cap
    bounds the variance a few tokens the sampler found unlikely would otherwise add. ``off_policy_weights`` with
    its defaults; its other levels and modes are the alternatives.
    """
    return off_policy_weights(old_logprobs, rollout_logprobs, mask, cap)[0]


def off_policy_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float,
                       level: str = "token", mode: str = "truncate", floor: float = 0.0,
                       sequence_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights correcting the policy gradient for tokens sampled by another policy (the sampler's
    numerics, or older weights with asynchronous rollout): (weights, 1.0 where the weight was corrected), (B, L),
    0 off ``mask``, no gradient. The ratio r = pi_old / pi_sampler is taken at one of three levels:

      token:     r_t = exp(old_t - rollout_t), each token its own;
      sequence:  the product of its tokens' ratios, exp(sum_t log r_t), on every token of the sequence;
      geometric: their geometric mean, exp(mean_t log r_t): length-normalised, as GSPO's ratio is;

    and kept in one of two modes: truncate (TIS): w = min(r, cap), a bounded weight that keeps every sample;
    mask: w = r inside [floor, cap] and 0 outside, dropping the samples whose sampler was too far from the trainer
    instead of keeping them at the cap. A sequence's product of ratios strays further than any token's, so
    sequence-level caps are usually larger. Computed on log-ratios, so no ratio overflows before it is cut.
    ``sequence_ids``: as ``sequence_mean`` takes them, for packed rows.
    """
    if cap <= 0:
        raise ValueError(f"importance-weight cap must be > 0, not {cap}")
    if not 0 <= floor < cap:
        raise ValueError(f"importance-weight floor {floor} must be at least 0 and below the cap {cap}")
    mask = mask.float()
    log_ratio = (old_logprobs.detach() - rollout_logprobs.detach()).float() * mask
    if level == "sequence":
        log_ratio = sequence_sum(log_ratio, mask, sequence_ids)
    elif level == "geometric":
        log_ratio = sequence_mean(log_ratio, mask, sequence_ids)
    elif level != "token":
        raise ValueError(f"unknown importance-weight level {level!r}: use token, sequence or geometric")
    weights = log_ratio.clamp(max=math.log(cap)).exp()
    if mode == "truncate":
        corrected = weights >= cap
    elif mode == "mask":
        corrected = (log_ratio > math.log(cap)) | ((log_ratio < math.log(floor)) if floor > 0 else False)
        weights = torch.where(corrected, 0.0, weights)
    else:
        raise ValueError(f"unknown importance-weight mode {mode!r}: use truncate or mask")
    return weights * mask, corrected.float() * mask


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
