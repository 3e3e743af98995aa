"""Advantage estimators (rlhf/core/algorithms/advantages.py) against numbers worked out by hand.

Each expected value is a literal; the arithmetic that produced it is in the comment next to it, so a reader can
check the number without trusting the code under test.
"""
from __future__ import annotations

import pytest
import torch

from rlhf.core.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    dr_grpo_advantages,
    grpo_advantages,
    reinforce_plus_plus_advantages,
    returns_to_go,
    rloo_advantages,
    token_rewards,
    whiten,
)
from tests.numeric import T, close


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


def test_returns_to_go_without_kl_put_the_reward_on_every_response_token():
    # discount 1 and a single reward at the last token: the return-to-go is the reward on every response token
    mask = T([[0.0, 1.0, 1.0, 1.0],
              [0.0, 0.0, 1.0, 0.0]])
    close(returns_to_go(token_rewards(T([1.0, 2.0]), mask), mask), [[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 0.0]])


def test_returns_to_go_subtract_the_kl_penalty_summed_to_go():
    # kl_coef 0.1; the 9s sit off the response and must be ignored.
    # row 0: token rewards at positions 1..3 = -0.05, -0.1, 1 - 0.2 = 0.8
    #        returns: G3 = 0.8, G2 = 0.8 - 0.1 = 0.7, G1 = 0.7 - 0.05 = 0.65
    # row 1: one response token: 2 - 0.1 * 3 = 1.7
    mask = T([[0.0, 1.0, 1.0, 1.0],
              [0.0, 0.0, 1.0, 0.0]])
    kl = T([[9.0, 0.5, 1.0, 2.0],
            [9.0, 9.0, 3.0, 9.0]])
    close(returns_to_go(token_rewards(T([1.0, 2.0]), mask, kl, kl_coef=0.1), mask), [[0.0, 0.65, 0.7, 0.8], [0.0, 0.0, 1.7, 0.0]])


