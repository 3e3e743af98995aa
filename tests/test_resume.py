"""Checkpoints and resume (rlhf/resume.py): which checkpoints count as complete, pruning, metrics truncation, the
config-change check and its messages; then the end-to-end invariant: 4 RL steps straight equal 2 steps, a hard
kill of the driver process, and a resume to 4 (metrics and final weights), on CPU with fixed seeds."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rlhf.config import RunConfig, load_config
from rlhf.resume import (RNG_FILE, STATE_FILE, ResumeError, check_config, complete_checkpoints, config_changes,
                         newest_checkpoint, prune_checkpoints, python_rng_state, python_rng_tuple, truncate_metrics)

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def fake_checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    path = out / "checkpoints" / f"step_{step}"
    (path / "policy").mkdir(parents=True)
    if complete:
        (path / RNG_FILE).write_bytes(b"x")
        (path / STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_only_checkpoints_with_their_state_file_count_and_the_newest_wins(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, complete=False)  # killed before state.json was written
    (tmp_path / "checkpoints" / "step_14.tmp").mkdir()  # killed while being filled
    torn = fake_checkpoint(tmp_path, 16)
    (torn / STATE_FILE).write_text('{"step": 1')  # cut short
    wrong = fake_checkpoint(tmp_path, 18)
    (wrong / STATE_FILE).write_text('{"step": 4}')  # not this directory's step
    assert [c.step for c in complete_checkpoints(tmp_path)] == [2, 10]
    assert newest_checkpoint(tmp_path).path == tmp_path / "checkpoints" / "step_10"


def test_prune_keeps_the_newest_k_and_removes_interrupted_writes(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "step_8.tmp").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4", "step_6"]


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward/mean": s / 10}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "rew')
    assert truncate_metrics(path, 2) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert truncate_metrics(tmp_path / "absent.jsonl", 2) == 0


def test_python_rng_state_round_trips_through_json():
    rng = random.Random(5)
    rng.random()
    state = json.loads(json.dumps(python_rng_state(rng.getstate())))
    expected = [rng.random() for _ in range(3)]
    other = random.Random()
    other.setstate(python_rng_tuple(state))
    assert [other.random() for _ in range(3)] == expected


def dumped(*overrides: str) -> dict:
    return load_config(TINY, list(overrides)).model_dump()


def test_harmless_changes_are_accepted_and_listed():
    accepted = check_config(dumped(), dumped("algorithm.steps=10", "save_every=5", "call_timeout_s=30",
                                             "output_dir=/elsewhere"), step=2, output_dir="runs/x")
    assert accepted == ["algorithm.steps 2 -> 10", "call_timeout_s 600.0 -> 30.0",
                        "output_dir 'runs/tiny' -> '/elsewhere'", "save_every 0 -> 5"]
    assert check_config(dumped(), dumped(), step=2, output_dir="runs/x") == []


def test_meaningful_changes_are_refused_in_one_line_naming_every_key():
    with pytest.raises(ResumeError) as info:
        check_config(dumped(), dumped("seed=1", "model.hidden_size=64", "rollout.samples_per_prompt=8",
                                      "algorithm.steps=10"), step=2, output_dir="runs/x")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot resume runs/x from step 2: ")
    for key in ("model.hidden_size 32 -> 64", "rollout.samples_per_prompt 4 -> 8", "seed 0 -> 1"):
        assert key in message
    assert "algorithm.steps" not in message  # harmless, so not among the reasons


def test_algorithm_and_reward_changes_are_refused():
    harmless, refused = config_changes(dumped(), dumped("algorithm.advantage=rloo", "reward.components={verifier: 2.0}",
                                                        "trainer.zero_stage=2", "algorithm.kl_coef=0.1"))
    assert harmless == []
    assert [r.split()[0] for r in refused] == ["algorithm.advantage", "algorithm.kl_coef", "reward.components",
                                               "trainer.zero_stage"]


def test_fewer_steps_than_the_checkpoint_is_refused():
    with pytest.raises(ResumeError, match="algorithm.steps=1 is below the checkpoint's step 2"):
        check_config(dumped(), dumped("algorithm.steps=1"), step=2, output_dir="runs/x")
