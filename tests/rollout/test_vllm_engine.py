"""The vllm engine (rollout/vllm_engine.py) against the engine contract: tests/rollout/test_engine_contract.py's
checks, run on a VLLMEngine. Needs a CUDA GPU and vLLM (``pip install 'distilrl[vllm]'``); skipped otherwise, with the reason
(``pytest -rs`` prints it). Without them, only the lazy import is checked: the registry holds ``vllm`` and
building one says what is missing in one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf.core.config.run_config import ModelConfig, RolloutConfig
from rollout.engines import ENGINES
from rollout.vllm_engine import VLLMEngine, vllm_missing

MISSING = vllm_missing()


def test_vllm_is_registered_and_says_what_it_lacks():
    assert ENGINES["vllm"] is VLLMEngine
    if MISSING:
        with pytest.raises(RuntimeError, match="rollout.engine vllm: .*rollout.engine=hf"):
            VLLMEngine("/nonexistent", RolloutConfig(engine="vllm"))


needs_vllm = pytest.mark.skipif(MISSING is not None, reason=f"vllm engine tests skipped: {MISSING}")

if MISSING is None:
    # The contract's checks, collected here with the fixtures below.
    from tests.rollout.test_engine_contract import (model_dir, other_weights, test_finish_reasons_agree_with_end_of_sequence_and_the_length_cap,  # noqa: E501,F401
                                            test_load_weights_changes_what_is_sampled,
                                            test_load_weights_refuses_another_shape_and_keeps_the_old_weights,
                                            test_logprobs_equal_a_recomputed_forward_at_the_temperature,
                                            test_n_samples_per_prompt_grouped_in_prompt_order, tokenizer)

    @pytest.fixture(scope="module")
    def shape() -> ModelConfig:
        # Heads of 64: every vLLM attention backend takes them.
        return ModelConfig(hidden_size=128, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=256)

    @pytest.fixture(scope="module")
    def logprob_atol() -> float:
        return 2e-2  # bf16 in vLLM against the float32 recomputation

    @pytest.fixture(scope="module")
    def _llm(model_dir):
        return VLLMEngine(model_dir, RolloutConfig(engine="vllm", dtype="bfloat16", gpu_memory_utilization=0.3))

    @pytest.fixture
    def engine(_llm, model_dir):
        # One vLLM instance for the module (minutes to start): each test begins from the saved weights.
        from safetensors.torch import load_file

        _llm.load_weights({k: v for f in sorted(Path(model_dir).glob("*.safetensors"))
                           for k, v in load_file(str(f)).items()})
        return _llm


@needs_vllm
def test_sleep_mode_engine_loads_and_samples_after_waking(model_dir, other_weights):
    engine = VLLMEngine(model_dir, RolloutConfig(engine="vllm", dtype="bfloat16", gpu_memory_utilization=0.2,
                                                 sleep_between_rollouts=True))
    assert engine.asleep
    engine.load_weights(other_weights.state_dict())
    torch.manual_seed(0)
    samples = engine.generate(["1+2="], 2, 4, 1.0, False)
    assert len(samples) == 2 and engine.asleep
