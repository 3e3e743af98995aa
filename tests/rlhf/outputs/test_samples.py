"""Sampled completions saved per RL step (rlhf/outputs/samples.py): which samples are picked, what a record holds,
and an RL step writing ``samples/step_N.jsonl`` with each sample's component rewards and advantage."""
from __future__ import annotations

import math

import pytest

from rlhf.core.config.run_config import RunConfig
from rlhf.core.data.datasets import PromptRow
from rlhf.outputs.samples import latest_samples, pick, save_step_samples
from tests.loop_stubs import stub_loop


def test_best_worst_and_random_are_distinct_ordered_and_seeded():
    rewards = [0.5, 2.0, -1.0, 0.5, float("nan"), 3.0, 0.0]
    picked = pick(rewards, 2, seed=0)
    assert picked[:4] == [("best", 5), ("best", 1), ("worst", 4), ("worst", 2)]  # NaN ranks below every number
    drawn = [i for kind, i in picked if kind == "random"]
    assert len(drawn) == 2 and set(drawn) <= {0, 3, 6}
    assert pick(rewards, 2, seed=0) == picked
    assert pick([1.0, 0.0], 2, seed=0) == [("best", 0), ("best", 1)]  # a small batch: each sample once
    assert pick([1.0, 2.0], 0, seed=0) == []


def step_with_samples(tmp_path, k: int, step: int) -> None:
    """One RL step over stand-ins (two prompts, two samples each, rewards 1, 0, 0, 0), saving ``k`` of each kind."""
    cfg = RunConfig(output_dir=str(tmp_path), rollout={"prompts_per_step": 2, "samples_per_prompt": 2},
                    log_samples=k)
    loop = stub_loop(cfg, rewards=[1.0, 0.0, 0.0, 0.0], lengths=[3, 4, 5, 6])
    loop.samples_dir = tmp_path / "samples"
    loop.step(step, [PromptRow("1+1=", "2"), PromptRow("2+2=", "4")])


def test_an_rl_step_saves_its_samples_with_component_rewards_and_advantages(tmp_path):
    step_with_samples(tmp_path, 1, 3)
    step, records = latest_samples(tmp_path)
    assert step == 3 and (tmp_path / "samples" / "step_3.jsonl").is_file()
    best, worst, drawn = records
    # GRPO in the first group: rewards 1 and 0, mean 0.5, sample std 0.7071: advantages +0.7071 and -0.7071;
    # the second group's rewards are equal: advantage 0.
    assert (best["kind"], best["index"], best["prompt"], best["response"]) == ("best", 0, "1+1=", "x")
    assert best["reward"] == 1.0 and best["rewards"] == {"verifier": 1.0, "brevity": 0.5}
    assert best["advantage"] == pytest.approx(0.5 / math.sqrt(0.5), abs=1e-5)
    assert (worst["kind"], worst["index"], worst["prompt"], worst["advantage"]) == ("worst", 3, "2+2=", 0.0)
    assert drawn["kind"] == "random" and drawn["index"] in (1, 2)
    expected = -0.5 / math.sqrt(0.5) if drawn["index"] == 1 else 0.0
    assert drawn["advantage"] == pytest.approx(expected, abs=1e-5)


def test_log_samples_zero_writes_nothing(tmp_path):
    step_with_samples(tmp_path, 0, 1)
    assert latest_samples(tmp_path) is None


def test_the_newest_step_file_is_read_back_and_a_cut_line_ends_it(tmp_path):
    save_step_samples(tmp_path / "samples", 2, [{"kind": "best"}])
    path = save_step_samples(tmp_path / "samples", 10, [{"kind": "best"}, {"kind": "worst"}])
    path.write_text(path.read_text() + '{"kind": "ran')
    assert latest_samples(tmp_path) == (10, [{"kind": "best"}, {"kind": "worst"}])
