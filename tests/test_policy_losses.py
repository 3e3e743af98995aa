"""Policy-gradient losses (rlhf/core/algorithms/policy_losses.py) against numbers worked out by hand."""
from __future__ import annotations

import pytest
import torch

from rlhf.core.algorithms.policy_losses import clipped_policy_loss

T = torch.tensor


def close(actual: torch.Tensor, expected: list, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), atol=atol, rtol=0)


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
