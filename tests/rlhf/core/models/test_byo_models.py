"""Bring your own models: local Qwen2, Qwen3 and Llama directories as the student (tiny, random, saved to tmp dirs),
a run that trains one with prompts, a custom reward and a verifier all named in the config, and checkpoints that
load back with plain transformers; the GSM8K configs validate."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from rlhf.core.models.char_tokenizer import build_char_tokenizer
from rlhf.core.config.run_config import load_config
from rlhf.core.models.build import load_student
from rollout.engine import generate
from tests.paths import REPO

SIZES = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
             max_position_embeddings=128)
ARCHITECTURES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16, "tie_word_embeddings": True}),
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": False}),
}


def save_tiny_student(kind: str, path: Path, pad_token: bool = True) -> Path:
    """A random tiny causal LM of architecture ``kind`` with the character tokenizer, as ``save_pretrained`` writes
    it; ``pad_token=False`` saves a tokenizer without one, as Llama's come."""
    config_cls, model_cls, extra = ARCHITECTURES[kind]
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                 bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 **SIZES, **extra))
    model.save_pretrained(path)
    if not pad_token:
        tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_local_students_of_each_architecture_sample_and_load_back(kind, tmp_path):
    path = save_tiny_student(kind, tmp_path / kind, pad_token=kind != "llama")
    model, tokenizer = load_student(path)
    assert type(model) is ARCHITECTURES[kind][1]
    assert tokenizer.pad_token_id is not None  # Llama's missing pad token falls back to its end-of-sequence token
    samples = generate(model.eval(), tokenizer, ["1+2=", "10-3+4="], n=2, max_new_tokens=6, temperature=1.0)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    assert all(0 < len(s.response_ids) <= 6 and len(s.logprobs) == len(s.response_ids) for s in samples)
    assert all(lp <= 0.0 for s in samples for lp in s.logprobs)


def test_llama_student_trains_on_a_csv_with_a_custom_reward_named_in_the_config(tmp_path, capsys):
    """One RL step from the command line: a Llama directory without a pad token, prompts from CSV held out by
    fraction, the regex verifier, and a custom reward from a file, all in the YAML; the policy it writes loads
    with AutoModelForCausalLM and AutoTokenizer alone."""
    from rlhf.cli import main

    student = save_tiny_student("llama", tmp_path / "llama", pad_token=False)
    rows = "".join(f"{a}+{b}=,{a + b},{1 + (a + b) % 3}\n" for a in range(10) for b in range(4))
    (tmp_path / "sums.csv").write_text("problem,total,level\n" + rows)
    (tmp_path / "rewards.py").write_text(
        "async def spread(prompts, responses, rows):  # differs between any two samples: a gradient every step\n"
        "    return [sum(map(ord, r)) * row['level'] / 1000 for r, row in zip(responses, rows)]\n")
    config = {
        "output_dir": str(tmp_path / "run"), "stages": ["rl", "eval"],
        "model": {"model_name_or_path": str(student)},
        "task": {"name": "dataset", "train_file": str(tmp_path / "sums.csv"), "eval_fraction": 0.25,
                 "prompt_field": "problem", "answer_field": "total", "difficulty_field": "level",
                 "eval_prompts": 6, "verifier": "regex", "answer_regex": r"#(\d+)"},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6},
        "reward": {"components": {"verifier": 1.0, "custom": 0.5}, "custom_fn": f"{tmp_path / 'rewards.py'}:spread"},
        "trainer": {"num_ranks": 1, "micro_batch_size": 4},
        "algorithm": {"steps": 1},
        "eval": {"max_new_tokens": 6},
    }
    (tmp_path / "run.yaml").write_text(json.dumps(config))  # JSON is YAML
    assert main(["run", str(tmp_path / "run.yaml")]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["losses/grad_norm"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"] == {"train_prompts": 30, "eval_prompts": 6, "train_skipped_bad": 0, "eval_skipped_bad": 0}
    # Not copied into warmup/: the weights are the source's file (linked: the tokenizer gained a pad token)
    assert (run / "warmup" / "model.safetensors").samefile(student / "model.safetensors")
    assert set(summary["eval_after"]["by_difficulty"]) <= {"1", "2", "3"}
    policy = AutoModelForCausalLM.from_pretrained(run / "policy")
    assert type(policy) is LlamaForCausalLM
    assert AutoTokenizer.from_pretrained(run / "policy").pad_token == "<eos>"
    start = LlamaForCausalLM.from_pretrained(student)
    assert not torch.equal(policy.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("name", ["gsm8k_grpo.yaml", "gsm8k_grpo_gpu.yaml"])
def test_gsm8k_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.task.verifier == "gsm8k" and cfg.task.prompt_field == "question"
    assert cfg.task.train_file == "../shared/data/gsm8k/train.jsonl"
