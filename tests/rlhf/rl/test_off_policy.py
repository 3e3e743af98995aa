"""Off-policy corrections and several updates per rollout batch, without Ray: truncated importance sampling
weights by hand, mini-batch loss weights and batch-unit checks, and the rollout pipeline's launch order (the
asynchronous schedule) with stand-in launches. As in test_algorithms.py, each expected value is a literal with its
arithmetic in the comment beside it.
"""
from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from rlhf.core.algorithms.policy_losses import clipped_policy_loss, truncated_importance_weights
from rlhf.core.data.batch import make_train_batch
from rlhf.core.config.run_config import ConfigError, load_config
from rlhf.rl.prefetch import LaunchedRollout, RolloutPrefetch
from rlhf.core.data.samples import Sample
from tests.loop_stubs import stub_loop

T = torch.tensor


def close(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ------------------------------------------------------------------------- truncated importance sampling


def test_tis_weights_are_the_trainer_over_sampler_ratio_capped():
    # old - rollout log-probs: 0 -> e^0 = 1;  ln 1.5 -> 1.5;  ln 0.5 -> 0.5;  ln 4 -> 4, capped at 2;  5 -> capped
    old = T([[0.0, math.log(1.5), math.log(0.5), math.log(4.0), 5.0]])
    rollout = torch.zeros(1, 5)
    weights = truncated_importance_weights(old - 1.0, rollout - 1.0, torch.ones(1, 5), cap=2.0)  # shift-invariant
    close(weights, [[1.0, 1.5, 0.5, 2.0, 2.0]])


def test_tis_weights_are_zero_off_the_response_and_on_all_padding_rows():
    # row 0: prompt token, response of one token (ratio e^-1 = 0.367879), padding
    # row 1: all padding (mask all 0), whatever the log-probs say
    old = T([[0.0, -2.0, 0.0], [3.0, 3.0, 3.0]])
    rollout = T([[-7.0, -1.0, -9.0], [0.0, 0.0, 0.0]])
    mask = T([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    close(truncated_importance_weights(old, rollout, mask, cap=2.0), [[0.0, 0.367879, 0.0], [0.0, 0.0, 0.0]])


def test_tis_weights_stay_finite_where_the_sampler_found_a_token_nearly_impossible():
    # rollout log-prob -1000: exp(1000) overflows float32, the capped weight does not
    weights = truncated_importance_weights(T([[0.0]]), T([[-1000.0]]), T([[1.0]]), cap=3.0)
    close(weights, [[3.0]])


def test_tis_weights_carry_no_gradient():
    old = T([[0.1, 0.2]], requires_grad=True)
    weights = truncated_importance_weights(old, torch.zeros(1, 2), torch.ones(1, 2), cap=2.0)
    assert not weights.requires_grad


def test_tis_cap_must_be_positive():
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), cap=0.0)


def test_tis_weighted_policy_gradient_by_hand():
    # One token, A = +1, new = old (ratio 1, unclipped): d(-A * ratio)/dlogp = -1; TIS weight
    # exp(old - rollout) = exp(ln 1.5) = 1.5 scales the loss to -1.5 and the gradient to -1.5.
    logp = T([[0.0]], requires_grad=True)
    pg, _ = clipped_policy_loss(logp, logp.detach(), T([[1.0]]))
    weights = truncated_importance_weights(logp, T([[-math.log(1.5)]]), T([[1.0]]), cap=2.0)
    (pg * weights).sum().backward()
    close((pg * weights).detach(), [[-1.5]])
    close(logp.grad, [[-1.5]])


# ------------------------------------------------------------------------------------------- mini-batches


def _samples(lengths: list[int]) -> list[Sample]:
    """One-token prompts, responses of the given lengths."""
    return [Sample(i, [7], [5] * n, [-0.5] * n, "stop", "x") for i, n in enumerate(lengths)]


def test_token_mean_weights_normalise_each_mini_batch_on_its_own():
    # 4 rows, response lengths 1, 3 | 2, 2 in two mini-batches: 4 tokens each -> 1/4 per token in both.
    # As one batch it would be 1/8 per token; each mini-batch's weights sum to 1, as its loss is a mean.
    batch = make_train_batch(_samples([1, 3, 2, 2]), torch.zeros(4), 0, "token-mean", 4, mini_batches=2)
    weights = batch.loss_weights
    close(weights[:, 1:].sum(dim=1), [0.25, 0.75, 0.5, 0.5])
    close(weights[:2].sum().reshape(1), [1.0])
    close(weights[2:].sum().reshape(1), [1.0])


def test_seq_mean_and_dr_grpo_weights_per_mini_batch():
    # seq-mean, 2 rows per mini-batch: each row's tokens share 1/2; row of 3 tokens -> 1/6 each
    seq = make_train_batch(_samples([1, 3, 2, 2]), torch.zeros(4), 0, "seq-mean", 4, mini_batches=2).loss_weights
    close(seq[1, 1:4], [1 / 6, 1 / 6, 1 / 6])
    close(seq[0, 1:2], [0.5])
    # dr-grpo: 1 / (rows in the mini-batch x max_response_tokens) = 1 / (2 x 4) per token
    dr = make_train_batch(_samples([1, 3, 2, 2]), torch.zeros(4), 0, "dr-grpo", 4, mini_batches=2).loss_weights
    close(dr[1, 1:4], [0.125, 0.125, 0.125])


def test_one_mini_batch_is_the_whole_batch_weights():
    one = make_train_batch(_samples([1, 3, 2, 2]), torch.zeros(4), 0, "token-mean", 4).loss_weights
    close(one[:, 1:].sum(dim=1), [0.125, 0.375, 0.25, 0.25])


def test_rows_that_do_not_split_into_mini_batches_are_refused():
    with pytest.raises(ValueError, match="4 rows do not split into 3 equal mini-batches"):
        make_train_batch(_samples([1, 1, 1, 1]), torch.zeros(4), 0, "token-mean", 4, mini_batches=3)


def test_config_refuses_mini_batches_that_do_not_divide_the_rollout_rows_across_ranks():
    # 4 prompts x 4 samples = 16 rows; 3 mini-batches x 2 ranks = 6 does not divide 16
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "trainer.num_ranks=2",
                           "trainer.mini_batches_per_step=3"])
    message = str(err.value)
    assert "\n" not in message
    assert "16" in message and "trainer.mini_batches_per_step x trainer.num_ranks=6" in message


