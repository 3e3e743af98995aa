"""A checkpoint's batches in flight (rlhf/rl/run_checkpoint.py): through JSON and back bit for bit, refused on other
training prompts, and handed to the step by the rollout group without waiting on the workers again. The resume of
a one-step-off run end to end is in tests/rlhf/rl/test_async_rollout.py."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from rlhf.core.checkpoints.resume import ResumeError
from rlhf.core.config.run_config import load_config
from rlhf.core.data.datasets import PromptRow
from rlhf.core.data.samples import Sample
from rlhf.rl.groups.rollout import RolloutGroup
from rlhf.rl.prefetch import LaunchedRollout
from rlhf.rl.run_checkpoint import in_flight_batches, in_flight_record

ROWS = [PromptRow(f"{i}+1=", str(i + 1), difficulty=i % 3) for i in range(6)]


def _batches() -> list[LaunchedRollout]:
    # log-probs as the engines make them (float32 through .tolist()), plus floats JSON could get wrong
    logprobs = torch.randn(5, generator=torch.Generator().manual_seed(0)).log_softmax(0).tolist()
    odd = [0.1 + 0.2, 5e-324, -1e308, float("-inf"), -0.0]
    partial = Sample(0, [7, 8], [1, 2, 3, 4, 5], logprobs, "length", "abcde", token_versions=[3, 3, 4, 4, 4])
    turns = Sample(1, [9], [6, 7, 8, 9, 10], odd, "stop", "tool talk", loss_mask=[1, 1, 0, 0, 1],
                   final_text="10", episode={"turns": 2, "tool_calls": 1, "tool_errors": 0, "tool_s": 0.25})
    return [LaunchedRollout([ROWS[4], ROWS[1]], 3, [], [partial, turns]),
            LaunchedRollout([ROWS[0], ROWS[4]], 4, [], [partial])]


def test_in_flight_batches_come_back_from_json_field_for_field_and_bit_for_bit():
    batches = _batches()
    back = in_flight_batches(json.loads(json.dumps(in_flight_record(batches, ROWS))), list(ROWS), None)
    assert [b.version for b in back] == [3, 4] and all(b.calls == [] for b in back)
    assert [[row is orig for row, orig in zip(b.rows, a.rows)] for a, b in zip(batches, back)] == [[True] * 2] * 2
    for a, b in zip(batches, back):
        assert b.samples == a.samples
        for x, y in zip(a.samples, b.samples):  # == would let -0.0 pass for 0.0
            assert [v.hex() for v in x.logprobs] == [v.hex() for v in y.logprobs]


def test_in_flight_batches_drawn_from_other_prompts_are_refused():
    record = json.loads(json.dumps(in_flight_record(_batches(), ROWS)))
    with pytest.raises(ResumeError, match="other training prompts"):
        in_flight_batches(record, list(reversed(ROWS)), "runs/x/checkpoints/step_2")
    with pytest.raises(ResumeError, match="other training prompts"):
        in_flight_batches(record, ROWS[:3], "runs/x/checkpoints/step_2")


def test_a_batch_with_its_samples_is_collected_without_waiting_on_the_workers_again():
    group = RolloutGroup(load_config(None, ["rollout.asynchronous=true"]), SimpleNamespace(), lambda: None)
    ready = _batches()[0]
    assert group.wait(ready) is ready
    assert group.collect(ready) is ready.samples
