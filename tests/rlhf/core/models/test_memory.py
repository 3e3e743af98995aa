"""The memory estimate (rlhf/core/models/memory.py) against numbers worked out by hand, parameter counts against real
models, and the one-line refusal of a run that cannot fit."""
from __future__ import annotations

import pytest

from rlhf.core.config.run_config import ConfigError, load_config
from rlhf.core.models.memory import (
    ModelShape,
    describe,
    refuse_if_too_big,
    rollout_worker_memory,
    run_estimate,
    trainer_rank_memory,
)

# q 8x8, k and v 8x4, o 8x8, gate and up 8x16, down 16x8: 576 weights per layer, 16 in its two norms.
SHAPE = ModelShape(vocab=100, hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, tied=True)


def test_parameter_counts_by_hand():
    assert SHAPE.parameters() == 100 * 8 + 2 * (576 + 16) + 8  # 1992
    assert SHAPE.lora_parameters(2, ["q_proj", "v_proj"]) == 2 * (2 * (8 + 8) + 2 * (8 + 4))  # 112
    # Per token and layer: 3 * 8 + 2 * 8 (q, attention out) + 2 * 4 (k, v) + 4 * 16 = 112 values.
    assert SHAPE.activation_values_per_token(checkpointing=False) == 2 * 112
    assert SHAPE.activation_values_per_token(checkpointing=True) == 2 * 8 + 112


def test_qwen2_5_7b_has_its_published_parameter_count():
    shape = ModelShape(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944,
                       tied=False)
    qkv_biases = 28 * (3584 + 2 * 512)  # the only weights the estimate leaves out
    assert shape.parameters() + qkv_biases == 7_615_616_512


def test_full_fine_tuning_on_zero2_with_a_reference():
    m = trainer_rank_memory(SHAPE, ranks=2, zero_stage=2, lora_r=None, lora_targets=[], bf16=False,
                            kl_reference=True, micro_batch_tokens=10, checkpointing=False)
    assert m.weights == 1992 * 4  # whole on every rank under ZeRO-2
    assert m.gradients == 1992 * 4 // 2
    assert m.optimizer == 1992 * 4 * 2 // 2  # Adam's two float32 moments, partitioned
    assert m.reference == 1992 * 4
    assert m.activations == 10 * (224 * 4 + 3 * 100 * 4)  # blocks + float32 logits, scaled copy, log-softmax
    assert m.total == 7968 + 3984 + 7968 + 7968 + 20960


def test_lora_on_zero3_in_bf16_with_checkpointing():
    m = trainer_rank_memory(SHAPE, ranks=2, zero_stage=3, lora_r=2, lora_targets=["q_proj", "v_proj"], bf16=True,
                            kl_reference=True, micro_batch_tokens=10, checkpointing=True)
    assert m.weights == (1992 + 112) * 2 // 2  # base and adapters in bf16, partitioned
    assert m.gradients == 112 * 2 // 2  # the adapters' only
    assert m.optimizer == 112 * 4 * 3 // 2  # fp32 master copy and two moments of the adapters
    assert m.reference == 0  # the same weights with the adapters off
    assert m.activations == 10 * (128 * 2 + 1200)


def test_rollout_worker_weights_and_kv_cache():
    m = rollout_worker_memory(SHAPE, rows=3, tokens_per_row=10)
    assert (m.weights, m.kv_cache, m.activations) == (1992 * 4, 2 * 2 * 1 * 4 * 3 * 10 * 4, 3 * 100 * 4)


def test_counts_match_a_real_llama_and_peft():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=4, intermediate_size=16,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    assert ModelShape.from_hf_config(config.to_dict()) == SHAPE
    assert sum(p.numel() for p in model.parameters()) == SHAPE.parameters()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == 112


def test_a_run_that_cannot_fit_is_refused_in_one_line():
    cfg = load_config(None, ["trainer.num_ranks=2", "rollout.num_workers=1"])
    estimate = run_estimate(cfg, SHAPE, prompt_tokens=20)
    need = 2 * estimate["trainer rank"].total + estimate["rollout worker"].total
    refuse_if_too_big(cfg, estimate, host_bytes=need, gpu_bytes=None)  # fits exactly
    with pytest.raises(ConfigError, match=r"2 trainer rank\(s\) and 1 rollout worker\(s\) need about .* this host "
                                          r"has .* of memory: set model.lora") as err:
        refuse_if_too_big(cfg, estimate, host_bytes=need - 1, gpu_bytes=None)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="a trainer rank needs about .* GPU memory"):
        refuse_if_too_big(cfg, estimate, host_bytes=None, gpu_bytes=estimate["trainer rank"].total - 1)
    assert describe(estimate).startswith("memory estimate per process: trainer rank ")


def test_a_run_too_big_for_this_host_stops_before_loading_anything(tmp_path, capsys):
    """Through the CLI: a student the size of a 70B model (about 1 TB of weights, gradients and Adam state per rank)
    is refused with one line and exit status 2, before it is built, and no run directory is written."""
    from rlhf.cli import main

    out = tmp_path / "run"
    code = main(["run", "configs/tiny.yaml", f"output_dir={out}", "stages=[rl]", "model.hidden_size=8192",
                 "model.num_layers=80", "model.num_heads=64", "model.num_kv_heads=8", "model.intermediate_size=28672"])
    err = capsys.readouterr().err
    assert code == 2 and "need about" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
