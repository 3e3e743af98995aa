"""Advantage estimators and policy losses as small pure tensor functions.

Every function here takes tensors and returns tensors; nothing reads config or talks to Ray, so each one is
tested on its own against hand-computed numbers (tests/test_algorithms.py, tests/test_loss_options.py).

Shapes: B sequences, L token positions. Per-token tensors are aligned with ``input_ids``: position t holds the
log-probability of token t given tokens < t, and ``mask`` is 1 on response tokens only.

Sections: advantage estimators (and ``ADVANTAGE_ESTIMATORS``, the registry ``algorithm.advantage`` names:
each entry takes one ``AdvantageInputs`` and declares what it needs), reward shaping applied in the driver before advantages (overlong penalty, dynamic
sampling), KL estimators, the clipped policy loss and its per-token regularisers, loss aggregation weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from rlhf.core.config.registry import Registry

# ----------------------------------------------------------------------------------------------- advantages


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each sample's reward minus its group's mean, divided by the group's standard deviation.

    ``rewards`` is (B,) with the ``group_size`` samples of one prompt next to each other. A group whose rewards
    are all equal carries no signal and gets advantage 0 (not a division by ~0).
    """
    grouped = _grouped(rewards, group_size)
    centred = _centred(grouped)
    std = grouped.std(dim=1, unbiased=True, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
    return (centred / (std + eps)).reshape(-1)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO: group-mean baseline without the std division, which over-weights near-unanimous groups."""
    return _centred(_grouped(rewards, group_size)).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each sample's reward minus the mean of the *other* samples of its group,

        A_i = r_i - 1/(n-1) * sum_{j != i} r_j   (= n/(n-1) * (r_i - mean): Dr. GRPO scaled up by n/(n-1)).

    Leaving the sample out makes the baseline independent of the sample's own action, so the estimate is
    unbiased. A group of one has no other samples, hence no baseline: refused.
    """
    if group_size < 2:
        raise ValueError("RLOO needs groups of 2 or more samples (the baseline is the mean of the others)")
    return (_centred(_grouped(rewards, group_size)) * group_size / (group_size - 1)).reshape(-1)


def token_returns(rewards: torch.Tensor, response_mask: torch.Tensor, kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token return-to-go for one sequence-level reward, with an optional KL penalty folded into the reward
    (REINFORCE++'s token rewards, discount 1):

        reward_t = r * [t is the last response token] - kl_coef * kl_t,    G_t = sum_{s >= t} reward_s.

    ``rewards`` (B,); ``response_mask`` (B, L), 1 on response tokens; ``kl`` (B, L) per-token KL estimate
    (e.g. ``kl_penalty(..., "k1")``), or None for no penalty. Returns (B, L), 0 off the response. A row without
    response tokens has no last token, so its reward goes nowhere and its returns are all 0.
    """
    # Suffix sum along the sequence: flip, cumulative sum, flip back.
    return token_rewards(rewards, response_mask, kl, kl_coef).flip(1).cumsum(1).flip(1) * response_mask.float()


def token_rewards(rewards: torch.Tensor, response_mask: torch.Tensor, kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """One sequence-level reward as per-token rewards: r on the last response token, minus an optional per-token
    KL penalty on every response token (``kl_coef * kl_t``). (B,) -> (B, L), 0 off the response; a row without
    response tokens gets all 0 (its reward has no token to go to)."""
    mask = response_mask.float()
    # The last response token is where the running count of response tokens reaches the row's total.
    last = (mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True)) & (mask > 0)
    per_token = rewards.float().unsqueeze(1) * last
    if kl is not None and kl_coef:
        per_token = per_token - kl_coef * kl.float() * mask
    return per_token


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over the response tokens: PPO with a critic.

        delta_t = r_t + gamma * V_{t+1} - V_t,     A_t = delta_t + gamma * lam * A_{t+1},     returns_t = A_t + V_t

    ``rewards`` (B, L) per-token rewards (``token_rewards``); ``values`` (B, L) the critic's value of the state
    before each response token; both aligned with ``response_mask`` (B, L), whose 1s are one contiguous run per
    row. The step after the last response token is terminal (V = 0). gamma = lam = 1 gives A_t = G_t - V_t, the
    return-to-go minus the value; lam = 0 gives the one-step TD error. Returns (advantages, returns), 0 off the
    response (an all-padding row is all 0).
    """
    mask = response_mask.float()
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    # Backwards over positions; off the response both carries are reset to 0, so each row's last response token
    # sees a terminal next state, and prompt or padding positions stay 0.
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's per-token loss, PPO's clipped form: 0.5 * max((V - R)^2, (V_clip - R)^2) with
    V_clip = old_V + clamp(V - old_V, -clip, clip), so one update cannot move a value far from the one the
    advantages were computed with. ``clip`` None (or <= 0) is the plain 0.5 * (V - R)^2. Returns (loss per token,
    1.0 where the clipped term was the larger one, i.e. the clip was active)."""
    unclipped = (values - returns).square()
    if not clip or clip <= 0:
        return 0.5 * unclipped, torch.zeros_like(unclipped)
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns).square()
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) / (std + eps) over the entries where ``mask`` is 1, with the population (biased) std of those
    entries; 0 off the mask. All-equal inputs give 0, and an all-masked input gives all 0, never NaN."""
    mask = mask.float()
    mean = masked_mean(values, mask)
    std = masked_mean((values - mean).square(), mask).sqrt()
    return (values - mean) / (std + eps) * mask


def reinforce_plus_plus_advantages(rewards: torch.Tensor, response_mask: torch.Tensor,
                                   kl: torch.Tensor | None = None, kl_coef: float = 0.0,
                                   eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ (Hu, 2025): no per-prompt baseline; per-token returns (``token_returns``, KL penalty in the
    reward) whitened over every response token of the batch:

        A_t = (G_t - mean_batch(G)) / (std_batch(G) + eps),   mean and std over all response tokens.

    The batch-wide normalisation is what replaces the critic (PPO) or the group (GRPO) as the baseline, so it
    must see the whole rollout batch, not one rank's shard. Returns (B, L), 0 off the response.
    """
    return whiten(token_returns(rewards, response_mask, kl, kl_coef), response_mask, eps)


def reinforce_plus_plus_baseline_advantages(rewards: torch.Tensor, group_size: int, response_mask: torch.Tensor,
                                            kl: torch.Tensor | None = None, kl_coef: float = 0.0,
                                            eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group's mean reward first (r_i - mean_group, as Dr. GRPO), then
    REINFORCE++ on those centred rewards (KL-penalised returns, whitened over the batch's response tokens).

    The group mean removes each prompt's difficulty; whitening with the batch's std, not each group's, avoids
    GRPO's over-weighting of near-unanimous groups. A group of equal rewards centres to 0 and, without a KL
    penalty, whitens to exactly -mean_batch / std_batch: small, not 0, as the batch statistics dictate.
    """
    return reinforce_plus_plus_advantages(dr_grpo_advantages(rewards, group_size), response_mask, kl, kl_coef, eps)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.float().reshape(-1, group_size)


def _centred(grouped: torch.Tensor) -> torch.Tensor:
    """Each reward minus its group's mean, exactly 0 in a group of equal rewards. (The mean of eight 0.7s is not
    0.7 in floating point; GRPO's division by a std of ~1e-8 would turn that rounding into advantages of ~0.06.)"""
    unanimous = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return torch.where(unanimous, 0.0, grouped - grouped.mean(dim=1, keepdim=True))


@dataclass
class AdvantageInputs:
    """Everything an advantage estimator may use, one object for all of them.

    ``rewards`` (B,): each sample's sequence-level reward, the ``group_size`` samples of a prompt side by side;
    ``response_mask`` (B, L): 1 on response tokens, in the trainer batch's layout. ``token_rewards`` (B, L): rewards
    given per token on top of the sequence reward (the KL penalty in the reward, ``-kl_coef * KL_t``), None for
    none; only estimators that declare ``token_rewards`` read it. ``values`` (B, L): the critic's values, for
    estimators that need a ``critic``. ``gamma``, ``lam``: GAE's discount and trace decay."""

    rewards: torch.Tensor
    response_mask: torch.Tensor
    group_size: int
    token_rewards: torch.Tensor | None = None
    values: torch.Tensor | None = None
    gamma: float = 1.0
    lam: float = 1.0

    def per_token_rewards(self) -> torch.Tensor:
        """The sequence reward on each row's last response token plus the per-token rewards: (B, L)."""
        per_token = token_rewards(self.rewards, self.response_mask)
        return per_token if self.token_rewards is None else per_token + self.token_rewards * self.response_mask


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator and what it needs. ``compute(inputs)`` returns (advantages (B, L), returns (B, L) or
    None), 0 off the response. ``needs``: ``critic`` (a value model, trained towards the returns) and/or
    ``reference`` (the KL to the reference model goes into its token rewards when ``algorithm.kl_coef`` > 0).
    ``token_rewards``: it reads per-token rewards (so a KL in the reward, or a dense reward, can reach it).
    ``group_baseline``: groups of equal rewards get advantage 0 (dynamic sampling may drop them)."""

    compute: Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor | None]]
    needs: frozenset[str] = frozenset()
    token_rewards: bool = False
    group_baseline: bool = False


def _per_sequence(estimator: Callable[[torch.Tensor, int], torch.Tensor]) -> Estimator:
    """A sequence-level estimator (one advantage per sample) spread over each sample's response tokens."""
    def compute(inputs: AdvantageInputs) -> tuple[torch.Tensor, None]:
        return estimator(inputs.rewards, inputs.group_size).unsqueeze(1) * inputs.response_mask.float(), None

    return Estimator(compute, group_baseline=True)


def _returns_whitened(centre_by_group: bool) -> Callable[[AdvantageInputs], tuple[torch.Tensor, None]]:
    """REINFORCE++ (``centre_by_group``: its -baseline variant) over the inputs' per-token rewards."""
    def compute(inputs: AdvantageInputs) -> tuple[torch.Tensor, None]:
        rewards = dr_grpo_advantages(inputs.rewards, inputs.group_size) if centre_by_group else inputs.rewards
        inputs = replace(inputs, rewards=rewards)
        returns = inputs.per_token_rewards().flip(1).cumsum(1).flip(1) * inputs.response_mask.float()
        return whiten(returns, inputs.response_mask), None

    return compute


def _gae(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.values is None:
        raise ValueError("gae needs the critic's values (AdvantageInputs.values)")
    return gae_advantages(inputs.per_token_rewards(), inputs.values, inputs.response_mask, inputs.gamma, inputs.lam)


# ``algorithm.advantage`` names one of these. A new estimator is a function of AdvantageInputs plus one entry.
ADVANTAGE_ESTIMATORS: Registry[Estimator] = Registry("advantage estimator")
ADVANTAGE_ESTIMATORS.register("grpo", _per_sequence(grpo_advantages))
ADVANTAGE_ESTIMATORS.register("dr_grpo", _per_sequence(dr_grpo_advantages))
ADVANTAGE_ESTIMATORS.register("rloo", _per_sequence(rloo_advantages))
# REINFORCE++ takes the KL to the reference in its token rewards, as in the paper (and OpenRLHF).
ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus", Estimator(
    _returns_whitened(False), needs=frozenset({"reference"}), token_rewards=True))
ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus_baseline", Estimator(
    _returns_whitened(True), needs=frozenset({"reference"}), token_rewards=True, group_baseline=True))
ADVANTAGE_ESTIMATORS.register("gae", Estimator(_gae, needs=frozenset({"critic"}), token_rewards=True))
# On-policy distillation alone: no sequence-level advantage; the teacher_kl component's per-token term
# (distillation_advantages, added by the update to any estimator's advantages) is all there is.
ADVANTAGE_ESTIMATORS.register("on_policy_distillation", Estimator(
    lambda inputs: (torch.zeros_like(inputs.response_mask, dtype=torch.float), None)))

# ------------------------------------------------------------------------------------------ reward shaping


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, a reward term (<= 0) from each response's length in tokens:

        0                                       if len <= max_length - buffer
        -penalty * (len - (max_length - buffer)) / buffer   within the last ``buffer`` tokens
        -penalty                                if len >= max_length

    A ramp instead of a cliff: responses drift towards the limit gradually, and a hard penalty at truncation
    alone would punish a sound but long answer as if it were wrong. ``buffer`` 0 turns it off (all 0).
    """
    if not 0 <= buffer <= max_length:
        raise ValueError(f"overlong buffer of {buffer} tokens must be between 0 and max_length={max_length}")
    if buffer == 0:
        return torch.zeros(lengths.shape)
    excess = (lengths.float() - (max_length - buffer)).clamp(min=0.0, max=float(buffer))
    return -penalty * excess / buffer


def informative_groups(rewards: torch.Tensor, group_size: int, rows_multiple: int = 1) -> torch.Tensor:
    """DAPO's dynamic sampling, in its simplest form: which rows (B,) bool to train on.

    A group whose rewards are all equal has zero advantage under any group baseline: it adds no gradient but
    still dilutes the token-mean normaliser, so it is dropped. The kept rows must then split evenly across
    ``rows_multiple`` trainer ranks; if they do not, the fewest informative groups are dropped as well: the
    *last* ones in batch order (prompts arrive shuffled), keeping the largest count k with k * group_size a
    multiple of ``rows_multiple``. May keep nothing (all False); the caller then skips the update.
    DAPO proper samples more prompts to refill the batch; this version trains on a smaller one instead.
    """
    grouped = _grouped(rewards, group_size)
    informative = grouped.max(dim=1).values != grouped.min(dim=1).values
    # k groups give k * group_size rows: a multiple of rows_multiple exactly when k is a multiple of this step.
    step = rows_multiple // math.gcd(group_size, rows_multiple)
    keep_count = int(informative.sum()) // step * step
    keep = informative & (informative.cumsum(dim=0) <= keep_count)
    return keep.repeat_interleave(group_size)


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


def kl_reward(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor,
              kl_coef: float) -> torch.Tensor:
    """The KL to the reference as a per-token reward, ``-kl_coef * (log pi - log ref)`` on response tokens (k1).

    Always k1 here, whatever ``kl_estimator`` the loss uses: a reward enters the gradient through the score
    function, E[r * grad log pi], and only k1 makes that the gradient of KL(pi || ref). With k3 in the reward the
    expected gradient is that of KL(pi || ref) - KL(ref || pi), about 0 near the reference: it barely regularises
    (tests/test_algorithms.py measures both on a small categorical)."""
    return -kl_coef * (logprobs - ref_logprobs) * response_mask.float()


def distillation_advantages(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                            response_mask: torch.Tensor, weight: float) -> torch.Tensor:
    """On-policy distillation's per-token advantage, added to whatever the estimator gives:

        A_t = weight * (r_t - mean_batch(r)),   r_t = log p_teacher(x_t) - log p_student(x_t)

    at each sampled token x_t (minus the reverse KL), the mean over every response token of the batch.

    Discount 0: a token is credited with its own log-ratio only. Summed into a return-to-go (as a per-token reward
    in REINFORCE++ or GAE), the log-ratios of the tokens after it, negative on average, make every extra token a
    penalty: responses shrank from 14 to 6 tokens in benchmarks/onpolicy_distillation.py. The batch mean is a
    baseline, which leaves the expected gradient as it is (E[grad log p_student(x_t)] = 0) and removes the push
    down on every sampled token that the mean log-ratio (about -0.6) gave: uncentred, the gradient norm was 10x
    GRPO's, all of it noise. Returns (B, L), 0 off the response."""
    mask = response_mask.float()
    log_ratio = (teacher_logprobs - student_logprobs) * mask
    return weight * (log_ratio - masked_mean(log_ratio, mask)) * mask


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


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the distribution each token was sampled from, aligned with ``input_ids`` as ``token_logprobs``
    is: position t holds H(softmax(logits[t-1])), position 0 gets 0. ``logits`` (B, L, V) -> (B, L), float32.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v, which stays finite where probabilities underflow to 0
    (-sum p log p would meet 0 * -inf there). Differentiable, for the entropy bonus.
    """
    logits = logits[:, :-1].float()
    entropy = torch.logsumexp(logits, dim=-1) - (logits.softmax(dim=-1) * logits).sum(dim=-1)
    return torch.nn.functional.pad(entropy, (1, 0), value=0.0)
