"""PPO with a critic: GAE, the clipped value loss, the PPO config options and the PPO step (actors stubbed).

Expected values are literals worked out by hand in the comments beside them.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf.core.algorithms.advantages import gae_advantages, returns_to_go, token_rewards, whiten
from rlhf.core.algorithms.value_loss import clipped_value_loss
from rlhf.core.config.run_config import ConfigError, load_config
from rlhf.core.guards import NonFiniteError
from tests.loop_stubs import StubCritic, stub_loop
from tests.numeric import T, close


# -------------------------------------------------------------------------------------------- token rewards


def test_token_rewards_put_the_reward_on_the_last_response_token_minus_the_kl_penalty():
    # row 0: response at positions 1-2; reward 1 on position 2; KL penalty 0.5 * [0.1, 0.2] on positions 1, 2:
    #   [0, -0.05, 1 - 0.1] = [0, -0.05, 0.9]
    # row 1: no response tokens: its reward 3 has nowhere to go, and the KL off the response is ignored.
    mask = T([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    kl = T([[9.0, 0.1, 0.2], [1.0, 1.0, 1.0]])
    close(token_rewards(T([1.0, 3.0]), mask, kl, 0.5), [[0.0, -0.05, 0.9], [0.0, 0.0, 0.0]])
    close(token_rewards(T([1.0, 3.0]), mask), [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])


# ------------------------------------------------------------------------------------------------------ GAE


def test_gae_by_hand_with_discount_and_trace_decay():
    # gamma 0.9, lam 0.5, rewards [0, 0, 1], values [0.2, 0.4, 0.5], terminal after the last token:
    #   delta_2 = 1 + 0.9 * 0 - 0.5 = 0.5                 A_2 = 0.5
    #   delta_1 = 0 + 0.9 * 0.5 - 0.4 = 0.05              A_1 = 0.05 + 0.45 * 0.5 = 0.275
    #   delta_0 = 0 + 0.9 * 0.4 - 0.2 = 0.16              A_0 = 0.16 + 0.45 * 0.275 = 0.28375
    #   returns = A + V = [0.48375, 0.675, 1.0]
    advantages, returns = gae_advantages(T([[0.0, 0.0, 1.0]]), T([[0.2, 0.4, 0.5]]), T([[1.0, 1.0, 1.0]]),
                                         gamma=0.9, lam=0.5)
    close(advantages, [[0.28375, 0.275, 0.5]])
    close(returns, [[0.48375, 0.675, 1.0]])


def test_gae_with_lam_zero_is_the_one_step_td_error():
    # The deltas of the test above: [0.16, 0.05, 0.5].
    advantages, _ = gae_advantages(T([[0.0, 0.0, 1.0]]), T([[0.2, 0.4, 0.5]]), T([[1.0, 1.0, 1.0]]),
                                   gamma=0.9, lam=0.0)
    close(advantages, [[0.16, 0.05, 0.5]])


def test_gae_with_gamma_and_lam_one_is_the_return_minus_the_value():
    # Prompt at position 0, response at 1-3, reward 1: returns-to-go [_, 1, 1, 1], values [_, 0.5, 0.6, 0.8]
    #   A = [0, 0.5, 0.4, 0.2]; a value on the prompt position is ignored.
    advantages, returns = gae_advantages(T([[0.0, 0.0, 0.0, 1.0]]), T([[7.0, 0.5, 0.6, 0.8]]),
                                         T([[0.0, 1.0, 1.0, 1.0]]), gamma=1.0, lam=1.0)
    close(advantages, [[0.0, 0.5, 0.4, 0.2]])
    close(returns, [[0.0, 1.0, 1.0, 1.0]])


def test_gae_with_gamma_and_lam_one_equals_returns_to_go_minus_values_on_a_random_batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(5, 9)
    for row, (start, length) in enumerate([(2, 4), (1, 7), (3, 1), (0, 0), (4, 5)]):
        mask[row, start:start + length] = 1.0
    rewards, values, kl = torch.randn(5, generator=g), torch.randn(5, 9, generator=g), torch.rand(5, 9, generator=g)
    advantages, returns = gae_advantages(token_rewards(rewards, mask, kl, 0.3), values, mask, 1.0, 1.0)
    expected_returns = returns_to_go(token_rewards(rewards, mask, kl, 0.3), mask)
    torch.testing.assert_close(returns, expected_returns)
    torch.testing.assert_close(advantages, (expected_returns - values) * mask)


def test_gae_of_a_length_one_response_and_an_all_padding_row():
    # Row 0: one response token (position 2), reward 2, value 0.5: A = 2 - 0.5 = 1.5 whatever gamma and lam.
    # Row 1: all padding: all 0, whatever the values and rewards hold there.
    mask = T([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rewards = T([[0.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    values = T([[3.0, 3.0, 0.5, 3.0], [0.4, 0.4, 0.4, 0.4]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    close(advantages, [[0.0, 0.0, 1.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    close(returns, [[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_gae_rows_are_independent_and_the_terminal_value_is_zero():
    # Two rows side by side give the same as each alone; the last response token's next value is 0 even when
    # padding after it carries a value.
    mask = T([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    rewards = T([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    values = T([[0.3, 0.6, 5.0], [5.0, 0.1, 0.2]])
    both, _ = gae_advantages(rewards, values, mask, 0.9, 0.8)
    for row in range(2):
        alone, _ = gae_advantages(rewards[row:row + 1], values[row:row + 1], mask[row:row + 1], 0.9, 0.8)
        torch.testing.assert_close(both[row:row + 1], alone)
    # row 0: A_1 = 1 - 0.6 = 0.4; A_0 = (0 + 0.9 * 0.6 - 0.3) + 0.72 * 0.4 = 0.24 + 0.288 = 0.528
    close(both[0], [0.528, 0.4, 0.0])


def test_whitened_gae_advantages_have_mean_zero_and_unit_std_on_the_response():
    mask = T([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, _ = gae_advantages(T([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), T([[0.0, 0.2, 0.1], [0.3, 0.5, 0.0]]),
                                   mask)
    white = whiten(advantages, mask)
    on = mask.bool()
    assert abs(white[on].mean().item()) < 1e-6
    assert abs(white[on].std(unbiased=False).item() - 1.0) < 1e-4
    assert (white[~on] == 0).all()


# ----------------------------------------------------------------------------------------------- value loss


def test_clipped_value_loss_by_hand():
    # clip 0.2 around old values 0.5:
    #   V = 1.0 -> clipped to 0.7; (1 - 2)^2 = 1, (0.7 - 2)^2 = 1.69: the clipped term wins, 0.5 * 1.69 = 0.845
    #   V = 0.0 -> clipped to 0.3; (0 - 1)^2 = 1, (0.3 - 1)^2 = 0.49: the unclipped term wins, 0.5
    #   V = 0.5 (unchanged):       (0.5 - 0)^2 = 0.25 both, 0.125, not counted as clipped
    values, old, returns = T([1.0, 0.0, 0.5]), T([0.5, 0.5, 0.5]), T([2.0, 1.0, 0.0])
    loss, clipped = clipped_value_loss(values, old, returns, 0.2)
    close(loss, [0.845, 0.5, 0.125])
    close(clipped, [1.0, 0.0, 0.0])
    plain, never = clipped_value_loss(values, old, returns, 0.0)
    close(plain, [0.5, 0.5, 0.125])
    close(never, [0.0, 0.0, 0.0])


def test_clipped_value_loss_gradient_is_zero_where_the_clip_is_active():
    # Token 0: the clipped value (saturated) is the larger term, so no gradient; token 1: d/dV 0.5 (V - R)^2 =
    # V - R = -1; token 2: 0.5 - 0 = 0.5.
    values = T([1.0, 0.0, 0.5], requires_grad=True)
    loss, _ = clipped_value_loss(values, T([0.5, 0.5, 0.5]), T([2.0, 1.0, 0.0]), 0.2)
    loss.sum().backward()
    close(values.grad, [0.0, -1.0, 0.5])


# ---------------------------------------------------------------------------------------------------- config


def test_ppo_config_defaults_and_fields():
    a = load_config(None, ["algorithm.advantage=gae", "algorithm.critic_warmup_steps=3", "critic.lr=5e-5"])
    assert a.algorithm.advantage == "gae" and a.algorithm.critic_warmup_steps == 3 and a.critic.lr == 5e-5
    assert (a.algorithm.gamma, a.algorithm.lam, a.algorithm.value_clip, a.algorithm.kl_in_reward) == (
        1.0, 1.0, 0.2, False)


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.kl_in_reward=true", "algorithm.kl_coef=0.01"], "per-token rewards, which grpo does not take"),
    (["algorithm.critic_warmup_steps=2"], "critic_warmup_steps needs an estimator with a critic"),
    (["algorithm.advantage=gae", "algorithm.kl_in_reward=true"], "kl_in_reward needs kl_coef"),
    (["algorithm.advantage=gae", "algorithm.dynamic_sampling=true"], "dynamic_sampling"),
    (["algorithm.advantage=gae", "algorithm.steps=5", "algorithm.critic_warmup_steps=5"], "no policy update"),
    (["algorithm.advantage=gae", "algorithm.gamma=1.5"], "algorithm.gamma"),
    (["algorithm.advantage=gae", "algorithm.lam=-0.1"], "algorithm.lam"),
    (["algorithm.advantage=gae", "algorithm.value_clip=-1"], "algorithm.value_clip"),
    (["algorithm.advantage=gae", "critic.num_ranks=3"], "critic.num_ranks=3"),
    (["algorithm.advantage=ppo"], "unknown advantage estimator 'ppo'"),
])
def test_bad_ppo_combinations_are_refused_with_one_line(overrides, key):
    with pytest.raises(ConfigError, match=key) as err:
        load_config(None, ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", *overrides])
    assert "\n" not in str(err.value)


def test_critic_ranks_are_only_checked_for_ppo():
    assert load_config(None, ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
                              "critic.num_ranks=3"]).critic.num_ranks == 3


# ---------------------------------------------------------------------------- the PPO step, actors stubbed


def _ppo_loop(overrides: list[str], rewards: list[float], lengths: list[int]):
    """An RLStep with gae over stand-ins for the actors: 2 prompts x 2 samples (prompt one token, responses of the
    given lengths, sampling log-prob -0.5 per token), critic values 0.25 everywhere."""
    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "trainer.num_ranks=2",
                             "rollout.max_new_tokens=4", "algorithm.advantage=gae", *overrides])
    return stub_loop(cfg, rewards, lengths, critic=StubCritic())


ROWS = [SimpleNamespace(prompt=f"p{i}", answer="1", difficulty=None) for i in range(2)]


def test_ppo_step_trains_the_critic_on_gae_returns_and_the_policy_on_the_advantages():
    loop = _ppo_loop(["algorithm.lam=1.0", "algorithm.whiten_advantages=false"], [1.0, 0.0, 1.0, 0.0],
                     [2, 1, 3, 2])
    metrics = loop.step(1, ROWS)
    critic, policy = loop.update.critic.batches[0], loop.update.policy.batches[0]
    # Row 0: prompt at 0, response at 1-2, reward 1: returns [0, 1, 1, 0], advantages 1 - 0.25 = 0.75 there.
    close(critic.returns[0], [0.0, 1.0, 1.0, 0.0])
    close(critic.old_values[0], [0.0, 0.25, 0.25, 0.0])
    close(policy.advantages[0], [0.0, 0.75, 0.75, 0.0])
    # Row 1: one response token, reward 0: advantage -0.25.
    close(policy.advantages[1], [0.0, -0.25, 0.0, 0.0])
    # The value loss counts every response token equally (8 of them).
    close(critic.loss_weights[2], [0.0, 0.125, 0.125, 0.125])
    assert loop.rollout.synced == 1 and metrics["charts/weights_version"] == 1 and metrics["charts/policy_frozen"] == 0.0
    assert metrics["charts/values_mean"] == pytest.approx(0.25)
    assert metrics["charts/returns_mean"] == pytest.approx(5 / 8)  # returns 1 on rows 0 and 2 (2 + 3 tokens)


def test_ppo_critic_warmup_freezes_the_policy_and_its_weights():
    loop = _ppo_loop(["algorithm.steps=4", "algorithm.critic_warmup_steps=2"], [1.0, 0.0, 1.0, 0.0], [2, 1, 3, 2])
    frozen = [loop.step(step, ROWS)["charts/policy_frozen"] for step in (1, 2, 3)]
    assert frozen == [1.0, 1.0, 0.0]
    assert len(loop.update.critic.batches) == 3 and len(loop.update.policy.batches) == 1 and loop.rollout.synced == 1


def test_ppo_kl_in_reward_enters_the_returns():
    # k1 KL = -0.5 - (-1) = 0.5 per token, kl_coef 0.2: -0.1 per response token. Row 0 (2 tokens, reward 1):
    #   token rewards [-0.1, 0.9] -> returns-to-go [0.8, 0.9].
    loop = _ppo_loop(["algorithm.kl_coef=0.2", "algorithm.kl_in_reward=true",
                      "algorithm.lam=1.0"], [1.0, 0.0, 1.0, 0.0], [2, 1, 3, 2])
    metrics = loop.step(1, ROWS)
    close(loop.update.critic.batches[0].returns[0], [0.0, 0.8, 0.9, 0.0])
    assert metrics["reward/kl_penalty"] == pytest.approx(0.1)


def test_ppo_batch_with_a_nan_reward_is_skipped_and_max_bad_batches_stops_the_run():
    """The one RL step guards PPO as it does GRPO: no critic or policy update, no sync, counted; then it stops."""
    loop = _ppo_loop(["max_bad_batches=2"], [1.0, math.nan, 1.0, 0.0], [2, 1, 3, 2])
    metrics = loop.step(1, ROWS)
    assert loop.update.critic.batches == [] and loop.update.policy.batches == [] and loop.rollout.synced == 0
    assert metrics["faults/skipped_batches"] == 1 and "faults/restarts" in metrics
    loop.guard.check(1)
    loop.step(2, ROWS)
    with pytest.raises(NonFiniteError, match="stopping at step 2: 2 batches in a row .* non-finite reward") as err:
        loop.guard.check(2)
    assert "\n" not in str(err.value)
