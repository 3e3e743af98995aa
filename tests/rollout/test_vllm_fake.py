"""The vllm engine (rollout/vllm_engine.py) over a stand-in vLLM on CPU (tests/fake_vllm.py, its signatures checked
against the real one by tests/rollout/test_vllm_signatures.py): what it asks vLLM for and how it reads the answers, on
every CI run. A tied checkpoint takes the trainer's weights; each prompt has its own seeds; the generation config's
extra end-of-sequence ids stop a response as ``stop``; temperatures vLLM refuses are refused in one line and greedy
n > 1 works; ``max_model_len`` is the run's bound, not the model's context; sleep/wake happen in the right order
with the memory logged; vLLM's weight-transfer calls load the weights and set the version."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.core.config.run_config import ModelConfig, RolloutConfig
from rlhf.core.distributed import colocate
from rlhf.core.models.build import build_student, build_tokenizer, save_student
from rollout import vllm_params
from rollout.vllm_engine import VLLMEngine
from tests import fake_vllm

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("char")


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tied")
    student = build_student(TINY, tokenizer, seed=0)
    assert student.config.tie_word_embeddings
    save_student(student, tokenizer, path)
    return str(path)


def engine(model_dir: str, **rollout) -> VLLMEngine:
    return VLLMEngine.with_vllm(model_dir, RolloutConfig(engine="vllm", **rollout), fake_vllm.FakeVLLM)


def trainer_state_dict(tokenizer, seed: int) -> dict[str, torch.Tensor]:
    """What a trainer's full_state_dict gives for a tied model: lm_head.weight beside the embedding."""
    return build_student(TINY, tokenizer, seed=seed).state_dict()


def test_a_tied_checkpoint_takes_the_trainers_full_state_dict(model_dir, tokenizer):
    eng = engine(model_dir)
    assert "lm_head.weight" not in eng.expected  # the safetensors of a tied model
    other = trainer_state_dict(tokenizer, seed=1)
    assert "lm_head.weight" in other
    eng.load_weights(other)
    loaded = dict(eng.llm.model.named_parameters())
    assert torch.equal(loaded["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="unexpected"):  # a name the checkpoint never had is still refused
        eng.load_weights({**other, "model.extra.weight": torch.zeros(1)})


def test_every_prompt_draws_its_own_seeds(model_dir):
    eng = engine(model_dir)
    torch.manual_seed(0)
    eng.generate(["1+2=", "3+4="], 3, 2, 1.0, False)  # prompts of one length
    seeds = [sp.seed for sp in eng.llm.sampling]
    assert len(seeds) == 2
    drawn = [s + k for s in seeds for k in range(3)]  # vLLM's child seeds
    assert len(set(drawn)) == 6
    torch.manual_seed(0)
    eng.generate(["1+2=", "3+4="], 3, 2, 1.0, False)
    assert [sp.seed for sp in eng.llm.sampling[2:]] == seeds  # from the worker's (checkpointed) generator


def test_prompt_seeds_are_n_apart_and_bounded():
    assert vllm_params.prompt_seeds(10, 3, 4) == [10, 14, 18]
    with pytest.raises(ValueError):
        vllm_params.prompt_seeds(vllm_params.base_seed_bound(3, 4) + 1, 3, 4)


def test_the_generation_configs_extra_eos_ids_stop_a_response(model_dir, tokenizer, tmp_path):
    first = engine(model_dir).generate(["1+2="], 1, 1, 1.0, True)[0].response_ids[0]
    assert first != tokenizer.eos_token_id
    extra = tmp_path / "extra_eos"
    for f in Path(model_dir).iterdir():
        (extra / f.name).parent.mkdir(exist_ok=True)
        (extra / f.name).write_bytes(f.read_bytes())
    (extra / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_token_id, first]}))
    sample = engine(str(extra)).generate(["1+2="], 1, 5, 1.0, True)[0]
    assert sample.response_ids == [first] and sample.finish_reason == "stop"


def test_temperatures_vllm_refuses_are_refused_in_one_line_and_greedy_n_works(model_dir):
    eng = engine(model_dir)
    with pytest.raises(ValueError, match="rollout.temperature") as err:
        eng.generate(["1+2="], 2, 2, 2.5, False)
    assert "\n" not in str(err.value)
    samples = eng.generate(["1+2=", "34+5="], 3, 3, 1.0, True)
    assert len(samples) == 6 and [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
    assert samples[0].response_ids == samples[2].response_ids and samples[0] is not samples[1]


def test_max_model_len_is_the_runs_bound_not_the_models_context(model_dir, tmp_path):
    long = tmp_path / "long_context"
    long.mkdir()
    for f in Path(model_dir).iterdir():
        (long / f.name).write_bytes(f.read_bytes())
    config = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 131072}))
    assert engine(str(long), max_model_len=640).llm.kwargs["max_model_len"] == 640
    assert engine(str(long)).llm.kwargs["max_model_len"] == vllm_params.DEFAULT_MODEL_LEN
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine(model_dir, max_model_len=10**6)


def test_tensor_parallel_engines_run_vllms_own_workers(model_dir):
    kwargs = engine(model_dir, tensor_parallel_size=2).llm.kwargs
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["distributed_executor_backend"] == "mp"


def test_sleep_and_wake_in_order_with_the_memory_logged(model_dir, tokenizer, monkeypatch):
    monkeypatch.setattr(colocate, "gpu_memory_line", lambda what: what)  # CUDA's free memory, on CPU
    eng = engine(model_dir, sleep_between_rollouts=True)
    assert eng.llm.kwargs["enable_sleep_mode"] and eng.asleep is True
    eng.load_weights(trainer_state_dict(tokenizer, seed=2))
    eng.generate(["1+2="], 2, 2, 1.0, False)
    calls = eng.llm.calls
    assert calls == ["sleep:1", "wake_up:weights", "collective_rpc:reload_weights", "reset_prefix_cache",
                     "wake_up:kv_cache", "generate", "sleep:1"]
    assert eng.memory_log == ["vllm asleep", "vllm weights awake", "vllm awake", "vllm asleep"]


def test_vllms_weight_transfer_calls_load_the_weights_and_set_the_version(model_dir, tokenizer, monkeypatch):
    eng = VLLMEngine.with_vllm(model_dir, RolloutConfig(engine="vllm", sleep_between_rollouts=True).model_copy(
        update={"weight_transfer": "fake"}), fake_vllm.FakeVLLM)
    assert eng.llm.kwargs["weight_transfer_config"] == {"backend": "fake"}
    eng.init_weight_transfer_engine({"packed": True})
    new = {k: v for k, v in trainer_state_dict(tokenizer, seed=3).items() if k in eng.expected}
    eng.start_weight_update()
    names = sorted(new)
    for bucket in (names[:2], names[2:]):  # bucket by bucket
        fake_vllm.SHARED.update({i: new[name] for i, name in enumerate(bucket)})
        eng.update_weights({"names": bucket, "handles": list(range(len(bucket)))})
    eng.finish_weight_update("7")
    assert eng.llm.weight_version == "7" and eng.llm.calls[-1] == "reset_prefix_cache"
    assert eng.llm.calls.index("wake_up:weights") < eng.llm.calls.index("start_weight_update")
    loaded = dict(eng.llm.model.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in new.items())
