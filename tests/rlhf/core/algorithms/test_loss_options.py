"""Policy-loss and reward-shaping options (``algorithm.*``) against numbers worked out by hand: clip-higher, loss
aggregation, KL estimators' gradients, the entropy bonus, DAPO's overlong penalty and dynamic sampling; then the
driver's GRPO step with stand-in actors, to check that the options reach the trainer's batch.

As in test_algorithms.py, each expected value is a literal with its arithmetic in the comment beside it.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf.core.algorithms.advantages import ADVANTAGE_ESTIMATORS, dr_grpo_advantages
from rlhf.core.algorithms.aggregation import loss_token_weights
from rlhf.core.algorithms.kl import kl_penalty
from rlhf.core.algorithms.policy_losses import clipped_policy_loss, policy_token_loss
from rlhf.core.algorithms.shaping import informative_groups, overlong_penalty
from rlhf.core.algorithms.tokens import token_entropy
from rlhf.core.config.run_config import ConfigError, load_config
from rlhf.core.guards import NonFiniteError
from tests.loop_stubs import stub_loop
from tests.numeric import T, close


# ------------------------------------------------------------------------------- clip-higher (asymmetric)


def _ratios(ratios: list[float]) -> torch.Tensor:
    # log(ratio) with old_logprobs = 0, so exp(logprobs - old) is exactly the ratio
    return torch.log(T(ratios)).requires_grad_()


def test_clip_higher_keeps_the_gradient_of_a_ratio_the_symmetric_clip_would_cut():
    # ratio 1.25, A = +1. d/dlogp of -A * ratio = -A * ratio = -1.25 while unclipped.
    # clip_high 0.28: 1.25 < 1.28, unclipped -> loss -1.25, gradient -1.25
    # clip_high 0.20: 1.25 > 1.20, clipped   -> loss -1.2,  gradient 0
    for clip_high, loss_value, grad, was_clipped in [(0.28, -1.25, -1.25, 0.0), (0.2, -1.2, 0.0, 1.0)]:
        logp = _ratios([1.25])
        loss, clipped = clipped_policy_loss(logp, torch.zeros(1), T([1.0]), clip_low=0.2, clip_high=clip_high)
        loss.sum().backward()
        close(loss.detach(), [loss_value])
        close(logp.grad, [grad])
        close(clipped, [was_clipped])


def test_asymmetric_clip_low_bounds_negative_advantages_separately():
    # clip_low 0.1, clip_high 0.28: range [0.9, 1.28]; A = -1 on both tokens
    # ratio 0.85: unclipped 0.85, clipped 1 * 0.9 = 0.9 -> max 0.9, clip active, gradient 0
    # ratio 0.95: inside -> loss 0.95, gradient -A * ratio = 0.95
    logp = _ratios([0.85, 0.95])
    loss, clipped = clipped_policy_loss(logp, torch.zeros(2), T([-1.0, -1.0]), clip_low=0.1, clip_high=0.28)
    loss.sum().backward()
    close(loss.detach(), [0.9, 0.95])
    close(clipped, [1.0, 0.0])
    close(logp.grad, [0.0, 0.95])


# ------------------------------------------------------------------------------------------- aggregation


def test_aggregation_modes_on_one_batch_show_their_length_bias():
    # rewards [1, 0] in one group: Dr. GRPO advantages [+0.5, -0.5]; row 0 has 2 response tokens, row 1 has 1.
    # At ratio 1 the per-token loss is -A: row 0 [-0.5, -0.5], row 1 [+0.5]; max_response_tokens 4.
    #   token-mean: (-0.5 - 0.5 + 0.5) / 3 tokens             = -0.166667  (the long answer dominates)
    #   seq-mean:   (mean(-0.5, -0.5) + 0.5) / 2 rows         =  0.0
    #   dr-grpo:    (-0.5 - 0.5 + 0.5) / (2 rows * 4 tokens)  = -0.0625
    mask = T([[1.0, 1.0], [1.0, 0.0]])
    advantages = dr_grpo_advantages(T([1.0, 0.0]), 2).unsqueeze(1) * mask
    logp = torch.zeros(2, 2)
    per_token, _ = clipped_policy_loss(logp, logp, advantages)
    for mode, expected in [("token-mean", -0.166667), ("seq-mean", 0.0), ("dr-grpo", -0.0625)]:
        total = (per_token * loss_token_weights(mask, mode, 4)).sum().item()
        assert total == pytest.approx(expected, abs=1e-6), mode


# ------------------------------------------------------------------------------------ KL estimators' grads


@pytest.mark.parametrize("estimator, grad_at_plus_one, grad_at_minus_one", [
    # d/dlogp at log_ratio = logp - ref = +1 and -1:
    ("k1", 1.0, 1.0),                   # d(lr) = 1: pushes every sampled token down alike, biased gradient
    ("k2", 1.0, -1.0),                  # d(lr^2 / 2) = lr
    ("k3", 0.632121, -1.718282),        # d(exp(-lr) + lr - 1) = 1 - exp(-lr): 1 - e^-1, 1 - e
])
def test_kl_estimator_gradients(estimator, grad_at_plus_one, grad_at_minus_one):
    logp = T([-1.0, -2.0]).requires_grad_()
    ref = T([-2.0, -1.0])  # log ratios +1 and -1
    kl_penalty(logp, ref, estimator).sum().backward()
    close(logp.grad, [grad_at_plus_one, grad_at_minus_one])


# ------------------------------------------------------------------------------------------ entropy bonus


def test_token_entropy_by_hand():
    # position 0: nothing predicted it -> 0
    # position 1: logits [0, 0] at position 0, uniform over 2 -> ln 2 = 0.693147
    # position 2: logits [ln 3, 0] at position 1, p = [0.75, 0.25]
    #             -> -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.215762 + 0.346574 = 0.562335
    # the logits at the last position predict nothing in the sequence and are ignored
    logits = T([[[0.0, 0.0], [math.log(3.0), 0.0], [9.0, -9.0]]])
    close(token_entropy(logits), [[0.0, 0.693147, 0.562335]])


def test_token_entropy_gradient_by_hand():
    # z = [a, 0]: p = sigmoid(a), H = -p ln p - (1 - p) ln(1 - p), dH/da = p (1 - p) ln((1 - p) / p)
    # a = ln 3: p = 0.75 -> 0.1875 * ln(1/3) = 0.1875 * -1.098612 = -0.205990
    logits = T([[[math.log(3.0), 0.0], [0.0, 0.0]]]).requires_grad_()
    token_entropy(logits)[0, 1].backward()
    close(logits.grad[0, 0], [-0.205990, 0.205990])
    close(logits.grad[0, 1], [0.0, 0.0])  # the last position's logits predict nothing here


def test_token_entropy_is_finite_for_a_near_one_hot_distribution():
    # p = [1, e^-2000] underflows to [1, 0]: -sum p log p would meet 0 * -inf; this form gives 0
    logits = T([[[1000.0, -1000.0], [0.0, 0.0]]]).requires_grad_()
    entropy = token_entropy(logits)
    entropy.sum().backward()
    assert torch.isfinite(entropy).all() and torch.isfinite(logits.grad).all()
    close(entropy, [[0.0, 0.0]])


def test_policy_token_loss_subtracts_the_entropy_bonus_and_adds_the_kl_term():
    # pg [1, -2], entropy [0.5, 2], kl [0.1, 0.3], entropy_coef 0.1, kl_coef 0.5
    # token 0: 1 - 0.1 * 0.5 + 0.5 * 0.1 = 1 - 0.05 + 0.05 = 1.0
    # token 1: -2 - 0.1 * 2 + 0.5 * 0.3 = -2 - 0.2 + 0.15 = -2.05
    pg, entropy, kl = T([1.0, -2.0]), T([0.5, 2.0]), T([0.1, 0.3])
    close(policy_token_loss(pg, entropy, kl, entropy_coef=0.1, kl_coef=0.5), [1.0, -2.05])
    close(policy_token_loss(pg, entropy, kl, entropy_coef=0.1), [0.95, -2.2])  # entropy bonus only
    close(policy_token_loss(pg, entropy, kl, kl_coef=0.5), [1.05, -1.85])  # KL term only


def test_policy_token_loss_defaults_to_the_policy_gradient_term_exactly():
    pg = T([1.0, -2.0])
    # unused inputs stay out even when they hold NaN: no 0 * NaN in the default loss
    assert policy_token_loss(pg, T([math.nan, 1.0]), T([math.nan, 1.0])) is pg


def test_entropy_bonus_gradient_raises_entropy():
    # One token, logits [a, 0] at a = ln 3 (p = 0.75, H = 0.562335), zero advantage: the only gradient is the
    # bonus, -entropy_coef * dH/da = -0.1 * -0.205990 = +0.020599; a descent step lowers a, towards uniform.
    logits = T([[[math.log(3.0), 0.0], [0.0, 0.0]]]).requires_grad_()
    entropy = token_entropy(logits)
    loss = policy_token_loss(torch.zeros(1, 2), entropy, None, entropy_coef=0.1)[0, 1]
    loss.backward()
    close(loss.detach().reshape(1), [-0.0562335])
    close(logits.grad[0, 0], [0.020599, -0.020599])


# ------------------------------------------------------------------------------------ overlong penalty


def test_overlong_penalty_ramps_over_the_buffer():
    # max 10, buffer 4: free up to 10 - 4 = 6 tokens, then -(len - 6) / 4, and -1 from 10 on
    # lengths 3, 6 -> 0;  7 -> -1/4;  8 -> -2/4;  10 -> -1;  12 (longer than max, e.g. a prompt budget) -> -1
    close(overlong_penalty(T([3, 6, 7, 8, 10, 12]), 10, 4), [0.0, 0.0, -0.25, -0.5, -1.0, -1.0])


def test_overlong_penalty_scales_with_its_factor():
    # penalty 0.5: half of the above for lengths 7 and 10
    close(overlong_penalty(T([7, 10]), 10, 4, penalty=0.5), [-0.125, -0.5])


def test_overlong_penalty_of_length_one_responses_and_a_whole_length_buffer():
    # max 1, buffer 1: free up to 0 tokens, so one token is already at the limit -> -1
    close(overlong_penalty(T([1]), 1, 1), [-1.0])
    # max 4, buffer 4: -len / 4 -> lengths 1, 2 -> -0.25, -0.5 (and an empty response 0)
    close(overlong_penalty(T([0, 1, 2]), 4, 4), [0.0, -0.25, -0.5])


def test_overlong_penalty_is_off_with_a_zero_buffer():
    close(overlong_penalty(T([1, 48, 100]), 48, 0), [0.0, 0.0, 0.0])


def test_overlong_buffer_longer_than_the_limit_is_refused():
    with pytest.raises(ValueError, match="max_length=8"):
        overlong_penalty(T([1]), 8, 9)


# ------------------------------------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_keeps_groups_whose_rewards_differ():
    # groups of 2: [1, 1] equal, [0, 1] kept, [2, 2] equal, [0, 3] kept
    keep = informative_groups(T([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 0.0, 3.0]), 2)
    assert keep.tolist() == [False, False, True, True, False, False, True, True]


def test_dynamic_sampling_keeps_a_row_count_the_trainer_ranks_can_split():
    rewards = T([0.0, 1.0, 1.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 5.0])  # groups of 2; group 1 ([1, 1]) is equal
    # 4 informative groups = 8 rows. 2 ranks: 8 rows split, all 4 kept.
    assert informative_groups(rewards, 2, 2).tolist() == [True, True, False, False] + [True] * 6
    # 3 ranks: k groups give 2k rows, a multiple of 3 when k is a multiple of 3 -> keep 3, drop the last one
    assert informative_groups(rewards, 2, 3).tolist() == [True, True, False, False] + [True] * 4 + [False] * 2
    # 8 ranks: k must be a multiple of 4 -> all 4 kept (8 rows)
    assert informative_groups(rewards, 2, 8).sum().item() == 8
    # 16 ranks: k must be a multiple of 8 -> nothing can be kept
    assert not informative_groups(rewards, 2, 16).any()


def test_dynamic_sampling_with_all_groups_equal_keeps_nothing():
    assert not informative_groups(T([1.0, 1.0, 0.0, 0.0]), 2).any()


def test_dynamic_sampling_rejects_a_size_that_does_not_split_into_groups():
    with pytest.raises(ValueError, match="groups of 2"):
        informative_groups(T([1.0, 0.0, 1.0]), 2)


def test_estimators_with_a_group_baseline_give_an_equal_reward_group_zero_advantage():
    """What dynamic sampling relies on when it drops such a group: with a KL in the token rewards and other groups
    far from it, each estimator that declares ``group_baseline`` leaves the equal group [1, 1] at exactly 0."""
    from rlhf.core.algorithms.advantages import AdvantageInputs

    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kl_rewards = -0.1 * torch.arange(18, dtype=torch.float).reshape(6, 3) / 18
    declaring = [name for name, entry in ADVANTAGE_ESTIMATORS.items() if entry.group_baseline]
    assert set(declaring) == {"grpo", "dr_grpo", "rloo"}
    for name in declaring:
        inputs = AdvantageInputs(T([1.0, 1.0, 0.0, 1.0, 3.0, -2.0]), mask, 2, token_rewards=kl_rewards * mask)
        advantages, _ = ADVANTAGE_ESTIMATORS[name].compute(inputs)
        assert advantages[:2].abs().max().item() == 0.0, name
    # REINFORCE++'s baseline variant does not: its whitened returns give that group's rows non-zero advantages.
    inputs = AdvantageInputs(T([1.0, 1.0, 0.0, 1.0, 3.0, -2.0]), mask, 2, token_rewards=kl_rewards * mask)
    assert ADVANTAGE_ESTIMATORS["reinforce_plus_plus_baseline"].compute(inputs)[0][:2].abs().max().item() > 0.1


@pytest.mark.parametrize("advantage", ["reinforce_plus_plus", "reinforce_plus_plus_baseline", "gae"])
def test_dynamic_sampling_is_refused_where_equal_reward_groups_carry_advantages(advantage):
    with pytest.raises(ConfigError, match=f"dynamic_sampling drops groups of equal rewards, whose rows {advantage} "
                                          f"gives non-zero advantages") as err:
        load_config(None, [f"algorithm.advantage={advantage}", "algorithm.dynamic_sampling=true"])
    assert "\n" not in str(err.value)
    load_config(None, ["algorithm.advantage=rloo", "algorithm.dynamic_sampling=true"])  # a group baseline: fine


# ------------------------------------------------------------------------------------------------ config


def test_new_algorithm_options_default_to_off():
    a = load_config(None).algorithm
    assert (a.advantage, a.loss_aggregation, a.entropy_coef, a.dynamic_sampling, a.overlong_buffer) == \
        ("grpo", "token-mean", 0.0, False, 0)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_every_registered_estimator_is_accepted_by_the_config(name):
    # on_policy_distillation has no sequence advantage: it takes the teacher's term alone.
    alone = ["reward.components={teacher_kl: 1.0}", "reward.teacher_model_path=t"]
    overrides = alone if name == "on_policy_distillation" else []
    assert load_config(None, [f"algorithm.advantage={name}", *overrides]).algorithm.advantage == name


@pytest.mark.parametrize("override", ["algorithm.entropy_coef=-0.1", "algorithm.overlong_buffer=-1",
                                      "algorithm.dynamic_sampling=maybe"])
def test_bad_algorithm_options_are_config_errors(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


# ------------------------------------------------------------------------ the driver's step, actors stubbed


def _loop(overrides: list[str], rewards: list[float], lengths: list[int]):
    """An RLStep over stand-ins for the Ray actors: 4 prompts x 2 samples with the given rewards and response
    lengths, 2 trainer ranks, max_new_tokens 4."""
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "trainer.num_ranks=2",
                             "rollout.max_new_tokens=4", *overrides])
    return stub_loop(cfg, rewards, lengths)


ROWS = [SimpleNamespace(prompt=f"p{i}", answer="1", difficulty=None) for i in range(4)]  # prompt rows only reach the stubs


def test_step_defaults_train_on_every_row_with_grpo_advantages():
    loop = _loop([], rewards=[1, 0, 1, 1, 0, 0, 0, 1], lengths=[1, 1, 1, 1, 1, 1, 1, 1])
    metrics = loop.step(1, ROWS)
    (batch,) = loop.update.policy.batches
    # groups [1, 0], [1, 1], [0, 0], [0, 1] -> +-0.707107 for the mixed ones, 0 for the equal ones;
    # one response token each, at column 1 after the 1-token prompt
    close(batch.advantages[:, 1], [0.707107, -0.707107, 0.0, 0.0, 0.0, 0.0, -0.707107, 0.707107])
    assert "reward/dropped_groups" not in metrics and "reward/overlong_penalty" not in metrics
    assert metrics["reward/zero_signal_groups"] == 0.5 and loop.rollout.synced == 1
    # each reward component's own mean beside the total
    assert metrics["reward/verifier"] == pytest.approx(0.5) and metrics["reward/brevity"] == pytest.approx(0.5)


def test_step_applies_the_overlong_penalty_then_drops_groups_without_signal():
    # max_new_tokens 4, buffer 2: free up to 2 tokens, then -(len - 2) / 2: length 3 -> -0.5, length 4 -> -1
    # group 0: rewards [1, 1], lengths [1, 1] -> [1, 1]       equal: dropped
    # group 1: rewards [1, 1], lengths [1, 4] -> [1, 0]       kept
    # group 2: rewards [0, 0], lengths [3, 3] -> [-0.5, -0.5] equal: dropped
    # group 3: rewards [0, 1], lengths [2, 2] -> [0, 1]       kept; 4 rows split over 2 ranks
    loop = _loop(["algorithm.overlong_buffer=2", "algorithm.dynamic_sampling=true"],
                 rewards=[1, 1, 1, 1, 0, 0, 0, 1], lengths=[1, 1, 1, 4, 3, 3, 2, 2])
    metrics = loop.step(1, ROWS)
    assert metrics["reward/dropped_groups"] == 2
    # penalties 0, 0, 0, -1, -0.5, -0.5, 0, 0 -> mean -2/8 = -0.25; shaped rewards sum 3 -> mean 0.375
    assert metrics["reward/overlong_penalty"] == pytest.approx(-0.25)
    assert metrics["reward/mean"] == pytest.approx(0.375)
    (batch,) = loop.update.policy.batches
    assert batch.response_mask.sum(dim=1).tolist() == [1, 4, 2, 2]  # rows of groups 1 and 3
    # GRPO on [1, 0] and [0, 1]: +-0.707107, spread over each row's response tokens
    close(batch.advantages[:, 1], [0.707107, -0.707107, -0.707107, 0.707107])
    close(batch.advantages[1, 1:5], [-0.707107] * 4)  # all 4 tokens of the length-4 row


def test_step_with_no_group_left_skips_the_update_and_the_weight_sync():
    loop = _loop(["algorithm.dynamic_sampling=true"], rewards=[1, 1, 0, 0, 1, 1, 0, 0], lengths=[1] * 8)
    metrics = loop.step(1, ROWS)
    assert metrics["reward/dropped_groups"] == 4
    assert loop.update.policy.batches == [] and loop.rollout.synced == 0
    assert metrics["charts/weights_version"] == 0 and "losses/policy_loss" not in metrics
    assert metrics["perf/sync_s"] == 0.0


def test_step_with_a_nan_reward_trains_nothing_and_counts_the_batch():
    loop = _loop([], rewards=[1, math.nan, 0, 0, 1, 1, 0, 0], lengths=[1] * 8)
    metrics = loop.step(1, ROWS)
    assert loop.update.policy.batches == [] and loop.rollout.synced == 0 and metrics["faults/skipped_batches"] == 1
    assert metrics["reward/verifier"] == pytest.approx(3 / 7)  # a component's mean is over its finite values
    assert loop.guard.last_fault.startswith("non-finite reward from reward=nan in 1 of 8 samples")
    assert metrics["reward/mean"] == pytest.approx(3 / 7)  # over the finite rewards


def test_step_with_a_skipped_update_does_not_sync_and_enough_in_a_row_stop_the_run():
    loop = _loop(["max_bad_batches=2"], rewards=[1, 0, 0, 0, 1, 1, 0, 0], lengths=[1] * 8)
    loop.update.policy.train_step = lambda batch: {"losses/policy_loss": math.nan, "faults/update_skipped": 1.0}
    loop.step(1, ROWS)
    loop.guard.check(1)
    assert loop.rollout.synced == 0 and loop.version == 0
    loop.step(2, ROWS)
    with pytest.raises(NonFiniteError, match="stopping at step 2: 2 batches in a row .* non-finite policy loss nan"):
        loop.guard.check(2)


def test_step_passes_token_level_reinforce_plus_plus_advantages_to_the_trainer():
    # rewards [1, 0, 0, 0, 0, 0, 0, 0], one token each: token mean 1/8 = 0.125, population std
    # sqrt(0.125 * 0.875) = 0.330719 -> 0.875 / 0.330719 = 2.645751 and -0.125 / 0.330719 = -0.377964
    loop = _loop(["algorithm.advantage=reinforce_plus_plus"], rewards=[1, 0, 0, 0, 0, 0, 0, 0], lengths=[1] * 8)
    loop.step(1, ROWS)
    (batch,) = loop.update.policy.batches
    close(batch.advantages[:, 1], [2.645751] + [-0.377964] * 7)
    assert (batch.advantages[:, 0] == 0).all()  # the prompt column


def test_the_kl_in_the_reward_is_taken_from_the_trainers_log_probs_not_the_samplers():
    # The trainer's log-probs -0.8 where the sampler said -0.5 (a bf16 or vLLM sampler, an asynchronous step):
    # k1 against the reference's -1 is 0.2 per token, so kl_coef 0.1 makes the penalty 0.02 (the sampler's: 0.05).
    loop = _loop(["algorithm.advantage=reinforce_plus_plus", "algorithm.kl_coef=0.1"],
                 rewards=[1, 0, 0, 0, 0, 0, 0, 0], lengths=[2] + [1] * 7)
    loop.update.policy.policy_logprobs = lambda batch: torch.full(batch.input_ids.shape, -0.8)
    metrics = loop.step(1, ROWS)
    assert metrics["reward/kl_penalty"] == pytest.approx(0.02)


def test_reinforce_plus_plus_takes_the_k1_kl_in_its_token_rewards():
    # kl_coef 0.1, reference log-probs -1, sampling -0.5: k1 = 0.5 -> token reward -0.05 on every response token,
    # then the returns-to-go whitened over the batch's 9 response tokens.
    loop = _loop(["algorithm.advantage=reinforce_plus_plus", "algorithm.kl_coef=0.1", "algorithm.kl_estimator=k3"],
                 rewards=[1, 0, 0, 0, 0, 0, 0, 0], lengths=[2] + [1] * 7)
    metrics = loop.step(1, ROWS)
    assert metrics["reward/kl_penalty"] == pytest.approx(0.05)  # k1 even with kl_estimator k3 (the loss's)
    (batch,) = loop.update.policy.batches
    # row 0 has two tokens: rewards [-0.05, 0.95] -> returns [0.9, 0.95]; the others -0.05.
    returns = torch.tensor([0.9, 0.95] + [-0.05] * 7)
    expected = (returns - returns.mean()) / (returns.var(unbiased=False).sqrt() + 1e-6)
    close(batch.advantages[0, 1:3], expected[:2].tolist())
    close(batch.advantages[1:, 1], expected[2:].tolist())
