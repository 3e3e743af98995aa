"""Tests for rlhf.algorithms against numbers worked out by hand.

Each expected value is a literal; the arithmetic that produced it is in the comment next to it, so a reader can
check the number without trusting the code under test.
"""
from __future__ import annotations

import pytest
import torch

from rlhf.core.algorithms import (
    distillation_advantages,
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    kl_reward,
    clipped_policy_loss,
    dr_grpo_advantages,
    grpo_advantages,
    kl_penalty,
    loss_token_weights,
    masked_mean,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_baseline_advantages,
    rloo_advantages,
    token_logprobs,
    token_returns,
    whiten,
)

T = torch.tensor


def close(actual: torch.Tensor, expected: list, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------- GRPO


def test_grpo_one_group_of_four_is_plus_minus_half_over_unbiased_std():
    # mean = 0.5, centred = [+0.5, -0.5, -0.5, +0.5]
    # unbiased var = (4 * 0.25) / (4 - 1) = 1/3, std = 0.577350
    # advantage = 0.5 / 0.577350 = 0.866025
    adv = grpo_advantages(T([1.0, 0.0, 0.0, 1.0]), group_size=4)
    close(adv, [0.866025, -0.866025, -0.866025, 0.866025])


def test_grpo_two_groups_are_normalised_separately():
    # group 1 [0, 1, 2]: mean 1, centred [-1, 0, 1], var (1 + 0 + 1) / 2 = 1, std 1 -> [-1, 0, 1]
    # group 2 [3, 3, 6]: mean 4, centred [-1, -1, 2], var (1 + 1 + 4) / 2 = 3, std 1.732051
    #                    -> [-1/1.732051, -1/1.732051, 2/1.732051] = [-0.577350, -0.577350, 1.154701]
    adv = grpo_advantages(T([0.0, 1.0, 2.0, 3.0, 3.0, 6.0]), group_size=3)
    close(adv, [-1.0, 0.0, 1.0, -0.577350, -0.577350, 1.154701])


def test_grpo_group_with_equal_rewards_gets_zero_not_nan():
    # group 1 all 2.0: centred [0, 0], std 0 -> 0 / (0 + eps) = 0
    # group 2 [0, 1]: mean 0.5, centred [-0.5, 0.5], var (0.25 + 0.25) / 1 = 0.5, std 0.707107 -> -/+0.707107
    adv = grpo_advantages(T([2.0, 2.0, 0.0, 1.0]), group_size=2)
    assert not torch.isnan(adv).any()
    close(adv, [0.0, 0.0, -0.707107, 0.707107])


def test_grpo_all_rewards_equal_gives_all_zeros():
    adv = grpo_advantages(T([3.0, 3.0, 3.0, 3.0]), group_size=4)
    assert torch.isfinite(adv).all()
    close(adv, [0.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("estimator", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_a_group_of_equal_rewards_gets_exactly_zero_whatever_the_rounding(estimator):
    # Eight 0.7s do not average to exactly 0.7 in float32: centred by the mean they left ~6e-8, which GRPO's
    # division by a std of the same size turned into advantages of 0.056. The other group is [0, 1] x 4.
    adv = estimator(T([0.7] * 8 + [0.0, 1.0] * 4), 8)
    assert adv[:8].eq(0).all()
    assert adv[8:].ne(0).all()


def test_grpo_integer_rewards_give_float_advantages():
    adv = grpo_advantages(T([1, 0, 0, 1]), group_size=4)
    assert adv.dtype == torch.float32
    close(adv, [0.866025, -0.866025, -0.866025, 0.866025])


@pytest.mark.parametrize("estimator", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_advantages_reject_a_size_that_does_not_split_into_groups(estimator):
    with pytest.raises(ValueError, match="groups of 4"):
        estimator(T([1.0, 0.0, 0.0, 1.0, 1.0]), 4)  # 5 rewards, groups of 4


@pytest.mark.parametrize("estimator", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_advantages_reject_a_two_dimensional_reward_tensor(estimator):
    with pytest.raises(ValueError):
        estimator(T([[1.0, 0.0], [0.0, 1.0]]), 2)


def test_dr_grpo_is_mean_centred_only():
    # [1, 0, 0, 1]: mean 0.5 -> [0.5, -0.5, -0.5, 0.5] (no division by std = 0.577)
    close(dr_grpo_advantages(T([1.0, 0.0, 0.0, 1.0]), 4), [0.5, -0.5, -0.5, 0.5])
    # [0, 1, 2 | 3, 3, 6]: means 1 and 4 -> [-1, 0, 1 | -1, -1, 2]
    close(dr_grpo_advantages(T([0.0, 1.0, 2.0, 3.0, 3.0, 6.0]), 3), [-1.0, 0.0, 1.0, -1.0, -1.0, 2.0])


# ------------------------------------------------------------------------------------------------- RLOO


def test_rloo_subtracts_the_mean_of_the_other_samples():
    # [1, 0, 0, 1]: sample 0's others [0, 0, 1] mean 1/3 -> 1 - 1/3 = 0.666667;
    #               sample 1's others [1, 0, 1] mean 2/3 -> 0 - 2/3 = -0.666667; samples 2, 3 by symmetry
    close(rloo_advantages(T([1.0, 0.0, 0.0, 1.0]), 4), [0.666667, -0.666667, -0.666667, 0.666667])


def test_rloo_two_groups_use_their_own_samples_only():
    # group [0, 1, 2]: others' means 1.5, 1.0, 0.5 -> [-1.5, 0.0, 1.5]
    # group [3, 3, 6]: others' means 4.5, 4.5, 3.0 -> [-1.5, -1.5, 3.0]
    close(rloo_advantages(T([0.0, 1.0, 2.0, 3.0, 3.0, 6.0]), 3), [-1.5, 0.0, 1.5, -1.5, -1.5, 3.0])


def test_rloo_is_dr_grpo_scaled_by_n_over_n_minus_one():
    # r_i - (sum - r_i) / (n - 1) = n / (n - 1) * (r_i - mean): [0.5, -0.5, -0.5, 0.5] * 4/3
    rewards = T([1.0, 0.0, 0.0, 1.0])
    close(rloo_advantages(rewards, 4), (dr_grpo_advantages(rewards, 4) * 4 / 3).tolist())


def test_rloo_group_with_equal_rewards_gets_zero_and_a_pair_is_the_difference():
    # [2, 2]: 2 - 2 = 0;  [0, 1]: 0 - 1 = -1 and 1 - 0 = +1
    close(rloo_advantages(T([2.0, 2.0, 0.0, 1.0]), 2), [0.0, 0.0, -1.0, 1.0])


def test_rloo_refuses_groups_of_one():
    with pytest.raises(ValueError, match="2 or more"):
        rloo_advantages(T([1.0, 0.0]), 1)


# ------------------------------------------------------------------------------------------ REINFORCE++


def test_token_returns_without_kl_put_the_reward_on_every_response_token():
    # discount 1 and a single reward at the last token: the return-to-go is the reward on every response token
    mask = T([[0.0, 1.0, 1.0, 1.0],
              [0.0, 0.0, 1.0, 0.0]])
    close(token_returns(T([1.0, 2.0]), mask), [[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 0.0]])


def test_token_returns_subtract_the_kl_penalty_summed_to_go():
    # kl_coef 0.1; the 9s sit off the response and must be ignored.
    # row 0: token rewards at positions 1..3 = -0.05, -0.1, 1 - 0.2 = 0.8
    #        returns: G3 = 0.8, G2 = 0.8 - 0.1 = 0.7, G1 = 0.7 - 0.05 = 0.65
    # row 1: one response token: 2 - 0.1 * 3 = 1.7
    mask = T([[0.0, 1.0, 1.0, 1.0],
              [0.0, 0.0, 1.0, 0.0]])
    kl = T([[9.0, 0.5, 1.0, 2.0],
            [9.0, 9.0, 3.0, 9.0]])
    close(token_returns(T([1.0, 2.0]), mask, kl, kl_coef=0.1), [[0.0, 0.65, 0.7, 0.8], [0.0, 0.0, 1.7, 0.0]])


def test_token_returns_of_a_length_one_response_and_an_all_padding_row():
    # row 0: one token, 3 - 0.5 * 2 = 2.0;  row 1: no response token, so its reward 5 lands nowhere: all 0
    mask = T([[0.0, 0.0, 1.0],
              [0.0, 0.0, 0.0]])
    kl = T([[0.0, 0.0, 2.0],
            [1.0, 1.0, 1.0]])
    close(token_returns(T([3.0, 5.0]), mask, kl, kl_coef=0.5), [[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])


def test_whiten_uses_the_masked_entries_population_std():
    # entries 1, 2, 3: mean 2, population var (1 + 0 + 1) / 3 = 0.666667, std 0.816497
    # -> [-1/0.816497, 0, 1/0.816497] = [-1.224745, 0, 1.224745]; the masked 0 stays 0
    close(whiten(T([[1.0, 2.0, 3.0, 0.0]]), T([[1.0, 1.0, 1.0, 0.0]])), [[-1.224745, 0.0, 1.224745, 0.0]])


def test_whiten_of_equal_values_and_of_an_all_masked_input_is_zero_not_nan():
    close(whiten(T([[4.0, 4.0, 4.0]]), T([[1.0, 1.0, 0.0]])), [[0.0, 0.0, 0.0]])
    out = whiten(T([[4.0, 7.0]]), T([[0.0, 0.0]]))
    assert torch.isfinite(out).all()
    close(out, [[0.0, 0.0]])


def test_reinforce_plus_plus_whitens_over_tokens_not_sequences():
    # rewards [1, 0, 3] over 2, 1 and 3 response tokens -> token values 1, 1, 0, 3, 3, 3
    # token mean 11/6 = 1.833333 (the sequence mean would be 4/3: long responses weigh more)
    # deviations -0.833333 (x2), -1.833333, +1.166667 (x3)
    # population var = (2 * 0.694444 + 3.361111 + 3 * 1.361111) / 6 = 8.833333 / 6 = 1.472222, std 1.213352
    # -> -0.833333 / 1.213352 = -0.686803;  -1.833333 / 1.213352 = -1.510966;  1.166667 / 1.213352 = 0.961524
    mask = T([[1.0, 1.0, 0.0],
              [1.0, 0.0, 0.0],
              [1.0, 1.0, 1.0]])
    adv = reinforce_plus_plus_advantages(T([1.0, 0.0, 3.0]), mask)
    close(adv, [[-0.686803, -0.686803, 0.0], [-1.510966, 0.0, 0.0], [0.961524, 0.961524, 0.961524]])


def test_reinforce_plus_plus_with_kl_in_the_reward():
    # rewards [1, 0], two response tokens each, kl [[1, 1], [0, 0]], kl_coef 0.5
    # returns: row 0: G1 = 1 - 0.5 = 0.5, G0 = 0.5 - 0.5 = 0;  row 1: [0, 0]
    # token values 0, 0.5, 0, 0: mean 0.125, deviations -0.125, 0.375, -0.125, -0.125
    # population var = (3 * 0.015625 + 0.140625) / 4 = 0.046875, std 0.216506
    # -> -0.125 / 0.216506 = -0.577350;  0.375 / 0.216506 = 1.732051
    mask = torch.ones(2, 2)
    adv = reinforce_plus_plus_advantages(T([1.0, 0.0]), mask, kl=T([[1.0, 1.0], [0.0, 0.0]]), kl_coef=0.5)
    close(adv, [[-0.577350, 1.732051], [-0.577350, -0.577350]])


def test_reinforce_plus_plus_all_equal_rewards_give_zeros():
    adv = reinforce_plus_plus_advantages(T([2.0, 2.0, 2.0]), T([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    assert torch.isfinite(adv).all()
    close(adv, [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])


def test_reinforce_plus_plus_leaves_all_padding_rows_out_of_the_statistics():
    # rows 0, 1: token values 1, 1, 0, 0 -> mean 0.5, std 0.5 -> [+1, +1], [-1, -1]
    # row 2 has no response token: its reward 7 changes nothing and it gets 0
    mask = T([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    close(reinforce_plus_plus_advantages(T([1.0, 0.0, 7.0]), mask), [[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])


def test_reinforce_plus_plus_baseline_centres_per_group_then_whitens_over_the_batch():
    # groups [1, 0 | 5, 5], one response token each (responses of length one)
    # group-centred: [0.5, -0.5, 0, 0]; token mean 0; population var (0.25 + 0.25) / 4 = 0.125, std 0.353553
    # -> [0.5 / 0.353553, -0.5 / 0.353553, 0, 0] = [1.414214, -1.414214, 0, 0]
    mask = torch.ones(4, 1)
    adv = reinforce_plus_plus_baseline_advantages(T([1.0, 0.0, 5.0, 5.0]), 2, mask)
    close(adv, [[1.414214], [-1.414214], [0.0], [0.0]])


def test_reinforce_plus_plus_baseline_equal_group_follows_the_batch_statistics():
    # groups [1, 0 | 5, 5] with row 0 three tokens long: token values 0.5, 0.5, 0.5, -0.5, 0, 0
    # mean 1/6 = 0.166667; deviations 0.333333 (x3), -0.666667, -0.166667 (x2)
    # population var = (3 * 0.111111 + 0.444444 + 2 * 0.027778) / 6 = 0.833333 / 6 = 0.138889, std 0.372678
    # -> 0.894427, -1.788854, and -0.447214 for the equal group (centred to 0, then shifted by the batch mean)
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    adv = reinforce_plus_plus_baseline_advantages(T([1.0, 0.0, 5.0, 5.0]), 2, mask)
    close(adv, [[0.894427, 0.894427, 0.894427], [-1.788854, 0.0, 0.0], [-0.447214, 0.0, 0.0],
                [-0.447214, 0.0, 0.0]])


def test_reinforce_plus_plus_baseline_rejects_a_size_that_does_not_split_into_groups():
    with pytest.raises(ValueError, match="groups of 2"):
        reinforce_plus_plus_baseline_advantages(T([1.0, 0.0, 1.0]), 2, torch.ones(3, 1))


# ---------------------------------------------------------------------------------------------- registry

REGISTRY_MASK = T([[0.0, 1.0, 1.0],
                   [0.0, 1.0, 0.0],
                   [1.0, 1.0, 1.0],
                   [0.0, 0.0, 0.0]])  # an all-padding row last


def _estimate(name: str, rewards, mask=REGISTRY_MASK, **inputs):
    advantages, _ = ADVANTAGE_ESTIMATORS[name].compute(AdvantageInputs(rewards, mask, 2, **inputs))
    return advantages


def test_advantage_registry_names_every_estimator_and_what_it_needs():
    needs = {name: set(e.needs) for name, e in ADVANTAGE_ESTIMATORS.items()}
    assert needs == {"grpo": set(), "dr_grpo": set(), "rloo": set(), "reinforce_plus_plus": {"reference"},
                     "reinforce_plus_plus_baseline": {"reference"}, "gae": {"critic"},
                     "on_policy_distillation": set()}


@pytest.mark.parametrize("name, sequence_level", [("grpo", grpo_advantages), ("dr_grpo", dr_grpo_advantages),
                                                  ("rloo", rloo_advantages)])
def test_registry_spreads_sequence_estimators_over_response_tokens(name, sequence_level):
    rewards = T([1.0, 0.0, 0.0, 2.0])
    per_sample = sequence_level(rewards, 2)
    adv = _estimate(name, rewards)
    assert adv.shape == REGISTRY_MASK.shape
    torch.testing.assert_close(adv, per_sample.unsqueeze(1) * REGISTRY_MASK)
    assert (adv[3] == 0).all()  # all padding: no advantage anywhere


def test_registry_grpo_by_hand():
    # groups [1, 0 | 0, 2]: +-0.707107 each (see test_grpo_group_with_equal_rewards_gets_zero_not_nan)
    close(_estimate("grpo", T([1.0, 0.0, 0.0, 2.0])),
          [[0.0, 0.707107, 0.707107], [0.0, -0.707107, 0.0], [-0.707107, -0.707107, -0.707107], [0.0, 0.0, 0.0]])


def test_registry_reinforce_plus_plus_pair_match_the_plain_functions_with_and_without_token_rewards():
    rewards = T([1.0, 0.0, 0.0, 2.0])
    kl = T([[0.0, 0.5, -0.5], [0.0, 1.0, 0.0], [0.2, 0.2, 0.2], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(_estimate("reinforce_plus_plus", rewards),
                               reinforce_plus_plus_advantages(rewards, REGISTRY_MASK))
    torch.testing.assert_close(_estimate("reinforce_plus_plus_baseline", rewards),
                               reinforce_plus_plus_baseline_advantages(rewards, 2, REGISTRY_MASK))
    # A KL in the reward arrives as token rewards -kl_coef * KL_t: the same as the functions' own KL arguments.
    torch.testing.assert_close(_estimate("reinforce_plus_plus", rewards, token_rewards=-0.1 * kl * REGISTRY_MASK),
                               reinforce_plus_plus_advantages(rewards, REGISTRY_MASK, kl, 0.1))
    torch.testing.assert_close(
        _estimate("reinforce_plus_plus_baseline", rewards, token_rewards=-0.1 * kl * REGISTRY_MASK),
        reinforce_plus_plus_baseline_advantages(rewards, 2, REGISTRY_MASK, kl, 0.1))
    # by hand, REINFORCE++: the all-padding row's reward 2 has no token, so the token values are 1, 1, 0, 0, 0, 0
    # mean 2/6 = 0.333333; deviations 0.666667 (x2), -0.333333 (x4)
    # population var = (2 * 0.444444 + 4 * 0.111111) / 6 = 1.333333 / 6 = 0.222222, std 0.471405
    # -> 0.666667 / 0.471405 = 1.414214;  -0.333333 / 0.471405 = -0.707107
    close(_estimate("reinforce_plus_plus", rewards),
          [[0.0, 1.414214, 1.414214], [0.0, -0.707107, 0.0], [-0.707107, -0.707107, -0.707107], [0.0, 0.0, 0.0]])


def test_registry_gae_takes_values_and_token_rewards_from_the_inputs():
    # One row, response at 1-2, reward 1, values 0.25, token rewards -0.1 each, gamma = lam = 1:
    # per-token rewards [-0.1, 0.9] -> returns [0.8, 0.9]; advantages returns - values = [0.55, 0.65].
    mask = T([[0.0, 1.0, 1.0]])
    advantages, returns = ADVANTAGE_ESTIMATORS["gae"].compute(AdvantageInputs(
        T([1.0]), mask, 1, token_rewards=T([[0.0, -0.1, -0.1]]), values=T([[0.0, 0.25, 0.25]])))
    close(returns, [[0.0, 0.8, 0.9]])
    close(advantages, [[0.0, 0.55, 0.65]])
    with pytest.raises(ValueError, match="critic"):
        ADVANTAGE_ESTIMATORS["gae"].compute(AdvantageInputs(T([1.0]), mask, 1))


def test_k1_in_the_reward_gives_the_gradient_of_kl_and_k3_does_not():
    """The expected score-function gradient of a KL penalty put in the reward, E_pi[kl(x) grad log pi(x)], on a
    7-way categorical near its reference: k1 (kl_reward) is exactly grad KL(pi || ref); k3 is about 0 there."""
    torch.manual_seed(0)
    ref = torch.log_softmax(torch.randn(7, dtype=torch.float64), 0)
    logits = (ref + 0.05 * torch.randn(7, dtype=torch.float64)).requires_grad_(True)
    logp = torch.log_softmax(logits, 0)
    (kl_grad,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), logits, retain_graph=True)

    def reward_gradient(per_token: torch.Tensor) -> torch.Tensor:
        # E_pi[-r(x) grad log pi(x)] for the penalty r = -kl_coef * kl: the loss gradient REINFORCE takes.
        (grad,) = torch.autograd.grad((logp.exp().detach() * -per_token.detach() * logp).sum(), logits,
                                      retain_graph=True)
        return grad

    k1 = reward_gradient(kl_reward(logp, ref, torch.ones(7), 1.0))
    k3 = reward_gradient(-kl_penalty(logp, ref, "k3"))
    assert torch.allclose(k1, kl_grad, atol=1e-12)
    assert (k3 - kl_grad).norm() / kl_grad.norm() > 0.9  # k3 in the reward: nearly no regularisation at all


# ---------------------------------------------------------------------------------------------------- KL


def test_kl_estimators_when_policy_is_likelier_than_reference():
    # logp = -1, ref = -2: log_ratio = 1
    # k1 = 1;  k2 = 0.5 * 1^2 = 0.5;  k3 = exp(-1) - (-1) - 1 = 0.367879
    logp, ref = T([-1.0]), T([-2.0])
    close(kl_penalty(logp, ref, "k1"), [1.0])
    close(kl_penalty(logp, ref, "k2"), [0.5])
    close(kl_penalty(logp, ref, "k3"), [0.367879])


def test_kl_estimators_when_reference_is_likelier_than_policy():
    # logp = -2, ref = -1: log_ratio = -1
    # k1 = -1 (k1 can be negative);  k2 = 0.5 * (-1)^2 = 0.5;  k3 = exp(1) - 1 - 1 = 0.718282
    logp, ref = T([-2.0]), T([-1.0])
    close(kl_penalty(logp, ref, "k1"), [-1.0])
    close(kl_penalty(logp, ref, "k2"), [0.5])
    close(kl_penalty(logp, ref, "k3"), [0.718282])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_is_zero_when_policy_equals_reference(estimator):
    logp = T([-0.3, -5.0, 0.0])
    close(kl_penalty(logp, logp.clone(), estimator), [0.0, 0.0, 0.0])


def test_kl_default_estimator_is_k3():
    close(kl_penalty(T([-1.0]), T([-2.0])), [0.367879])


def test_k3_is_non_negative_and_finite_for_extreme_log_ratios():
    # log_ratio = logp - ref over +-1e4 and +-100: exp(-log_ratio) would overflow float32 (exp(1e4) = inf)
    # without the clamp at 20; with it, the worst value is exp(20) - 20 - 1 = 4.85e8.
    logp = T([-1e4, 0.0, -100.0, 0.0, -30.0])
    ref = T([0.0, -1e4, 0.0, -100.0, -30.0])
    k3 = kl_penalty(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    assert (k3 >= 0).all()
    # ref = -100, logp = 0: log_ratio = 100, k3 = exp(-100) + 100 - 1 = 99.0
    assert k3[3].item() == pytest.approx(99.0)
    assert k3[4].item() == 0.0


def test_unknown_kl_estimator_is_refused():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(T([0.0]), T([0.0]), "k4")


# ------------------------------------------------------------------------------------------- policy loss


def _loss(ratios, advantages, **clip):
    # logprobs = log(ratio), old_logprobs = 0, so exp(logprobs - old) is exactly the ratio we want.
    logprobs = torch.log(T(ratios))
    return clipped_policy_loss(logprobs, torch.zeros_like(logprobs), T(advantages), **clip)


def test_policy_loss_inside_the_clip_range_is_minus_advantage_times_ratio():
    # ratio 1.1, A = +1: -1 * 1.1 = -1.1;   ratio 0.9, A = -2: +2 * 0.9 = 1.8  (both inside [0.8, 1.2])
    loss, clipped = _loss([1.1, 0.9], [1.0, -2.0])
    close(loss, [-1.1, 1.8])
    close(clipped, [0.0, 0.0])


def test_policy_loss_clips_a_ratio_above_range_for_positive_advantage():
    # ratio 1.5, A = +1: unclipped -1.5, clipped -1 * 1.2 = -1.2; max = -1.2, clip active
    loss, clipped = _loss([1.5], [1.0])
    close(loss, [-1.2])
    close(clipped, [1.0])


def test_policy_loss_clips_a_ratio_below_range_for_negative_advantage():
    # ratio 0.5, A = -1: unclipped 0.5, clipped 1 * 0.8 = 0.8; max = 0.8, clip active
    loss, clipped = _loss([0.5], [-1.0])
    close(loss, [0.8])
    close(clipped, [1.0])


def test_policy_loss_does_not_clip_when_clipping_would_lower_the_loss():
    # ratio 0.5, A = +1: unclipped -0.5, clipped -0.8 -> max = -0.5 (the pessimistic bound), no clip
    # ratio 1.5, A = -1: unclipped 1.5, clipped 1.2 -> max = 1.5, no clip
    loss, clipped = _loss([0.5, 1.5], [1.0, -1.0])
    close(loss, [-0.5, 1.5])
    close(clipped, [0.0, 0.0])


def test_policy_loss_with_clip_higher_uses_separate_upper_and_lower_bounds():
    # clip_low 0.2, clip_high 0.28: range [0.8, 1.28]
    # ratio 1.25, A = +1: inside -> -1.25 (with symmetric 0.2 it would clip to -1.2)
    # ratio 1.5,  A = +1: clipped to -1.28
    # ratio 0.75, A = -1: clipped to 0.8 (the lower bound is still 1 - 0.2)
    loss, clipped = _loss([1.25, 1.5, 0.75], [1.0, 1.0, -1.0], clip_low=0.2, clip_high=0.28)
    close(loss, [-1.25, -1.28, 0.8])
    close(clipped, [0.0, 1.0, 1.0])
    symmetric, was_clipped = _loss([1.25], [1.0])
    close(symmetric, [-1.2])
    close(was_clipped, [1.0])


def test_policy_loss_gradient_is_zero_on_clipped_tokens_only():
    # d/dlogp of -A * exp(logp - old) = -A * ratio on unclipped tokens; 0 where the clamp is active.
    # ratio 1.1, A = 1 -> -1.1;   ratio 1.5, A = 1 (clipped) -> 0
    logprobs = torch.log(T([1.1, 1.5])).requires_grad_()
    loss, _ = clipped_policy_loss(logprobs, torch.zeros(2), T([1.0, 1.0]))
    loss.sum().backward()
    close(logprobs.grad, [-1.1, 0.0])


# ------------------------------------------------------------------------------------------- aggregation

MASK_2x4 = T([[1.0, 1.0, 1.0, 0.0],
              [1.0, 0.0, 0.0, 0.0]])


def test_token_mean_weights_every_response_token_equally():
    # 4 response tokens in the batch -> 1/4 = 0.25 each
    close(loss_token_weights(MASK_2x4, "token-mean", 4), [[0.25, 0.25, 0.25, 0.0], [0.25, 0.0, 0.0, 0.0]])


def test_seq_mean_weights_every_sequence_equally():
    # row 0: 3 tokens -> 1/3 / 2 rows = 0.166667 each;  row 1: 1 token -> 1/1 / 2 = 0.5
    w = loss_token_weights(MASK_2x4, "seq-mean", 4)
    close(w, [[0.166667, 0.166667, 0.166667, 0.0], [0.5, 0.0, 0.0, 0.0]])


def test_dr_grpo_weights_use_a_constant_normaliser():
    # 1 / (B * max_response_tokens) = 1 / (2 * 4) = 0.125 on every response token, whatever the length
    close(loss_token_weights(MASK_2x4, "dr-grpo", 4), [[0.125, 0.125, 0.125, 0.0], [0.125, 0.0, 0.0, 0.0]])


def test_all_padding_row_gets_zero_weights_and_no_nan():
    mask = T([[1.0, 1.0, 0.0, 0.0],
              [0.0, 0.0, 0.0, 0.0]])
    # token-mean: 2 tokens -> 0.5 each;  seq-mean: 1/2 / 2 rows = 0.25 (the empty row still counts as a row);
    # dr-grpo: 1 / (2 * 4) = 0.125
    expected = {"token-mean": 0.5, "seq-mean": 0.25, "dr-grpo": 0.125}
    for mode, value in expected.items():
        w = loss_token_weights(mask, mode, 4)
        assert torch.isfinite(w).all(), mode
        close(w, [[value, value, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean", "dr-grpo"])
def test_an_all_padding_batch_gets_zero_weights_and_no_nan(mode):
    w = loss_token_weights(torch.zeros(2, 3), mode, 3)
    assert torch.isfinite(w).all()
    close(w, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_response_of_length_one():
    mask = T([[0.0, 0.0, 1.0]])  # prompt of 2 tokens, one response token
    close(loss_token_weights(mask, "token-mean", 3), [[0.0, 0.0, 1.0]])  # 1 / 1 token
    close(loss_token_weights(mask, "seq-mean", 3), [[0.0, 0.0, 1.0]])  # 1 / 1 token / 1 row
    close(loss_token_weights(mask, "dr-grpo", 3), [[0.0, 0.0, 0.333333]])  # 1 / (1 row * 3)


def test_integer_mask_is_accepted():
    close(loss_token_weights(MASK_2x4.long(), "token-mean", 4), [[0.25, 0.25, 0.25, 0.0], [0.25, 0.0, 0.0, 0.0]])


def test_unknown_loss_aggregation_is_refused():
    with pytest.raises(ValueError, match="sum-mean"):
        loss_token_weights(MASK_2x4, "sum-mean", 4)


def test_whole_batch_weights_make_the_loss_the_sum_of_shard_sums():
    # Contract: weights are computed once for the whole batch; each shard (rank / micro-batch) sums w * x over
    # its rows, and the shard sums add up to the whole-batch loss.
    mask = T([[1.0, 0.0, 0.0],
              [1.0, 1.0, 1.0]])
    x = T([[4.0, 0.0, 0.0],
           [1.0, 2.0, 3.0]])
    # token-mean: (4 + 1 + 2 + 3) / 4 tokens = 2.5;  shard sums 4/4 = 1.0 and 6/4 = 1.5 -> 2.5
    # seq-mean:   (4/1 + 6/3) / 2 rows = 3.0;          shard sums 4/1/2 = 2.0 and 6/3/2 = 1.0 -> 3.0
    # dr-grpo:    10 / (2 rows * 3) = 1.666667;        shard sums 4/6 = 0.666667 and 6/6 = 1.0 -> 1.666667
    expected = {"token-mean": (2.5, [1.0, 1.5]), "seq-mean": (3.0, [2.0, 1.0]), "dr-grpo": (1.666667, [0.666667, 1.0])}
    for mode, (total, shard_sums) in expected.items():
        w = loss_token_weights(mask, mode, 3)
        assert (w * x).sum().item() == pytest.approx(total, abs=1e-5), mode
        shards = [(w[i:i + 1] * x[i:i + 1]).sum().item() for i in range(2)]
        assert shards == pytest.approx(shard_sums, abs=1e-5), mode
        assert sum(shards) == pytest.approx(total, abs=1e-5), mode


def test_per_shard_token_mean_weights_would_give_a_different_loss():
    # Why the weights must be whole-batch: token-mean per shard gives 4/1 = 4.0 and 6/3 = 2.0, averaged = 3.0,
    # not the whole-batch 2.5 of the test above.
    mask = T([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    x = T([[4.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    per_shard = [(loss_token_weights(mask[i:i + 1], "token-mean", 3) * x[i:i + 1]).sum().item() for i in range(2)]
    assert per_shard == pytest.approx([4.0, 2.0])
    assert sum(per_shard) / 2 == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------- helpers


def test_masked_mean_averages_only_unmasked_values():
    # (1 + 3) / 2 = 2.0
    assert masked_mean(T([1.0, 2.0, 3.0, 4.0]), T([1, 0, 1, 0])).item() == pytest.approx(2.0)
    # 2-D: (1 + 2 + 6) / 3 = 3.0
    assert masked_mean(T([[1.0, 2.0], [5.0, 6.0]]), T([[1, 1], [0, 1]])).item() == pytest.approx(3.0)


def test_masked_mean_of_all_masked_is_zero_not_nan():
    value = masked_mean(T([1.0, 2.0]), T([0, 0]))
    assert value.item() == 0.0


def test_token_logprobs_on_hand_made_logits():
    # B = 1, L = 3, V = 2, input_ids = [0, 1, 1]
    # position 0: no previous token -> 0
    # position 1: logits at 0 are [0, 0] -> log softmax of token 1 = log(1/2) = -0.693147
    # position 2: logits at 1 are [2, 0] -> log softmax of token 1 = 0 - log(e^2 + 1) = -log(8.389056) = -2.126928
    # the logits at the last position predict a token that is not there and are ignored
    logits = T([[[0.0, 0.0], [2.0, 0.0], [100.0, -100.0]]])
    out = token_logprobs(logits, torch.tensor([[0, 1, 1]]))
    assert out.shape == (1, 3)
    close(out, [[0.0, -0.693147, -2.126928]])


def test_token_logprobs_takes_half_precision_logits_in_float32():
    # Same as above, in bfloat16 in: the result is float32. Position 1 reads token 0 this time:
    # logits [2, 0] -> 2 - log(e^2 + 1) = 2 - 2.126928 = -0.126928
    logits = T([[[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]], dtype=torch.bfloat16)
    out = token_logprobs(logits, torch.tensor([[1, 1, 0]]))
    assert out.dtype == torch.float32
    close(out, [[0.0, -0.693147, -0.126928]], atol=1e-3)



def test_distillation_advantages_centre_each_tokens_own_log_ratio():
    student = T([[0.0, -0.2, -0.4, -1.0], [0.0, -0.1, -3.0, 0.0]])
    teacher = T([[0.0, -0.2, -2.4, -1.0], [0.0, -0.6, -0.5, 0.0]])
    mask = T([[0, 1, 1, 1], [0, 1, 1, 0]])
    # Log-ratios on the response: [0, -2, 0] and [-0.5, 2.5]; their mean 0/5 = 0: each token keeps its own.
    torch.testing.assert_close(distillation_advantages(student, teacher, mask, 2.0),
                               T([[0.0, 0.0, -4.0, 0.0], [0.0, -1.0, 5.0, 0.0]]))
    # A teacher below the student everywhere by 1: every token equally worse, nothing to prefer.
    assert distillation_advantages(student, student - 1.0, mask, 1.0).abs().max() == 0
