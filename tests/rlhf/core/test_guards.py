"""Numerical guards (rlhf/core/guards.py): which batches are skipped, how they are counted, when the run stops and what
the message names. DeepSpeed's side (an update with a non-finite gradient is refused) is in test_trainer_state.py."""
from __future__ import annotations

import pytest

from rlhf.core.guards import (
    BatchGuard,
    NonFiniteError,
    finite_metrics,
    reward_fault,
    update_fault,
)

NAN, INF = float("nan"), float("inf")


def test_finite_rewards_are_no_fault():
    assert reward_fault(["a", "b"], [{"reward": 1.0}, {"reward": -2.5}]) is None


def test_a_nan_reward_names_its_component_the_count_and_the_first_prompt():
    scores = [{"reward": 1.0}, {"reward": NAN, "nonfinite": "rm=nan"}, {"reward": INF, "nonfinite": "custom=inf"}]
    fault = reward_fault(["p0", "p1", "p2"], scores)
    assert fault == "non-finite reward from rm=nan in 2 of 3 samples (first on prompt 'p1')"


def test_a_nan_reward_without_a_named_component_shows_the_value():
    assert reward_fault(["p"], [{"reward": -INF}]) == "non-finite reward from reward=-inf in 1 of 1 samples " \
                                                      "(first on prompt 'p')"


def test_update_fault_tells_a_nan_loss_from_a_nan_gradient():
    assert update_fault({"losses/policy_loss": 0.3, "losses/grad_norm": 1.2, "faults/update_skipped": 0.0}) is None
    assert update_fault({"losses/policy_loss": NAN, "faults/update_skipped": 1.0}) == "non-finite policy loss nan"
    assert update_fault({"losses/policy_loss": 0.3, "losses/grad_norm": INF, "faults/update_skipped": 1.0}) == \
        "non-finite gradient (norm inf)"


def test_guard_counts_skips_resets_the_streak_and_stops_at_the_limit_naming_the_last_fault():
    guard = BatchGuard(max_in_a_row=2)
    guard.record("non-finite policy loss nan")
    guard.check(1)
    guard.record(None)  # a good batch ends the streak, not the total
    assert (guard.skipped, guard.in_a_row, guard.last_fault) == (1, 0, None)
    guard.record("non-finite reward from rm=nan in 1 of 4 samples (first on prompt 'x')")
    guard.check(3)
    guard.record("non-finite gradient (norm inf)")
    with pytest.raises(NonFiniteError, match=r"^stopping at step 4: 2 batches in a row skipped .*max_bad_batches=2.*"
                                             r"the last: non-finite gradient \(norm inf\)$"):
        guard.check(4)
    assert guard.skipped == 3


def test_guard_state_round_trips():
    guard = BatchGuard(3)
    guard.record("non-finite policy loss nan")
    other = BatchGuard(3)
    other.load_state(guard.state())
    assert other.state() == guard.state() == {"skipped": 1, "in_a_row": 1, "last_fault": "non-finite policy loss nan"}


def test_finite_metrics_drops_only_non_finite_floats():
    assert finite_metrics({"step": 3, "losses/policy_loss": NAN, "losses/grad_norm": INF, "reward/mean": 0.5,
                           "faults/skipped_batches": 1}) == {"step": 3, "reward/mean": 0.5, "faults/skipped_batches": 1}
