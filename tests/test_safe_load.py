"""Checkpoint files are read without unpickling code (rlhf/core/models/safe_load.py): a tampered file is refused with one
line and its payload never runs, a damaged newest checkpoint is passed over for the one before it with a warning
(rlhf/core/checkpoints/resume.py newest_usable_checkpoint)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rlhf.core.models import safe_load
from rlhf.core.checkpoints.resume import RNG_FILE, STATE_FILE, ResumeError, load_rng_file, newest_usable_checkpoint


class Payload:
    """What an attacker pickles: unpickling it calls ``Path.touch`` on the marker file (any call would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def real_checkpoint(out: Path, step: int) -> Path:
    """A checkpoint laid out as rlhf.api writes one, with tensors in place of the real states."""
    path = out / "checkpoints" / f"step_{step}"
    (path / "trainer" / "deepspeed").mkdir(parents=True)
    torch.save({"driver": {"cpu": torch.get_rng_state()}, "rollout": [{"cpu": torch.get_rng_state()}]},
               path / RNG_FILE)
    torch.save({"module": {"w": torch.ones(2)}}, path / "trainer" / "deepspeed" / "mp_rank_00_model_states.pt")
    torch.save({"cpu": torch.get_rng_state()}, path / "trainer" / "rng_rank0.pt")
    (path / STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_a_pickled_payload_is_refused_by_both_loaders_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"module": Payload(marker)}, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(safe_load.UnsafeCheckpointError, match="never holds .*pathlib") as info:
        safe_load.check_file(tmp_path / "evil.pt")
    assert "\n" not in str(info.value)
    with pytest.raises(safe_load.UnsafeCheckpointError) as info:
        safe_load.load_weights_only(tmp_path / "evil.pt")
    assert "\n" not in str(info.value)
    # What DeepSpeed does (torch.load with weights_only=False) is forced to the safe loader inside the block.
    with safe_load.weights_only_torch_load(), pytest.raises(safe_load.UnsafeCheckpointError):
        torch.load(tmp_path / "evil.pt", weights_only=False)
    assert torch.load is safe_load._TORCH_LOAD  # put back after the block
    assert not marker.exists()


def test_tensors_and_deepspeeds_own_types_load(tmp_path):
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    del deepspeed
    torch.save({"w": torch.arange(3), "scaler": LossScaler(1.0), "stage": ZeroStageEnum(2)}, tmp_path / "ok.pt")
    safe_load.check_file(tmp_path / "ok.pt")
    with safe_load.weights_only_torch_load():
        state = torch.load(tmp_path / "ok.pt", weights_only=False)
    assert torch.equal(state["w"], torch.arange(3)) and state["stage"] == ZeroStageEnum(2)


def test_a_tampered_newest_checkpoint_is_refused_not_passed_over(tmp_path):
    real_checkpoint(tmp_path, 2)
    newest = real_checkpoint(tmp_path, 4)
    marker = tmp_path / "ran"
    torch.save({"module": Payload(marker)}, newest / "trainer" / "deepspeed" / "mp_rank_00_model_states.pt")
    with pytest.raises(ResumeError, match="mp_rank_00_model_states.pt holds objects") as info:
        newest_usable_checkpoint(tmp_path, log=lambda line: None)
    assert "\n" not in str(info.value) and not marker.exists()


@pytest.mark.parametrize("damage", ["rng", "truncated_trainer", "lost_trainer_file", "rng_not_a_dict"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, damage):
    real_checkpoint(tmp_path, 2)
    newest = real_checkpoint(tmp_path, 4)
    model_states = newest / "trainer" / "deepspeed" / "mp_rank_00_model_states.pt"
    if damage == "rng":
        (newest / RNG_FILE).write_bytes(b"garbage")
    elif damage == "truncated_trainer":
        model_states.write_bytes(model_states.read_bytes()[:100])
    elif damage == "lost_trainer_file":
        os.remove(newest / "trainer" / "rng_rank0.pt")
    else:
        torch.save([torch.zeros(1)], newest / RNG_FILE)
    lines = []
    chosen = newest_usable_checkpoint(tmp_path, log=lines.append)
    assert chosen.step == 2
    assert len(lines) == 1 and lines[0].startswith("warning: checkpoint step 4 is damaged")


def test_no_checkpoint_means_none_and_only_damaged_ones_are_refused(tmp_path):
    assert newest_usable_checkpoint(tmp_path, log=lambda line: None) is None
    (real_checkpoint(tmp_path, 2) / RNG_FILE).write_bytes(b"")
    with pytest.raises(ResumeError, match="all 1 checkpoint\\(s\\) are damaged"):
        newest_usable_checkpoint(tmp_path, log=lambda line: None)


def test_a_payload_in_torchs_legacy_format_is_refused_too(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"module": Payload(marker)}, tmp_path / "evil.pt", _use_new_zipfile_serialization=False)
    torch.save({"w": torch.ones(2)}, tmp_path / "fine.pt", _use_new_zipfile_serialization=False)
    safe_load.check_file(tmp_path / "fine.pt")
    with pytest.raises(safe_load.UnsafeCheckpointError):
        safe_load.check_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_rng_files_load_weights_only(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"driver": Payload(marker)}, tmp_path / RNG_FILE)
    with pytest.raises(safe_load.UnsafeCheckpointError):
        load_rng_file(tmp_path / RNG_FILE)
    assert not marker.exists()