def test_returns_to_go_of_a_length_one_response_and_an_all_padding_row():
    # row 0: one token, 3 - 0.5 * 2 = 2.0;  row 1: no response token, so its reward 5 lands nowhere: all 0
    mask = T([[0.0, 0.0, 1.0],
              [0.0, 0.0, 0.0]])
    kl = T([[0.0, 0.0, 2.0],
            [1.0, 1.0, 1.0]])
    close(returns_to_go(token_rewards(T([3.0, 5.0]), mask, kl, kl_coef=0.5), mask), [[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])


def test_whiten_uses_the_masked_entries_population_std():
    # entries 1, 2, 3: mean 2, population var (1 + 0 + 1) / 3 = 0.666667, std 0.816497
    # -> [-1/0.816497, 0, 1/0.816497] = [-1.224745, 0, 1.224745]; the masked 0 stays 0
    close(whiten(T([[1.0, 2.0, 3.0, 0.0]]), T([[1.0, 1.0, 1.0, 0.0]])), [[-1.224745, 0.0, 1.224745, 0.0]])


def test_whiten_of_equal_values_and_of_an_all_masked_input_is_zero_not_nan():
    close(whiten(T([[4.0, 4.0, 4.0]]), T([[1.0, 1.0, 0.0]])), [[0.0, 0.0, 0.0]])
    out = whiten(T([[4.0, 7.0]]), T([[0.0, 0.0]]))
    assert torch.isfinite(out).all()
    close(out, [[0.0, 0.0]])


def _reinforce_plus_plus(rewards, mask, kl=None, kl_coef=0.0):
    return reinforce_plus_plus_advantages(token_rewards(rewards, mask, kl, kl_coef), mask)


def test_reinforce_plus_plus_whitens_over_tokens_not_sequences():
    # rewards [1, 0, 3] over 2, 1 and 3 response tokens -> token values 1, 1, 0, 3, 3, 3
    # token mean 11/6 = 1.833333 (the sequence mean would be 4/3: long responses weigh more)
    # deviations -0.833333 (x2), -1.833333, +1.166667 (x3)
    # population var = (2 * 0.694444 + 3.361111 + 3 * 1.361111) / 6 = 8.833333 / 6 = 1.472222, std 1.213352
    # -> -0.833333 / 1.213352 = -0.686803;  -1.833333 / 1.213352 = -1.510966;  1.166667 / 1.213352 = 0.961524
    mask = T([[1.0, 1.0, 0.0],
              [1.0, 0.0, 0.0],
              [1.0, 1.0, 1.0]])
    adv = _reinforce_plus_plus(T([1.0, 0.0, 3.0]), mask)
    close(adv, [[-0.686803, -0.686803, 0.0], [-1.510966, 0.0, 0.0], [0.961524, 0.961524, 0.961524]])


def test_reinforce_plus_plus_with_kl_in_the_reward():
    # rewards [1, 0], two response tokens each, kl [[1, 1], [0, 0]], kl_coef 0.5
    # returns: row 0: G1 = 1 - 0.5 = 0.5, G0 = 0.5 - 0.5 = 0;  row 1: [0, 0]
    # token values 0, 0.5, 0, 0: mean 0.125, deviations -0.125, 0.375, -0.125, -0.125
    # population var = (3 * 0.015625 + 0.140625) / 4 = 0.046875, std 0.216506
    # -> -0.125 / 0.216506 = -0.577350;  0.375 / 0.216506 = 1.732051
    mask = torch.ones(2, 2)
    adv = _reinforce_plus_plus(T([1.0, 0.0]), mask, kl=T([[1.0, 1.0], [0.0, 0.0]]), kl_coef=0.5)
    close(adv, [[-0.577350, 1.732051], [-0.577350, -0.577350]])


def test_reinforce_plus_plus_all_equal_rewards_give_zeros():
    adv = _reinforce_plus_plus(T([2.0, 2.0, 2.0]), T([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    assert torch.isfinite(adv).all()
    close(adv, [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])


def test_reinforce_plus_plus_leaves_all_padding_rows_out_of_the_statistics():
    # rows 0, 1: token values 1, 1, 0, 0 -> mean 0.5, std 0.5 -> [+1, +1], [-1, -1]
    # row 2 has no response token: its reward 7 changes nothing and it gets 0
    mask = T([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    close(_reinforce_plus_plus(T([1.0, 0.0, 7.0]), mask), [[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])


def test_reinforce_plus_plus_baseline_centres_per_group_then_whitens_over_the_batch():
    # groups [1, 0 | 5, 5], one response token each (responses of length one)
    # group-centred: [0.5, -0.5, 0, 0]; token mean 0; population var (0.25 + 0.25) / 4 = 0.125, std 0.353553
    # -> [0.5 / 0.353553, -0.5 / 0.353553, 0, 0] = [1.414214, -1.414214, 0, 0]
    mask = torch.ones(4, 1)
    adv = _estimate("reinforce_plus_plus_baseline", T([1.0, 0.0, 5.0, 5.0]), mask)
    close(adv, [[1.414214], [-1.414214], [0.0], [0.0]])


def test_reinforce_plus_plus_baseline_equal_group_follows_the_batch_statistics():
    # groups [1, 0 | 5, 5] with row 0 three tokens long: token values 0.5, 0.5, 0.5, -0.5, 0, 0
    # mean 1/6 = 0.166667; deviations 0.333333 (x3), -0.666667, -0.166667 (x2)
    # population var = (3 * 0.111111 + 0.444444 + 2 * 0.027778) / 6 = 0.833333 / 6 = 0.138889, std 0.372678
    # -> 0.894427, -1.788854, and -0.447214 for the equal group (centred to 0, then shifted by the batch mean)
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    adv = _estimate("reinforce_plus_plus_baseline", T([1.0, 0.0, 5.0, 5.0]), mask)
    close(adv, [[0.894427, 0.894427, 0.894427], [-1.788854, 0.0, 0.0], [-0.447214, 0.0, 0.0],
                [-0.447214, 0.0, 0.0]])


def test_reinforce_plus_plus_baseline_rejects_a_size_that_does_not_split_into_groups():
    with pytest.raises(ValueError, match="groups of 2"):
        _estimate("reinforce_plus_plus_baseline", T([1.0, 0.0, 1.0]), torch.ones(3, 1))


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


def test_registry_reinforce_plus_plus_takes_the_kl_as_token_rewards_and_its_baseline_centres_groups():
    rewards = T([1.0, 0.0, 0.0, 2.0])
    kl = T([[0.0, 0.5, -0.5], [0.0, 1.0, 0.0], [0.2, 0.2, 0.2], [0.0, 0.0, 0.0]])
    # A KL in the reward arrives as token rewards -kl_coef * KL_t, the same per-token rewards token_rewards makes.
    torch.testing.assert_close(_estimate("reinforce_plus_plus", rewards, token_rewards=-0.1 * kl * REGISTRY_MASK),
                               _reinforce_plus_plus(rewards, REGISTRY_MASK, kl, 0.1))
    # The -baseline variant is REINFORCE++ on group-centred rewards: [0.5, -0.5 | -1, 1].
    torch.testing.assert_close(_estimate("reinforce_plus_plus_baseline", rewards),
                               _reinforce_plus_plus(T([0.5, -0.5, -1.0, 1.0]), REGISTRY_MASK))
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
