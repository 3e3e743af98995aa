"""Tests for prompt data (rlhf.data), the rule reward (reward.scoring.worker, reward.scoring.verifiers), held-out figures
(rlhf.rl.evaluate.score_eval) and student save/load (rlhf.models)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from reward.scoring.verifiers import final_number_correct
from rlhf.core.config.run_config import ModelConfig, TaskConfig
from rlhf.core.data.datasets import DatasetError, PromptRow, load_jsonl_rows, load_rows
from rlhf.rl.evaluate import score_eval
from rlhf.core.models.build import ModelLoadError, build_student, build_tokenizer, load_student, save_student
from rlhf.core.tasks.arithmetic import MAX_LEVEL, MIN_LEVEL, parse_prompt
from rlhf.core.data.samples import Sample
from tests.scoring import reward_worker
from tests.paths import REPO

GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _dataset_error(path: Path, **fields) -> str:
    """Load ``path`` expecting a problem: a DatasetError when no row is usable, else one warning line counting the
    skipped rows (the good rows are kept). Returns the message after checking it is one line naming the file."""
    logged = []
    try:
        rows = load_jsonl_rows(path, fields.get("prompt_field", "prompt"), fields.get("answer_field", "answer"),
                               fields.get("difficulty_field"), log=logged.append)
    except DatasetError as err:
        message = str(err)
        assert not logged
    else:
        assert rows and len(logged) == 1 and logged[0].startswith("warning: skipped 1 of ")
        message = logged[0]
    assert "\n" not in message
    assert str(path) in message
    return message


# ---------------------------------------------------------------------------------------------- good files


def test_load_jsonl_rows_reads_prompts_answers_and_difficulty(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"q": "2+2=", "a": "4", "level": 1, "extra": "ignored"},
        {"q": "How many?", "a": 12, "level": 3},
    ])
    rows = load_jsonl_rows(path, "q", "a", "level")
    assert rows == [PromptRow("2+2=", "4", 1), PromptRow("How many?", "12", 3)]


def test_load_jsonl_rows_skips_blank_lines_and_leaves_difficulty_none_without_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n   \n{"prompt": "b", "answer": " 2 "}\n', encoding="utf-8")
    assert load_jsonl_rows(path, "prompt", "answer") == [PromptRow("a", "1"), PromptRow("b", "2")]


def test_unicode_line_separators_inside_strings_do_not_split_rows(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 / U+0085 / \x1c raw; only "\n" ends a JSONL row.
    prompt = "a\u2028b\x85c\x1cd"
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "answer": "1"}, ensure_ascii=False) + "\r\n"
                    + json.dumps({"prompt": "e", "answer": "2"}) + "\n", encoding="utf-8")
    assert load_jsonl_rows(path, "prompt", "answer") == [PromptRow(prompt, "1"), PromptRow("e", "2")]


def test_gsm8k_style_answer_keeps_the_number_after_hashes_without_commas(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [
        {"question": "q1", "answer": "She has 1,000 + 234 = <<1000+234=1234>>1,234.\n#### 1,234"},
        {"question": "q2", "answer": "work\n#### 72"},
        {"question": "q3", "answer": "#### -5"},
    ])
    assert [r.answer for r in load_jsonl_rows(path, "question", "answer")] == ["1234", "72", "-5"]


# ------------------------------------------------------------------------------------------- bad files


def test_missing_field_names_file_line_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "solution": "2"}])
    message = _dataset_error(path)
    assert "line 2" in message and "'answer'" in message and "answer_field" in message


def test_missing_difficulty_field_names_it(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}])
    message = _dataset_error(path, difficulty_field="level")
    assert "line 1" in message and "'level'" in message and "difficulty_field" in message


def test_row_that_is_not_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", answer: 2}\n', encoding="utf-8")
    message = _dataset_error(path)
    assert "line 2" in message and "not valid JSON" in message


def test_row_that_is_a_json_list_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, ["b", "2"]])
    message = _dataset_error(path)
    assert "line 2" in message and "list" in message


@pytest.mark.parametrize("prompt", ["", "   ", None, 7])
def test_empty_or_non_text_prompt_names_file_line_and_field(tmp_path, prompt):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": prompt, "answer": "1"}])
    message = _dataset_error(path)
    assert "line 1" in message and "'prompt'" in message


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    message = _dataset_error(path)
    assert "UTF-8" in message and "line 2" in message


@pytest.mark.parametrize("difficulty", ["3", 2.5, True, None])
def test_non_integer_difficulty_names_file_line_and_field(tmp_path, difficulty):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1", "level": 1},
                                                {"prompt": "b", "answer": "2", "level": difficulty}])
    message = _dataset_error(path, difficulty_field="level")
    assert "line 2" in message and "'level'" in message and "integer" in message


def test_non_text_answer_names_field(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": ["1"]}])
    message = _dataset_error(path)
    assert "line 1" in message and "'answer'" in message


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    assert "no rows" in _dataset_error(path)


def test_missing_file_is_refused_naming_it(tmp_path):
    assert "does not exist" in _dataset_error(tmp_path / "nowhere.jsonl")


def test_a_directory_is_not_a_dataset_file(tmp_path):
    assert "does not exist" in _dataset_error(tmp_path)


# ------------------------------------------------------------------------------------------ load_rows


def test_real_gsm8k_loads_through_load_rows_with_numeric_answers():
    if not (GSM8K_DIR / "test.jsonl").is_file():
        pytest.skip(f"GSM8K data not present at {GSM8K_DIR}")
    train_file = GSM8K_DIR / "train.jsonl"
    if not train_file.is_file():
        train_file = GSM8K_DIR / "test.jsonl"
    cfg = TaskConfig(name="dataset", train_file=str(train_file), eval_file=str(GSM8K_DIR / "test.jsonl"),
                     prompt_field="question", answer_field="answer", train_prompts=50, eval_prompts=20)
    train, held_out = load_rows(cfg, seed=0)
    assert len(train) == 50 and len(held_out) == 20
    for row in train + held_out:
        assert row.prompt.strip() and row.difficulty is None
        assert re.fullmatch(r"-?\d+", row.answer), row.answer
    # The first GSM8K test problem (Janet's ducks) has answer 18.
    assert held_out[0].answer == "18"
    assert final_number_correct("16-3-4=9 eggs, 9*2=18.\n#### 18", held_out[0].answer) is True


def test_arithmetic_rows_have_difficulty_equal_to_level_and_correct_answers():
    levels = set(range(MIN_LEVEL, MAX_LEVEL + 1))
    train, held_out = load_rows(TaskConfig(name="arithmetic", train_prompts=4 * len(levels), eval_prompts=10), seed=0)
    assert len(train) == 4 * len(levels) and len(held_out) == 10
    for row in train + held_out:
        problem = parse_prompt(row.prompt)
        assert row.difficulty == problem.level == len(problem.ops)
        assert row.answer == str(problem.answer)
    assert {r.difficulty for r in train} == levels
    assert [r.prompt for r in train[:10]] != [r.prompt for r in held_out]  # train and eval are different draws
    assert load_rows(TaskConfig(train_prompts=4 * len(levels), eval_prompts=10), seed=0) == (train, held_out)


# --------------------------------------------------------------------------------------------- rewards


def test_reward_worker_scores_correct_wrong_and_unparseable():
    worker = reward_worker({"verifier": 1.0}, correct=1.0, unparseable=-0.5)
    results = worker.score(["3+4=", "3+4=", "3+4="], ["3+4=7;#7", "#8", "seven"], ["7", "7", "7"])
    assert [r["reward"] for r in results] == [1.0, 0.0, -0.5]
    assert [r["correct"] for r in results] == [1.0, 0.0, 0.0]
    assert [r["answered"] for r in results] == [1.0, 1.0, 0.0]


def test_reward_worker_default_unparseable_reward_is_zero():
    results = reward_worker({"verifier": 1.0}, correct=1.0, unparseable=0.0).score(["p"], ["no answer here"], ["3"])
    assert results == [{"reward": 0.0, "correct": 0.0, "answered": 0.0, "parts": {"verifier": 0.0}}]


def test_reward_worker_refuses_mismatched_batch_lengths():
    with pytest.raises(ValueError):
        reward_worker({"verifier": 1.0}, correct=1.0, unparseable=0.0).score(["a", "b"], ["#1"], ["1", "2"])


def test_final_number_correct_reads_gsm8k_hashes_and_the_last_answer():
    assert final_number_correct("Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72", "72") is True
    assert final_number_correct("#### 72", 72) is True
    assert final_number_correct("#### 71", "72") is False
    assert final_number_correct("# -3", "-3") is True
    assert final_number_correct("#5 no wait #6", "6") is True  # the last answer counts
    assert final_number_correct("the answer is 72", "72") is None


def test_final_number_correct_reads_thousands_separators_like_gsm8k_references():
    # GSM8K solutions write "#### 1,234"; its reference is loaded as "1234".
    assert final_number_correct("so 1,000+234=1,234\n#### 1,234", "1234") is True
    assert final_number_correct("#### 1,235", "1234") is False
    assert final_number_correct("#12, then more", "12") is True


# ----------------------------------------------------------------------------------------------- eval


def _sample(length: int) -> Sample:
    return Sample(0, [4], list(range(10, 10 + length)), [-0.1] * length, "length", "x")


def test_score_eval_by_hand_on_four_rows_in_two_difficulty_bins():
    rows = [PromptRow("a", "1", 1), PromptRow("b", "2", 1), PromptRow("c", "3", 2), PromptRow("d", "4", 2)]
    samples = [_sample(3), _sample(5), _sample(2), _sample(8)]
    verdicts = [{"correct": 1.0}, {"correct": 0.0}, {"correct": 1.0}, {"correct": 1.0}]
    result = score_eval(rows, samples, verdicts)
    # overall: 3/4 correct; tokens (3+5+2+8)/4 = 4.5
    assert result["accuracy"] == 0.75 and result["mean_response_tokens"] == 4.5 and result["n"] == 4
    # level 1: 1/2 correct, (3+5)/2 = 4; level 2: 2/2 correct, (2+8)/2 = 5
    assert result["by_difficulty"] == {
        "1": {"accuracy": 0.5, "mean_response_tokens": 4.0, "n": 2},
        "2": {"accuracy": 1.0, "mean_response_tokens": 5.0, "n": 2},
    }


def test_score_eval_without_difficulty_has_no_bins():
    rows = [PromptRow("a", "1"), PromptRow("b", "2"), PromptRow("c", "3")]
    result = score_eval(rows, [_sample(1), _sample(2), _sample(6)],
                        [{"correct": 1.0}, {"correct": 0.0}, {"correct": 0.0}])
    # no think blocks in use: no thinking figures (the whole of "x" is not reasoning)
    assert result == {"accuracy": 0.3333, "mean_response_tokens": 3.0, "n": 3}


# ---------------------------------------------------------------------------------------- model files

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def _load_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_student(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_load_student_missing_directory_is_one_line_error(tmp_path):
    assert "does not exist" in _load_error(tmp_path / "absent")


def test_load_student_directory_without_config_is_one_line_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "config.json" in _load_error(tmp_path)


def test_load_student_directory_without_safetensors_is_one_line_error(tmp_path):
    tokenizer = build_tokenizer("char")
    build_student(TINY, tokenizer, seed=0).config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "safetensors" in _load_error(tmp_path)


def test_save_and_load_student_round_trip_gives_identical_weights_and_no_tmp_dir(tmp_path):
    tokenizer = build_tokenizer("char")
    model = build_student(TINY, tokenizer, seed=0)
    target = tmp_path / "policy"
    save_student(model, tokenizer, target)
    save_student(model, tokenizer, target)  # overwriting an existing save goes through the same atomic swap
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no policy.tmp / policy.old left
    assert any(target.glob("*.safetensors")) and not any(target.glob("*.bin"))
    loaded, loaded_tokenizer = load_student(target)
    original = model.state_dict()
    reloaded = loaded.state_dict()
    assert set(reloaded) == set(original)
    for name, tensor in original.items():
        assert torch.equal(reloaded[name], tensor), name
    text = "7+8=15;#15"
    assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert (loaded_tokenizer.pad_token_id, loaded_tokenizer.eos_token_id) == (tokenizer.pad_token_id,
                                                                              tokenizer.eos_token_id)


def test_reward_worker_weights_components_and_names_a_non_finite_component():
    worker = reward_worker({"verifier": 2.0}, correct=1.0, unparseable=0.0)
    assert [r["reward"] for r in worker.score(["p", "p"], ["#3", "#4"], ["3", "3"])] == [2.0, 0.0]
    worker = reward_worker({"verifier": 1.0}, correct=float("nan"), unparseable=0.0)
    right, wrong = worker.score(["1+2=", "1+2="], ["#3", "#4"], ["3", "3"])
    assert math.isnan(right["reward"]) and right["nonfinite"] == "verifier=nan"
    assert wrong["reward"] == 0.0 and "nonfinite" not in wrong
