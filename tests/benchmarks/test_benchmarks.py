"""Keeps the benchmark scripts from rotting without timing anything: the GPU smoke check's no-GPU exit, and the
pure helpers the side-by-side benchmarks build their shared work from."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.paths import REPO

SMOKE = REPO / "benchmarks" / "gpu_smoke.sh"
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run the real check")
def test_gpu_smoke_without_a_gpu_says_so_and_exits_0():
    done = subprocess.run(["bash", str(SMOKE)], check=False, capture_output=True, text=True, timeout=120,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "no CUDA GPU" in lines[0]
    assert json.loads(lines[-1]) == {"gpu": False, "skipped": True}


def test_gpu_smoke_with_a_broken_python_fails_with_one_line():
    done = subprocess.run(["bash", str(SMOKE)], check=False, capture_output=True, text=True, timeout=60,
                          env={"PYTHON": "/bin/false", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert "cannot import torch" in done.stderr


@pytest.mark.parametrize("slip", ["late", "early"])
def test_rm_benchmark_pairs_prefer_the_correct_answer(slip):
    import rm_vs_trl

    from reward.scoring.verifiers import final_number_correct
    from rlhf.core.tasks.arithmetic import parse_prompt

    pairs = rm_vs_trl.make_pairs(12, slip)
    assert len(pairs) == 12
    for pair in pairs:
        answer = parse_prompt(pair["prompt"]).answer
        assert final_number_correct(pair["chosen"], answer) is True
        assert final_number_correct(pair["rejected"], answer) is False
        # Where the two part: after the working (late) or at the first running total (early).
        first_step = pair["chosen"].split(";")[0]
        assert pair["rejected"].startswith(first_step) == (slip == "late")


def test_grpo_benchmark_student_generates_exactly_max_new_tokens(tmp_path):
    """Both sides of grpo_vs_trl must do the same number of token steps: the saved student's generation config
    suppresses end-of-sequence until max_new_tokens, whatever the sampled tokens are."""
    import grpo_vs_trl

    from rlhf.core.models.build import load_student
    from rollout.engine import generate, generate_compacting

    workload = grpo_vs_trl.WORKLOADS["quick"]
    params, _ = grpo_vs_trl.make_student(workload, tmp_path / "student")
    model, tokenizer = load_student(tmp_path / "student")
    assert params == sum(p.numel() for p in model.parameters())
    # A huge end-of-sequence logit: without the forced length every response would stop at its first token.
    handle = model.lm_head.register_forward_hook(
        lambda module, inputs, output: output.index_add(-1, torch.tensor([tokenizer.eos_token_id]),
                                                        torch.full((*output.shape[:-1], 1), 50.0)))
    try:  # both hf engines' samplers: hf (HF generate) and hf_compact, the default
        samples = [s for sample in (generate, generate_compacting)
                   for s in sample(model.eval(), tokenizer, ["1+2=", "3+4-5="], 3, workload["max_new_tokens"])]
    finally:
        handle.remove()
    assert [len(s.response_ids) for s in samples] == [workload["max_new_tokens"]] * 12
    # EOS stays suppressed up to the last step, so every response runs to the length limit.
    assert all(s.finish_reason == "length" and tokenizer.eos_token_id not in s.response_ids for s in samples)


def test_real_model_benchmark_format_reward_wants_the_final_answer_last():
    import real_model

    assert real_model.format_reward([], ["so 3 + 4 = 7\n#### 7", "#### 1,200.50 ", "#### 7 apples", "7"], []) == [
        1.0, 1.0, 0.0, 0.0]


def test_grpo_benchmark_realistic_student_is_the_warmed_up_one_with_natural_lengths(tmp_path):
    """The realistic workload: the quickstart's warm-up is run once into the warm dir and reused; neither side
    forces the response length, and both sample at the workload's temperature."""
    import grpo_vs_trl

    from rlhf.core.models.build import load_student

    tiny = ("warmup.steps=2", "warmup.batch_size=4", "model.hidden_size=32", "model.num_layers=1",
            "model.intermediate_size=64")
    student = grpo_vs_trl.warm_student(tmp_path / "warm", tiny)
    made = (student / "model.safetensors").stat().st_mtime_ns
    workload = grpo_vs_trl.WORKLOADS["realistic"]
    params, _ = grpo_vs_trl.make_student(workload, tmp_path / "student", tmp_path / "warm")
    assert (student / "model.safetensors").stat().st_mtime_ns == made  # reused, not warmed up again
    model, _ = load_student(tmp_path / "student")
    warm, _ = load_student(student)
    assert params == sum(p.numel() for p in warm.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), warm.state_dict().values()))
    assert not model.generation_config.min_new_tokens
    trl = grpo_vs_trl.trl_config(workload, tmp_path / "trl", 3, bf16=False)
    assert "min_new_tokens" not in trl.generation_kwargs and trl.temperature == workload["temperature"]
    ours = grpo_vs_trl.ours_config(workload, tmp_path / "student", tmp_path / "ours", 3, 1, bf16=False)
    assert ours.rollout.temperature == trl.temperature and ours.rollout.dtype == "float32"
    assert not ours.rollout.asynchronous
    asynchronous = grpo_vs_trl.ours_config(workload, tmp_path / "student", tmp_path / "ours", 3, 1, bf16=False,
                                           asynchronous=True)
    assert asynchronous.rollout.asynchronous and asynchronous.rollout.threads == 1


def test_update_head_batch_marks_the_solution_and_eos_as_the_response(tmp_path):
    from benchmarks.update_head import micro_batch

    class Characters:  # a tokenizer of one id per character, with a chat template of "<q>...>"
        pad_token_id, eos_token_id = 0, 1

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<{messages[0]['content']}>"

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [ord(c) for c in text]}

    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+2", "answer": "3"}\n{"question": "10+20", "answer": "30"}\n{"x": 0}\n')
    batch = micro_batch(Characters(), data, rows=2)
    assert batch["input_ids"].tolist() == [[60, 49, 43, 50, 62, 51, 1, 0, 0, 0],
                                           [60, 49, 48, 43, 50, 48, 62, 51, 48, 1]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [7, 10]
    assert batch["response_mask"].tolist() == [[0] * 5 + [1, 1] + [0] * 3, [0] * 7 + [1, 1, 1]]


def test_rm_scoring_precision_counts_order_flips_within_groups_only():
    from benchmarks.rm_scoring_precision import order_flips

    # Groups of 2: (1, 2) keeps its order, (5, 4) flips to (4, 5) in b; the tie (7, 7) has no order to flip. Across
    # groups (2 against 5) nothing is counted.
    assert order_flips([1, 2, 5, 4, 7, 7], [1, 2, 4, 5, 8, 6], group=2) == (1, 2)


@pytest.mark.parametrize("script, argv", [
    ("update_head", ["--model", "/nonexistent"]),
    ("rm_scoring_precision", ["--rm", "/nonexistent", "--rows", "rows.jsonl"]),
])
def test_speed_benchmarks_refuse_a_missing_model_in_one_line(monkeypatch, script, argv):
    import importlib

    module = importlib.import_module(f"benchmarks.{script}")
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit, match=r"/nonexistent is not a model directory \(no config.json\)"):
        module.main()
