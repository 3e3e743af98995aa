"""Preference losses (rlhf/core/algorithms/preference_losses.py) against numbers worked out by hand."""
from __future__ import annotations

import math

import torch

from rlhf.core.algorithms.preference_losses import (
    PREFERENCE_LOSSES,
    PreferenceInputs,
    dpo_losses,
    ipo_losses,
    sequence_logprobs,
    simpo_losses,
    with_sft_term,
)
from tests.numeric import T, close


# Two pairs. Pair 0: policy -10 / -12, reference -11 / -11: h = (-10 + 11) - (-12 + 11) = 1 + 1 = 2.
#            Pair 1: policy -5 / -4, reference -5 / -5:    h = 0 - 1 = -1.
CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED = T([-10.0, -5.0]), T([-12.0, -4.0]), T([-11.0, -5.0]), T([-11.0, -5.0])


def test_dpo_is_minus_log_sigmoid_of_beta_times_the_log_ratio_margin():
    # beta 0.5: logits 1 and -0.5 -> log(1 + e^-1) = 0.313262, log(1 + e^0.5) = 0.974077
    close(dpo_losses(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, 0.5), [0.313262, 0.974077])


def test_dpo_with_an_offset_asks_for_a_larger_lead():
    # offsets 0.5 and 0: logits 1 - 0.5 = 0.5 -> log(1 + e^-0.5) = 0.474077; pair 1 as before
    close(dpo_losses(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, 0.5, offset=T([0.5, 0.0])), [0.474077, 0.974077])


def test_dpo_gradient_pushes_chosen_up_by_beta_times_sigmoid_of_minus_logits():
    # d loss / d chosen = -beta * sigmoid(-logits): -0.5 * sigmoid(-1) = -0.5 * 0.268941 = -0.134471;
    # pair 1: -0.5 * sigmoid(0.5) = -0.5 * 0.622459 = -0.311230; rejected gets the opposite sign
    chosen, rejected = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
    dpo_losses(chosen, rejected, REF_CHOSEN, REF_REJECTED, 0.5).sum().backward()
    close(chosen.grad, [-0.134471, -0.311230])
    close(rejected.grad, [0.134471, 0.311230])


def test_dpo_matches_trls_sigmoid_loss_on_random_pairs():
    # TRL's DPOTrainer (loss_type sigmoid, no label smoothing): logits = chosen log-ratios - rejected log-ratios,
    # loss = -logsigmoid(beta * logits), written out here as TRL orders it.
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g) * 5 for _ in range(4))
    peer = -torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(dpo_losses(pc, pr, rc, rr, 0.1), peer)


def test_sft_term_adds_weight_times_the_chosen_nll_per_batch_token():
    # RPO: chosen sums -2 (4 tokens) and -4 (4 tokens), batch mean chosen length 4: per token -0.5 and -1;
    # weight 1: 0.313262 + 0.5 = 0.813262 and 0.974077 + 1 = 1.974077; weight 0 leaves plain DPO
    dpo = dpo_losses(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, 0.5)
    close(with_sft_term(dpo, T([-2.0, -4.0]) / 4.0, 1.0), [0.813262, 1.974077])
    close(with_sft_term(dpo, T([-2.0, -4.0]) / 4.0, 0.0), [0.313262, 0.974077])
    # gradient on each chosen sum: -weight / mean length = -0.2 / 4 = -0.05, whatever the response's own length
    sums = T([-2.0, -4.0]).requires_grad_()
    with_sft_term(dpo, sums / 4.0, 0.2).sum().backward()
    close(sums.grad, [-0.05, -0.05])


def test_sft_term_averaged_over_pairs_is_trls_sft_loss_over_all_chosen_tokens():
    # TRL (loss_type ["sigmoid", "sft"], loss_weights [1, 0.7]): loss = mean(dpo losses) + 0.7 * the mean NLL over
    # all the batch's chosen tokens, -chosen_per_token_logps[chosen_mask].mean(); chosen lengths 1 to 4 here.
    g = torch.Generator().manual_seed(1)
    token_logp = -torch.rand(4, 4, generator=g) * 3
    mask = T([[1.0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    pc, pr, rc, rr = (torch.randn(4, generator=g) * 5 for _ in range(4))
    dpo = dpo_losses(pc, pr, rc, rr, 0.1)
    peer = dpo.mean() + 0.7 * -token_logp[mask.bool()].mean()
    chosen_per_token = sequence_logprobs(token_logp, mask) / (mask.sum() / 4)
    torch.testing.assert_close(with_sft_term(dpo, chosen_per_token, 0.7).mean(), peer)


def test_ipo_regresses_the_margin_onto_one_over_two_beta():
    # beta 0.5: target 1 / (2 * 0.5) = 1; h 2 -> (2 - 1)^2 = 1;  h -1 -> (-1 - 1)^2 = 4
    close(ipo_losses(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, 0.5), [1.0, 4.0])


def test_simpo_compares_mean_log_probs_without_a_reference():
    # means -1 and -1.5, beta 2, gamma 0.5: 2 * 0.5 - 0.5 = 0.5 -> log(1 + e^-0.5) = 0.474077
    # means -2 and -1: 2 * -1 - 0.5 = -2.5 -> log(1 + e^2.5) = 2.578890
    close(simpo_losses(T([-1.0, -2.0]), T([-1.5, -1.0]), 2.0, 0.5), [0.474077, 2.578890])


def test_sequence_logprobs_sum_or_average_the_response_tokens_also_on_packed_rows():
    # row 0: response tokens -1, -2 (the -9 is prompt) -> sum -3, mean -1.5;  row 1: -4 -> sum -4, mean -4
    logp, mask = T([[-9.0, -1.0, -2.0], [-9.0, -4.0, 0.0]]), T([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    close(sequence_logprobs(logp, mask), [-3.0, -4.0])
    close(sequence_logprobs(logp, mask, average=True), [-1.5, -4.0])
    # the same two sequences packed into one row: tokens numbered 0, 0, 0, 1, 1
    packed, packed_mask = T([[-9.0, -1.0, -2.0, -9.0, -4.0]]), T([[0.0, 1.0, 1.0, 0.0, 1.0]])
    close(sequence_logprobs(packed, packed_mask, torch.tensor([[0, 0, 0, 1, 1]]), 2), [-3.0, -4.0])


def test_registry_entries_say_what_they_need_and_give_the_functions_values():
    assert {name: (e.reference, e.length_normalised) for name, e in PREFERENCE_LOSSES.items()} == {
        "dpo": (True, False), "ipo": (True, False), "simpo": (False, True)}
    inputs = PreferenceInputs(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, gamma=0.5)
    close(PREFERENCE_LOSSES["dpo"].compute(inputs), [0.313262, 0.974077])
    close(PREFERENCE_LOSSES["ipo"].compute(inputs), [1.0, 4.0])
    # simpo on these sums: 0.5 * 2 - 0.5 = 0.5 -> 0.474077;  0.5 * -1 - 0.5 = -1 -> log(1 + e) = 1.313262
    close(PREFERENCE_LOSSES["simpo"].compute(inputs), [0.474077, 1.313262])
    # implicit rewards: beta * log-ratio: 0.5 * 1 = 0.5 and 0.5 * -1 = -0.5 (pair 0); 0 and 0.5 (pair 1)
    chosen, rejected = inputs.rewards()
    close(chosen, [0.5, 0.0])
    close(rejected, [-0.5, 0.5])
    assert math.isclose(float((chosen > rejected).float().mean()), 0.5)