@pytest.mark.parametrize("override", ["trainer.mini_batches_per_step=0", "algorithm.ppo_epochs=0",
                                      "algorithm.tis_cap=0", "algorithm.tis_cap=-1", "rollout.max_staleness=-1",
                                      "rollout.asynchronous=maybe"])
def test_bad_off_policy_options_are_config_errors(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_off_policy_options_default_to_off():
    cfg = load_config(None)
    assert cfg.trainer.mini_batches_per_step == 1 and cfg.algorithm.ppo_epochs == 1
    assert cfg.algorithm.tis_cap is None and cfg.rollout.asynchronous is False and cfg.rollout.max_staleness == 1


def test_describe_batches_states_mini_batches_and_optimizer_steps():
    text = load_config(None, ["rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "trainer.num_ranks=2",
                              "trainer.mini_batches_per_step=4", "trainer.micro_batch_size=2",
                              "algorithm.ppo_epochs=2", "rollout.asynchronous=true"]).describe_batches()
    # 32 rows -> 4 mini-batches of 8 -> 2 ranks x 4 rows in micro-batches of 2; 4 x 2 = 8 optimizer steps
    assert "32 rollout rows" in text and "4 mini-batch(es) of 8 rows" in text
    assert "2 trainer rank(s) x 4 rows in micro-batches of 2" in text
    assert "8 optimizer step(s) per RL step (2 epoch(s))" in text and "1 step(s) ahead (asynchronous)" in text


# ------------------------------------------------------------------------------------- the rollout pipeline


class _Launcher:
    """Stands in for RLStep.launch: records each launch with the weights version current at that moment."""

    def __init__(self):
        self.version, self.launched = 0, []

    def __call__(self) -> LaunchedRollout:
        rollout = LaunchedRollout(rows=[len(self.launched) + 1], version=self.version, calls=[])
        self.launched.append(rollout)
        return rollout


def _run(depth: int, steps: int) -> tuple[list[tuple[int, int, int]], _Launcher]:
    """(batch, version that generated it, staleness when trained) per step; each step's update bumps the version."""
    launcher = _Launcher()
    pipeline = RolloutPrefetch(launcher, depth)
    trained = []
    for step in range(1, steps + 1):
        rollout = pipeline.next(remaining=steps - step)
        trained.append((rollout.rows[0], rollout.version, launcher.version - rollout.version))
        launcher.version += 1  # the update, then the weight sync
    return trained, launcher


def test_synchronous_pipeline_generates_each_batch_from_the_latest_weights():
    trained, launcher = _run(depth=0, steps=3)
    assert trained == [(1, 0, 0), (2, 1, 0), (3, 2, 0)]


def test_one_step_off_pipeline_trains_each_batch_one_update_late_and_launches_nothing_past_the_end():
    trained, launcher = _run(depth=1, steps=4)
    # batch 2 is launched with batch 1, before update 1, so both come from v0; batch k from v(k-2) after that
    assert trained == [(1, 0, 0), (2, 0, 1), (3, 1, 1), (4, 2, 1)]
    assert len(launcher.launched) == 4  # the last step launched no batch that nothing would train on


def test_two_steps_off_pipeline_bounds_staleness_by_its_depth():
    trained, _ = _run(depth=2, steps=5)
    assert [s for _, _, s in trained] == [0, 1, 2, 2, 2]
    assert [b for b, _, _ in trained] == [1, 2, 3, 4, 5]  # prompts keep their order whatever the depth


def test_pipeline_keeps_launched_rollouts_for_a_checkpoint_to_wait_for():
    launcher = _Launcher()
    pipeline = RolloutPrefetch(launcher, 1)
    first = pipeline.next(remaining=10)
    assert first.rows == [1] and [r.rows for r in pipeline.in_flight] == [[2]]
    waited = pipeline.wait_in_flight(lambda r: replace(r, calls=[], samples=[f"sample of {r.rows[0]}"]))
    assert [r.samples for r in waited] == [["sample of 2"]]
    assert pipeline.next(remaining=10) is waited[0]  # the live run trains the batch it waited for
    with pytest.raises(ValueError):
        RolloutPrefetch(launcher, -1)


def test_batches_put_back_on_resume_come_first_in_their_order_then_launches_resume():
    """Two steps off, resumed with batches 3 and 4 in flight: the uninterrupted run's order and versions."""
    straight, _ = _run(depth=2, steps=6)
    launcher = _Launcher()
    launcher.launched, launcher.version = [None, None, None, None], 2  # launches 1-4 happened before the checkpoint
    pipeline = RolloutPrefetch(launcher, 2)
    pipeline.put_back([LaunchedRollout([3], 0, [], ["s3"]), LaunchedRollout([4], 1, [], ["s4"])])
    resumed = []
    for step in range(3, 7):
        rollout = pipeline.next(remaining=6 - step)
        resumed.append((rollout.rows[0], rollout.version, launcher.version - rollout.version))
        launcher.version += 1
    assert resumed == straight[2:]


# ------------------------------------------------------------------------------- the driver step, stubbed


def test_driver_step_logs_staleness_and_the_versions_of_a_launched_batch():
    """RLStep.step on a batch launched one update ago: staleness 1, generated by v0, trained at v1 -> v2."""
    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "trainer.num_ranks=2",
                             "rollout.max_new_tokens=4", "rollout.asynchronous=true", "trainer.mini_batches_per_step=2",
                             "trainer.micro_batch_size=1"])
    loop = stub_loop(cfg, [1, 0, 0, 1], [1, 2, 1, 1], version=1)
    batches = loop.update.policy.batches
    rows = [SimpleNamespace(prompt="p0", answer="1", difficulty=None), SimpleNamespace(prompt="p1", answer="1",
                                                                                        difficulty=None)]
    metrics = loop.step(2, rows, LaunchedRollout(rows, version=0, calls=[]))
    assert metrics["perf/staleness"] == 1
    assert metrics["charts/rollout_weights_version"] == 0 and metrics["charts/weights_version"] == 2
    # two mini-batches of 2 rows: row lengths 1, 2 then 1, 1 -> token-mean weights 1/3, 2/3 then 1/2, 1/2
    (batch,) = batches
    close(batch.loss_weights.sum(dim=1), [1 / 3, 2 / 3, 0.5, 0.5])
