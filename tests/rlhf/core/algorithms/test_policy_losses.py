"""Policy-gradient losses (rlhf/core/algorithms/policy_losses.py) against numbers worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf.core.algorithms.policy_losses import (
    POLICY_LOSSES,
    PolicyLossInputs,
    cispo_policy_loss,
    clipped_policy_loss,
    dual_clip_policy_loss,
    gspo_policy_loss,
    off_policy_weights,
    sequence_mean,
    truncated_importance_weights,
)
from tests.numeric import T, close


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


# ------------------------------------------------------------------------------------------------ dual clip


def test_dual_clip_caps_the_loss_of_a_large_ratio_with_negative_advantage():
    # clip 0.2, dual bound c = 3:
    # r 4.0, A -1: max(4, 1.2) = 4 > c * 1 = 3 -> 3 (dual clip);  r 1.5, A -1: max(1.5, 1.2) = 1.5 < 3 -> 1.5
    # r 0.5, A -1: max(0.5, 0.8) = 0.8 (ordinary clip);            r 2.0, A +1: max(-2, -1.2) = -1.2, never capped
    logprobs = torch.log(T([4.0, 1.5, 0.5, 2.0])).requires_grad_()
    loss, clipped = dual_clip_policy_loss(logprobs, torch.zeros(4), T([-1.0, -1.0, -1.0, 1.0]), dual_clip=3.0)
    close(loss, [3.0, 1.5, 0.8, -1.2])
    close(clipped, [1.0, 0.0, 1.0, 1.0])
    # d/dlogp (-A r) = -A r: 1.5 on the only unclipped token; the capped and clipped ones get 0
    loss.sum().backward()
    close(logprobs.grad, [0.0, 1.5, 0.0, 0.0])


def test_dual_clip_refuses_a_bound_of_one_or_less():
    with pytest.raises(ValueError, match="> 1"):
        dual_clip_policy_loss(torch.zeros(1), torch.zeros(1), T([-1.0]), dual_clip=1.0)


def test_dual_clip_matches_verls_formula_on_random_tokens():
    # veRL (core_algos.py, the vanilla loss with clip_ratio_c): l1 = max(-A r, -A clip(r)); l2 = min(-A c, l1);
    # loss = l2 where A < 0 else l1, written out here as veRL orders it.
    g = torch.Generator().manual_seed(0)
    logp, old, adv = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    ratio = (logp - old).exp()
    l1 = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
    peer = torch.where(adv < 0, torch.minimum(-adv * 3.0, l1), l1)
    loss, _ = dual_clip_policy_loss(logp, old, adv, 0.2, 0.28, 3.0)
    torch.testing.assert_close(loss, peer)


# ----------------------------------------------------------------------------------------------------- GSPO

GSPO_MASK = T([[1.0, 1.0, 0.0],
               [1.0, 1.0, 1.0]])
# log-ratios: row 0 [0.1, -0.1] (mean 0, s = 1); row 1 [0.3, 0.0, 0.3] (mean 0.2, s = exp(0.2) = 1.221403);
# the 5.0 is off the response and must not count.
GSPO_LOG_RATIO = T([[0.1, -0.1, 5.0],
                    [0.3, 0.0, 0.3]])


def test_gspo_uses_one_length_normalised_ratio_per_sequence():
    # clip 0.2. A = +1 on both rows: row 0 -s = -1 (inside); row 1 max(-1.221403, -1.2) = -1.2 (clipped).
    loss, clipped = gspo_policy_loss(GSPO_LOG_RATIO, torch.zeros(2, 3), T([[1.0] * 3, [1.0] * 3]), GSPO_MASK,
                                     0.2, 0.2)
    close(loss, [[-1.0, -1.0, 0.0], [-1.2, -1.2, -1.2]])
    close(clipped, [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    # A = -1 on row 1: max(1.221403, 1.2) = 1.221403, the pessimistic side, no clip
    loss, clipped = gspo_policy_loss(GSPO_LOG_RATIO, torch.zeros(2, 3), T([[1.0] * 3, [-1.0] * 3]), GSPO_MASK,
                                     0.2, 0.2)
    close(loss, [[-1.0, -1.0, 0.0], [1.221403, 1.221403, 1.221403]])
    close(clipped, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_gspo_gradient_is_the_sequence_objectives():
    # The sequence objective -A * exp(mean_t (logp_t - old_t)) has gradient -A * s / |y| on each token; the
    # per-token GSPO loss averaged per sequence (seq-mean weights 1 / |y|) must have the same.
    # row 1: -1 * 1.221403 / 3 = -0.407134 each (A = +1, r inside a wide clip); row 0: -1 * 1 / 2 = -0.5
    logprobs = GSPO_LOG_RATIO.clone().requires_grad_()
    loss, _ = gspo_policy_loss(logprobs, torch.zeros(2, 3), torch.ones(2, 3), GSPO_MASK, 0.5, 0.5)
    (loss * GSPO_MASK / GSPO_MASK.sum(dim=1, keepdim=True)).sum().backward()
    close(logprobs.grad, [[-0.5, -0.5, 0.0], [-0.407134, -0.407134, -0.407134]])
    sequence = GSPO_LOG_RATIO.clone().requires_grad_()
    s = ((sequence * GSPO_MASK).sum(dim=1) / GSPO_MASK.sum(dim=1)).exp()
    (-s).sum().backward()
    torch.testing.assert_close(logprobs.grad, sequence.grad * GSPO_MASK)


def test_gspo_on_packed_rows_equals_gspo_on_padded_rows():
    # The two sequences packed into one row of 5 tokens, numbered by sequence_ids: the same per-token losses.
    padded, _ = gspo_policy_loss(GSPO_LOG_RATIO, torch.zeros(2, 3), T([[1.0] * 3, [-1.0] * 3]), GSPO_MASK, 0.2, 0.2)
    packed, _ = gspo_policy_loss(T([[0.1, -0.1, 0.3, 0.0, 0.3]]), torch.zeros(1, 5), T([[1.0, 1.0, -1.0, -1.0, -1.0]]),
                                 torch.ones(1, 5), 0.2, 0.2, sequence_ids=torch.tensor([[0, 0, 1, 1, 1]]))
    torch.testing.assert_close(packed[0], torch.cat([padded[0, :2], padded[1]]))


def test_gspo_matches_verls_formula_on_random_rows():
    # veRL (core_algos.py, compute_policy_loss_gspo): per row, the masked mean of log-ratios, detached, plus
    # logp - sg(logp); exp; then PPO's clip. Written out here the way veRL orders it.
    g = torch.Generator().manual_seed(1)
    logp, old, adv = torch.randn(3, 7, generator=g) * 0.1, torch.randn(3, 7, generator=g) * 0.1, torch.randn(3, 7)
    mask = (torch.rand(3, 7, generator=g) > 0.3).float()
    seq = ((logp - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    ratio = torch.exp(torch.clamp(logp - logp.detach() + seq.detach().unsqueeze(-1), max=10.0))
    peer = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 3e-4, 1 + 4e-4))
    loss, _ = gspo_policy_loss(logp, old, adv, mask)
    torch.testing.assert_close(loss, peer * mask)


# ---------------------------------------------------------------------------------------------------- CISPO


def test_cispo_weights_reinforce_by_the_clipped_ratio_and_keeps_every_gradient():
    # clip_low 0.2, clip_high 0.28: weights clamp(r) = [1.28, 0.8, 1.0] for r = [1.5, 0.5, 1.0]
    # logp = old + log r: -1 + 0.405465 = -0.594535; -2 - 0.693147 = -2.693147; -0.5
    # loss = -w A logp: -1.28 * 1 * -0.594535 = 0.761005; -0.8 * 1 * -2.693147 = 2.154518; -1 * -2 * -0.5 = -1.0
    old = T([-1.0, -2.0, -0.5])
    logprobs = (old + torch.log(T([1.5, 0.5, 1.0]))).requires_grad_()
    loss, clipped = cispo_policy_loss(logprobs, old, T([1.0, 1.0, -2.0]), clip_low=0.2, clip_high=0.28)
    close(loss, [0.761005, 2.154518, -1.0])
    close(clipped, [1.0, 1.0, 0.0])
    # d/dlogp = -w A: [-1.28, -0.8, 2.0]; PPO's clip would give 0 on the first token (r above 1.28 with A > 0)
    loss.sum().backward()
    close(logprobs.grad, [-1.28, -0.8, 2.0])


def test_cispo_matches_verls_formula_on_random_tokens():
    # veRL (core_algos.py, compute_policy_loss_cispo): -sg(clamp(exp(logp - old), 1 - low, 1 + high)) * A * logp
    g = torch.Generator().manual_seed(2)
    old, adv = torch.randn(4, 9, generator=g) - 2, torch.randn(4, 9, generator=g)
    logp = (old + 0.5 * torch.randn(4, 9, generator=g)).requires_grad_()
    peer_logp = logp.detach().clone().requires_grad_()
    peer = -torch.clamp(torch.exp(peer_logp - old), 1 - 1.0, 1 + 0.28).detach() * adv * peer_logp
    loss, _ = cispo_policy_loss(logp, old, adv, 1.0, 0.28)
    torch.testing.assert_close(loss, peer)
    loss.sum().backward()
    peer.sum().backward()
    torch.testing.assert_close(logp.grad, peer_logp.grad)


# ------------------------------------------------------------------------------------------------- registry


def test_policy_loss_registry_names_each_loss_and_vanilla_is_the_clipped_surrogate():
    assert list(POLICY_LOSSES) == ["vanilla", "dual_clip", "gspo", "cispo"]
    assert [name for name, entry in POLICY_LOSSES.items() if entry.sequence_level] == ["gspo"]
    g = torch.Generator().manual_seed(3)
    logp, old, adv = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    inputs = PolicyLossInputs(logp, old, adv, torch.ones(2, 5), clip_low=0.2, clip_high=0.28, dual_clip=2.0)
    for name, want in [("vanilla", clipped_policy_loss(logp, old, adv, 0.2, 0.28)),
                       ("dual_clip", dual_clip_policy_loss(logp, old, adv, 0.2, 0.28, 2.0)),
                       ("gspo", gspo_policy_loss(logp, old, adv, torch.ones(2, 5), 0.2, 0.28)),
                       ("cispo", cispo_policy_loss(logp, old, adv, 0.2, 0.28))]:
        got = POLICY_LOSSES[name].compute(inputs)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


def test_sequence_mean_by_row_and_by_sequence_id():
    # rows [1, 3, (9 masked)] and [2, 4, 6]: means 2 and 4;  ids [[0, 0, 1], [1, 2, 2]] with all tokens on:
    # sequence 0 = (1 + 3) / 2 = 2, sequence 1 = (9 + 2) / 2 = 5.5, sequence 2 = (4 + 6) / 2 = 5
    values = T([[1.0, 3.0, 9.0], [2.0, 4.0, 6.0]])
    close(sequence_mean(values, T([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])), [[2.0, 2.0, 2.0], [4.0, 4.0, 4.0]])
    close(sequence_mean(values, torch.ones(2, 3), torch.tensor([[0, 0, 1], [1, 2, 2]])),
          [[2.0, 2.0, 5.5], [5.5, 5.0, 5.0]])


# ------------------------------------------------------------------------------------- off-policy weights

# One row, three response tokens after one prompt token; sampler/trainer ratios 0.5, 1.5 and 3 (log-ratios
# ln 0.5 = -0.693147, ln 1.5 = 0.405465, ln 3 = 1.098612). The 9.0 is off the response.
OFF_MASK = T([[0.0, 1.0, 1.0, 1.0]])
OFF_OLD = T([[9.0, math.log(0.5), math.log(1.5), math.log(3.0)]])


def test_token_weights_truncate_at_the_cap_or_mask_outside_floor_and_cap():
    # truncate, cap 2: [0.5, 1.5, 2.0], the third corrected;  mask [0.6, 2]: 0.5 and 3 dropped -> [0, 1.5, 0]
    weights, corrected = off_policy_weights(OFF_OLD, torch.zeros(1, 4), OFF_MASK, 2.0)
    close(weights, [[0.0, 0.5, 1.5, 2.0]])
    close(corrected, [[0.0, 0.0, 0.0, 1.0]])
    weights, corrected = off_policy_weights(OFF_OLD, torch.zeros(1, 4), OFF_MASK, 2.0, mode="mask", floor=0.6)
    close(weights, [[0.0, 0.0, 1.5, 0.0]])
    close(corrected, [[0.0, 1.0, 0.0, 1.0]])
    torch.testing.assert_close(truncated_importance_weights(OFF_OLD, torch.zeros(1, 4), OFF_MASK, 2.0),
                               off_policy_weights(OFF_OLD, torch.zeros(1, 4), OFF_MASK, 2.0)[0])


def test_sequence_and_geometric_weights_share_one_ratio_per_sequence():
    # sequence: 0.5 * 1.5 * 3 = 2.25 -> cap 3 keeps it, cap 2 truncates to 2 (or masks it to 0)
    # geometric: 2.25 ** (1/3) = 1.310371 on each token
    weights, _ = off_policy_weights(OFF_OLD, torch.zeros(1, 4), OFF_MASK, 3.0, level="sequence")
    close(weights, [[0.0, 2.25, 2.25, 2.25]])
    weights, corrected = off_policy_weights(OFF_OLD, torch.zeros(1, 4), OFF_MASK, 2.0, level="sequence")
    close(weights, [[0.0, 2.0, 2.0, 2.0]])
    close(corrected, [[0.0, 1.0, 1.0, 1.0]])
    weights, _ = off_policy_weights(OFF_OLD, torch.zeros(1, 4), OFF_MASK, 2.0, level="sequence", mode="mask")
    close(weights, [[0.0, 0.0, 0.0, 0.0]])
    weights, corrected = off_policy_weights(OFF_OLD, torch.zeros(1, 4), OFF_MASK, 2.0, level="geometric")
    close(weights, [[0.0, 1.310371, 1.310371, 1.310371]])
    close(corrected, [[0.0, 0.0, 0.0, 0.0]])


def test_sequence_weights_on_packed_rows_follow_the_sequence_ids():
    # the row above and a second sequence of ratio 1.2 packed in one row: ids 0 0 0 0 | 1 1
    old = T([[9.0, math.log(0.5), math.log(1.5), math.log(3.0), 9.0, math.log(1.2)]])
    mask = T([[0.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
    weights, _ = off_policy_weights(old, torch.zeros(1, 6), mask, 3.0, level="sequence",
                                    sequence_ids=torch.tensor([[0, 0, 0, 0, 1, 1]]))
    close(weights, [[0.0, 2.25, 2.25, 2.25, 0.0, 1.2]])


def test_off_policy_weights_refuse_a_bad_level_mode_or_floor():
    for kwargs, message in (({"level": "row"}, "level"), ({"mode": "clip"}, "mode"), ({"floor": 2.0}, "floor")):
        with pytest.raises(ValueError, match=message):
            off_policy_weights(OFF_OLD, torch.zeros(1, 4), OFF_MASK, 2.0, **kwargs)
