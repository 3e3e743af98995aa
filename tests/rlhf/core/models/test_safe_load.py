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


@pytest.mark.parametrize("damage", ["rng", "truncated_trainer", "lost_trainer_file", "rng_not_a_dict",
                                    "lost_in_flight_batches"])
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
    elif damage == "lost_in_flight_batches":  # state.json names one batch in flight; in_flight.json is missing
        (newest / STATE_FILE).write_text(json.dumps({"step": 4, "in_flight": 1}))
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


# ------------------------------------------------------------- model directories: safetensors only (safetensors_dir)

TINY_LM = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny student and a reward model on its backbone, each saved with save_pretrained."""
    from reward.model.distilled import DistilledRewardModel
    from rlhf.core.config.run_config import ModelConfig
    from rlhf.core.models.build import build_student, build_tokenizer, save_student

    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tokenizer("char")
    student = build_student(ModelConfig(**TINY_LM), tokenizer, seed=0)
    save_student(student, tokenizer, root / "lm")
    rm = DistilledRewardModel.from_causal_lm(root / "lm", pad_token_id=tokenizer.pad_token_id, seed=1)
    save_student(rm, tokenizer, root / "rm")
    return root


def pickle_beside_a_decoy(directory: Path, marker: Path) -> None:
    """The issue's case: model.safetensors gone, a decoy .safetensors, and a pytorch_model.bin (with a payload),
    which Hugging Face's from_pretrained loads by default."""
    (directory / "model.safetensors").rename(directory / "decoy.safetensors")
    torch.save({"w": Payload(marker)}, directory / "pytorch_model.bin")


def test_every_loader_refuses_a_pickle_beside_a_decoy_in_one_line_and_never_unpickles(model_dirs, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    from reward.model.distilled import DistilledRewardModel
    from reward.model.seqcls import SeqClsReward
    from reward.teachers.hf_judge import load_judge
    from rlhf.core.models.build import ModelLoadError, check_model_dir, load_student
    from rlhf.rl.ranks.critic import load_value_model

    marker = tmp_path / "ran"
    lm, rm = tmp_path / "lm", tmp_path / "rm"
    shutil.copytree(model_dirs / "lm", lm)
    shutil.copytree(model_dirs / "rm", rm)
    for directory in (lm, rm):
        pickle_beside_a_decoy(directory, marker)
    (lm / "pytorch_model.bin").unlink()  # Hugging Face alone would load this harmless pickle: the bug, shown
    torch.save(AutoModelForCausalLM.from_pretrained(model_dirs / "lm").state_dict(), lm / "pytorch_model.bin")
    assert AutoModelForCausalLM.from_pretrained(lm) is not None
    loaders = [lambda: check_model_dir(lm), lambda: load_student(lm), lambda: load_value_model(str(lm)),
               lambda: load_judge(lm), lambda: DistilledRewardModel.from_causal_lm(str(lm)),
               lambda: check_model_dir(rm, "reward_model.path", "ForSequenceClassification"),
               lambda: DistilledRewardModel.from_pretrained(rm), lambda: SeqClsReward(rm)]
    for load in loaders:
        with pytest.raises(ModelLoadError, match="pickled weights|decoy.safetensors") as err:
            load()
        assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_decoy_model_safetensors_without_the_models_weights_is_refused(model_dirs, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from reward.model.distilled import DistilledRewardModel
    from rlhf.core.models.build import ModelLoadError, load_student

    for name in ("lm", "rm"):
        shutil.copytree(model_dirs / name, tmp_path / name)
        save_file({"decoy": torch.zeros(2)}, tmp_path / name / "model.safetensors")
    with pytest.raises(ModelLoadError, match="lack 1[0-9] of the model's weights"):
        load_student(tmp_path / "lm")
    with pytest.raises(ModelLoadError, match="lack .* of the model's weights"):
        DistilledRewardModel.from_pretrained(tmp_path / "rm")
    # A reward model with the quality head but no RV/CD heads (a plain sequence classifier) still loads.
    from safetensors.torch import load_file

    weights = load_file(model_dirs / "rm" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith(("rv_head", "cd_head"))},
              tmp_path / "rm" / "model.safetensors")
    DistilledRewardModel.from_pretrained(tmp_path / "rm")


def test_links_out_of_the_directory_are_refused_but_a_hub_cache_snapshot_loads(model_dirs, tmp_path):
    import shutil

    from rlhf.core.models.build import ModelLoadError, check_model_dir, load_student

    outside = tmp_path / "outside"
    shutil.copytree(model_dirs / "lm", outside)
    linked = tmp_path / "linked"
    shutil.copytree(model_dirs / "lm", linked)
    for name in ("model.safetensors", "config.json"):
        (linked / name).unlink()
        (linked / name).symlink_to(outside / name)
        with pytest.raises(ModelLoadError, match="outside the model directory"):
            check_model_dir(linked)
        (linked / name).unlink()
        shutil.copy(outside / name, linked / name)
    # The Hugging Face cache's layout: snapshots/REV/FILE -> ../../blobs/HASH, inside the repository's folder.
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted((model_dirs / "lm").iterdir())):
        shutil.copy(file, blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    model, _ = load_student(check_model_dir(snapshot))
    assert model.config.hidden_size == TINY_LM["hidden_size"]


def test_sharded_safetensors_load_and_an_index_naming_a_file_elsewhere_is_refused(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.core.models.build import ModelLoadError, check_model_dir, load_student

    model = AutoModelForCausalLM.from_pretrained(model_dirs / "lm")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    for file in (model_dirs / "lm").iterdir():  # the tokenizer's files
        if not (sharded / file.name).exists() and not file.name.startswith("model."):
            (sharded / file.name).write_bytes(file.read_bytes())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    load_student(sharded)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../lm/model.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="not a .safetensors file beside it"):
        check_model_dir(sharded)
