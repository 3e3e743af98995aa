"""CPU training precision (rlhf/core/models/precision.py, ``trainer.precision``): bf16 units detected from the CPU's
flags, never assumed; the update's FLOPs against hand-worked numbers; and a trainer rank that trains under bf16
autocast with float32 master weights, reporting its MFU against the bf16 GEMM rate."""
from __future__ import annotations

import pytest
import torch

from rlhf.core.models import precision

AVX2_ONLY = {"fpu", "sse4_2", "avx", "avx2", "fma"}
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512_bf16"}


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n"
                    "flags\t\t: fpu avx2 avx512_bf16\n")
    assert precision.cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert precision.cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("setting, flags, cuda, expected", [
    ("auto", AVX2_ONLY, False, "fp32"),        # no bf16 units: auto stays fp32
    ("auto", AVX512_BF16, False, "bf16"),
    ("auto", AVX2_ONLY | {"amx_bf16"}, False, "bf16"),
    ("fp32", AVX512_BF16, False, "fp32"),
    ("bf16", AVX2_ONLY, False, "bf16"),        # asked for: honoured, slow
    ("bf16", AVX512_BF16, True, "fp32"),       # a GPU: trainer.bf16 is the switch there
])
def test_resolve_precision(setting, flags, cuda, expected):
    assert precision.resolve_precision(setting, flags, cuda) == expected


def test_update_flops_by_hand():
    # 100 params, 10 trained tokens, full: (2 + 4) * 100 * 10 = 6000; plus a reference forward over them: 2000.
    assert precision.update_flops(100, 10, lora=False) == 6000
    assert precision.update_flops(100, 10, lora=False, forward_tokens=10) == 8000
    # LoRA: the backward passes activations' gradients only: (2 + 2) * 100 * 10.
    assert precision.update_flops(100, 10, lora=True) == 4000
    assert precision.mfu_metrics(8000, 2.0, "bf16", 8000) == {"perf/train_mfu": 0.5, "perf/train_gemm_gflops": 8e-6,
                                                               "perf/train_bf16": 1.0}


def test_model_params_count_a_tied_output_layer_once_and_no_lookup_only_embedding():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=16)
    tied = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    untied = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False))
    everything = sum(p.numel() for p in untied.parameters())
    assert precision.model_params(untied) == everything - 50 * 8  # the input embedding is a lookup
    assert precision.model_params(tied) == everything - 50 * 8  # the shared matrix counted once, as the output
    assert precision.head_params(tied) == precision.head_params(untied) == 50 * 8


def test_autocast_runs_matrix_products_in_bf16_and_leaves_weights_float32():
    layer = torch.nn.Linear(4, 4)
    with precision.autocast("bf16"):
        out = layer(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with precision.autocast("fp32"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_gemm_rate_is_positive_in_each_precision():
    assert precision.gemm_rate("fp32", size=64, repeats=1) > 0
    assert precision.gemm_rate("bf16", size=64, repeats=1) > 0


# ------------------------------------------------------------------------------------------ a trainer rank


def test_a_bf16_update_keeps_float32_weights_and_reports_its_mfu(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("deepspeed")
    from rlhf.core.algorithms.aggregation import loss_token_weights
    from rlhf.core.data.batch import TrainBatch
    from tests.configs import run_config
    from rlhf.rl.ranks.policy import TrainerGroup
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)  # responses after the prompt
    rows = TrainBatch(input_ids=torch.randint(1, 32, (2, 6), generator=g),
                      attention_mask=torch.ones(2, 6, dtype=torch.long), response_mask=mask,
                      rollout_logprobs=-torch.rand(2, 6, generator=g) * mask,
                      advantages=torch.tensor([[1.0], [-1.0]]) * mask,
                      loss_weights=loss_token_weights(mask, "token-mean", 2))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        metrics = {}
        for setting in ("fp32", "bf16"):
            cfg = run_config({"lr": 1e-3, "threads": 1, "micro_batch_size": 2, "kl_coef": 0.0, "seed": 0})
            cfg.trainer.precision = setting
            group = TrainerGroup(str(tmp_path), cfg, 1, 120)
            try:
                metrics[setting] = group.train_step(rows)
                weights = group.full_state_dict()
            finally:
                group.shutdown()
            assert all(w.dtype == torch.float32 for w in weights.values())
    finally:
        ray.shutdown()
    assert metrics["fp32"]["perf/train_bf16"] == 0.0 and metrics["bf16"]["perf/train_bf16"] == 1.0
    for m in metrics.values():
        assert m["perf/train_mfu"] > 0 and m["perf/train_gemm_gflops"] > 0
    # The same loss up to bf16 rounding of the forward.
    assert metrics["bf16"]["losses/policy_loss"] == pytest.approx(metrics["fp32"]["losses/policy_loss"], abs=0.05)
