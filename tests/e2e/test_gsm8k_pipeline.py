"""The whole chain on GSM8K (configs/gsm8k_pipeline.yaml): traces, SFT, labelling by the rule-based reference
teacher, a distilled RM, GRPO rewarded by it, held-out evaluation; and the reference teacher's verdicts."""
from __future__ import annotations

import json

import datasets
import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from reward.teachers import ReferenceTeacher, make_teacher
from rlhf.core.config.run_config import load_config
from rlhf.core.data.datasets import PromptRow, worked_solution
from rlhf.cli import main
from rlhf.stages.reward_model import teacher_solutions
from tests.rlhf.core.data.test_byo_data import GSM8K, needs_gsm8k
from tests.paths import REPO

CONFIG = str(REPO / "configs" / "gsm8k_pipeline.yaml")
PROMPT = "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?"
# GSM8K's own worked solution: two reasoning steps, then the final answer.
SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips in all.\n#### 72"
RESPONSE_REASONING = "Half of 48 is 24.\nSo 48 + 24 = 72 clips."  # 40 characters of reasoning: RV 1 at 40 a point


def _judge(responses: list[str], references: list[str | None], chars_per_rv: float = 40.0):
    return ReferenceTeacher("gsm8k", chars_per_rv).judge([PROMPT] * len(responses), responses, references)


def test_reference_teacher_scores_correct_wrong_and_unanswered_like_the_oracle():
    correct, wrong, unanswered = _judge([f"{RESPONSE_REASONING}\n#### 72", f"{RESPONSE_REASONING}\n#### 71",
                                         RESPONSE_REASONING], [SOLUTION] * 3)
    assert (correct.quality, correct.correct) == (9.0, True)
    assert (wrong.quality, wrong.correct) == (2.0, False)
    assert (unanswered.quality, unanswered.correct) == (0.0, False)
    for verdict in (correct, wrong, unanswered):
        assert verdict.error is None
        assert verdict.cd == 2.0  # the reference solution's two reasoning steps, whatever the response
        assert verdict.rv == pytest.approx(len(RESPONSE_REASONING) / 40)  # the final "#### N" is not reasoning
        assert verdict.quality_probs is verdict.rv_probs is verdict.cd_probs is None  # certain: no soft labels


def test_reference_teacher_rv_cd_scales_and_references():
    long_reasoning = "\n".join(f"Step {i}: add {i} to the total." for i in range(30))  # 30 lines, ~800 chars
    steps_12 = "\n".join(f"line {i}" for i in range(12)) + "\n#### 5"
    long, bare, missing, commas = _judge([f"{long_reasoning}\n#### 5", "#### 5", "#### 5", "So #### 1,000"],
                                         [steps_12, "5", None, "It is 1000.\n#### 1000"], chars_per_rv=20)
    assert (long.rv, long.cd) == (9.0, 9.0)  # both capped at 9
    assert (bare.quality, bare.rv, bare.cd) == (9.0, 0.0, 0.0)  # a bare reference has no steps
    assert missing.error and missing.quality is None
    assert commas.correct and commas.cd == 1.0


def test_reference_teacher_is_registered_with_the_task_verifier():
    cfg = load_config(CONFIG)
    assert cfg.label.teacher == "reference" and cfg.label.verifier == "gsm8k"  # from task.verifier
    teacher = make_teacher(cfg.label)
    assert isinstance(teacher, ReferenceTeacher) and teacher.chars_per_rv == cfg.label.chars_per_rv
    # A row from GSM8K: the teacher sees the worked solution (CD from its steps); the verifier the final answer.
    row = PromptRow(PROMPT, "72", record={"question": PROMPT, "answer": SOLUTION})
    assert worked_solution(row, "answer") == SOLUTION and teacher_solutions(row, answer_field="answer") == [SOLUTION]
    assert worked_solution(PromptRow(PROMPT, "72", record={"answer": "72"}), "answer") is None


@pytest.mark.slow  # six stages, Ray actors, the 151k-token vocabulary: 67 s on the 2-core box at load 2, 10 min at load 10
@needs_gsm8k
def test_gsm8k_pipeline_runs_end_to_end_and_every_output_loads_with_plain_libraries(tmp_path, capsys):
    out = tmp_path / "run"
    tiny = [f"output_dir={out}", f"task.train_file={GSM8K / 'train.jsonl'}", f"task.eval_file={GSM8K / 'test.jsonl'}",
            "task.train_prompts=60", "task.eval_prompts=4", "traces.prompts=16", "warmup.steps=2",
            "warmup.eval_every=2", "warmup.eval_fraction=0.1", "warmup.max_length=256", "label.prompts=4",
            "label.eval_prompts=4", "label.samples_per_prompt=2", "label.max_new_tokens=16", "reward_model.epochs=1",
            "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=16",
            "algorithm.steps=1", "eval.max_new_tokens=16"]
    assert main(["run", CONFIG, *tiny]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"eval_before", "eval_after", "reward_model"} <= set(summary)
    assert summary["eval_after"]["n"] == 4 and summary["steps"] == 1
    for stage in ("warmup", "policy"):  # the SFT'd student and the RL'd policy
        AutoModelForCausalLM.from_pretrained(out / stage)
        AutoTokenizer.from_pretrained(out / stage)
    rm = AutoModelForSequenceClassification.from_pretrained(out / "reward_model")
    assert rm.config.architectures == ["Qwen2ForSequenceClassification"]
    traces = datasets.load_from_disk(str(out / "traces" / "dataset"))
    assert len(traces) > 0 and all(traces["correct"])
    rows = datasets.load_from_disk(str(out / "labels" / "train" / "pointwise"))
    assert {"student", "teacher"} <= set(rows["source"])
    teacher_rows = [r for r in rows if r["source"] == "teacher"]  # the data's worked solutions, judged correct
    assert all(r["quality"] == 9.0 and r["correct"] for r in teacher_rows)
    assert all(r["cd"] > 0 for r in teacher_rows)  # CD from the worked solution the label stage passed
    assert len(datasets.load_from_disk(str(out / "labels" / "train" / "pairwise"))) > 0
