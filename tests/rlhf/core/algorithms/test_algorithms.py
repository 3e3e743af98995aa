"""KL terms, loss aggregation and per-token helpers (rlhf/core/algorithms/) against numbers worked out by hand.

Each expected value is a literal; the arithmetic that produced it is in the comment next to it, so a reader can
check the number without trusting the code under test.
"""
from __future__ import annotations

import pytest
import torch

from rlhf.core.algorithms.aggregation import loss_token_weights
from rlhf.core.algorithms.kl import distillation_advantages, kl_penalty, kl_reward
from rlhf.core.algorithms.tokens import masked_mean, token_logprobs
from tests.numeric import T, close


# ---------------------------------------------------------------------------------------------------- KL


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
