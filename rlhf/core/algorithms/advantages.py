"""Advantage estimators and ``ADVANTAGE_ESTIMATORS``, the registry ``algorithm.advantage`` names: each entry
takes one ``AdvantageInputs`` and declares what it needs (a critic, the reference model).

Shapes: B sequences, L token positions; ``response_mask`` (B, L) is 1 on response tokens only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from rlhf.core.config.registry import Registry
from rlhf.core.algorithms.tokens import masked_mean


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each sample's reward minus its group's mean, divided by the group's standard deviation.

    ``rewards`` is (B,) with the ``group_size`` samples of one prompt next to each other. A group whose rewards
    are all equal carries no signal and gets advantage 0 (not a division by ~0).
    """
    grouped = grouped_rewards(rewards, group_size)
    centred = _centred(grouped)
    std = grouped.std(dim=1, unbiased=True, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
    return (centred / (std + eps)).reshape(-1)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO: group-mean baseline without the std division, which over-weights near-unanimous groups."""
    return _centred(grouped_rewards(rewards, group_size)).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each sample's reward minus the mean of the *other* samples of its group,

        A_i = r_i - 1/(n-1) * sum_{j != i} r_j   (= n/(n-1) * (r_i - mean): Dr. GRPO scaled up by n/(n-1)).

    Leaving the sample out makes the baseline independent of the sample's own action, so the estimate is
    unbiased. A group of one has no other samples, hence no baseline: refused.
    """
    if group_size < 2:
        raise ValueError("RLOO needs groups of 2 or more samples (the baseline is the mean of the others)")
    return (_centred(grouped_rewards(rewards, group_size)) * group_size / (group_size - 1)).reshape(-1)


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
    before each response token; both aligned with ``response_mask`` (B, L), whose 1s are the tokens the policy
    sampled (a multi-turn trajectory's observation tokens between them are 0 and skipped). The step after the
    last response token is terminal (V = 0). gamma = lam = 1 gives A_t = G_t - V_t, the return-to-go minus the
    value; lam = 0 gives the one-step TD error. Returns (advantages, returns), 0 off the
    response (an all-padding row is all 0).
    """
    mask = response_mask.float()
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    # Backwards over positions; the carries start at 0, so each row's last response token sees a terminal next
    # state, and prompt, padding and masked positions stay 0.
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        # Carried over masked positions inside a response (a multi-turn trajectory's observation tokens): the next
        # state of a turn's last token is the next turn's first.
        on = mask[:, t] > 0
        next_value = torch.where(on, values[:, t], next_value)
        next_advantage = torch.where(on, advantages[:, t], next_advantage)
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) / (std + eps) over the entries where ``mask`` is 1, with the population (biased) std of those
    entries; 0 off the mask. All-equal inputs give 0, and an all-masked input gives all 0, never NaN."""
    mask = mask.float()
    mean = masked_mean(values, mask)
    std = masked_mean((values - mean).square(), mask).sqrt()
    return (values - mean) / (std + eps) * mask


def returns_to_go(per_token_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """G_t = sum_{s >= t} reward_s (discount 1) over each row's response tokens: (B, L) -> (B, L), 0 off the
    response. With ``token_rewards`` (the reward on the last token, a KL penalty on every token) it is
    REINFORCE++'s return, and GAE's with gamma = lam = 1."""
    # Suffix sum along the sequence: flip, cumulative sum, flip back.
    mask = response_mask.float()
    return (per_token_rewards * mask).flip(1).cumsum(1).flip(1) * mask


def reinforce_plus_plus_advantages(per_token_rewards: torch.Tensor, response_mask: torch.Tensor,
                                   eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ (Hu, 2025): no per-prompt baseline; per-token returns (``returns_to_go`` of the token rewards,
    the KL penalty among them) whitened over every response token of the batch:

        A_t = (G_t - mean_batch(G)) / (std_batch(G) + eps),   mean and std over all response tokens.

    The batch-wide normalisation is what replaces the critic (PPO) or the group (GRPO) as the baseline, so it
    must see the whole rollout batch, not one rank's shard. Its -baseline variant centres each group's rewards
    first (the registry's ``reinforce_plus_plus_baseline``). Returns (B, L), 0 off the response.
    """
    return whiten(returns_to_go(per_token_rewards, response_mask), response_mask, eps)


def grouped_rewards(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) rewards as (B / group_size, group_size), one prompt's samples per row; refuses a B that does not split."""
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
    ``group_baseline``: a group of equal rewards gets advantage 0 on every token whatever the rest of the batch
    holds, so dynamic sampling may drop it (the config refuses dynamic sampling with any other estimator)."""

    compute: Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor | None]]
    needs: frozenset[str] = frozenset()
    token_rewards: bool = False
    group_baseline: bool = False


def _per_sequence(estimator: Callable[[torch.Tensor, int], torch.Tensor]) -> Estimator:
    """A sequence-level estimator (one advantage per sample) spread over each sample's response tokens."""
    def compute(inputs: AdvantageInputs) -> tuple[torch.Tensor, None]:
        return estimator(inputs.rewards, inputs.group_size).unsqueeze(1) * inputs.response_mask.float(), None

    return Estimator(compute, group_baseline=True)


def _reinforce_plus_plus(centre_by_group: bool) -> Callable[[AdvantageInputs], tuple[torch.Tensor, None]]:
    """REINFORCE++ over the inputs' per-token rewards; ``centre_by_group``: its -baseline variant, which first
    subtracts each group's mean reward (Dr. GRPO) so a prompt's difficulty is not in the returns."""
    def compute(inputs: AdvantageInputs) -> tuple[torch.Tensor, None]:
        if centre_by_group:
            inputs = replace(inputs, rewards=dr_grpo_advantages(inputs.rewards, inputs.group_size))
        return reinforce_plus_plus_advantages(inputs.per_token_rewards(), inputs.response_mask), None

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
# REINFORCE++ takes the KL to the reference in its token rewards, as in the paper (and OpenRLHF). Neither variant
# has a group baseline: the returns are whitened over the whole batch (and carry the KL), so an equal-reward group's
# rows get non-zero advantages.
ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus", Estimator(
    _reinforce_plus_plus(False), needs=frozenset({"reference"}), token_rewards=True))
ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus_baseline", Estimator(
    _reinforce_plus_plus(True), needs=frozenset({"reference"}), token_rewards=True))
ADVANTAGE_ESTIMATORS.register("gae", Estimator(_gae, needs=frozenset({"critic"}), token_rewards=True))
# On-policy distillation alone: no sequence-level advantage; the teacher_kl component's per-token term
# (distillation_advantages, added by the update to any estimator's advantages) is all there is.
ADVANTAGE_ESTIMATORS.register("on_policy_distillation", Estimator(
    lambda inputs: (torch.zeros_like(inputs.response_mask, dtype=torch.float), None)))
