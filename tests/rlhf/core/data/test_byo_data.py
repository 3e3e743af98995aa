"""Bring your own prompts: every file format through rlhf.data.load_rows, field mapping and its errors, splits by
name and by fraction, seeded shuffling, chat templates and the prompt token budget. On GSM8K where present."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from rlhf.core.config.run_config import ConfigError, TaskConfig, config_from_dict
from rlhf.core.data.datasets import DatasetError, load_rows
from rlhf.core.models.build import build_tokenizer
from tests.paths import REPO



def _gsm8k_dir() -> Path | None:
    """../shared/data/gsm8k beside the repository (as configs name it), else the machine's shared copy."""
    for candidate in (REPO.parent / "shared" / "data" / "gsm8k", Path("/work/shared/data/gsm8k")):
        if (candidate / "test.jsonl").is_file():
            return candidate
    return None


GSM8K = _gsm8k_dir()
needs_gsm8k = pytest.mark.skipif(GSM8K is None, reason="GSM8K data (../shared/data/gsm8k) not present")


@pytest.fixture(scope="module")
def gsm8k_records() -> list[dict]:
    if GSM8K is None:
        pytest.skip("GSM8K data not present")
    with open(GSM8K / "test.jsonl", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(40)]


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return build_tokenizer("qwen2.5")


def _task(path, **kw) -> TaskConfig:
    base = dict(name="dataset", train_file=str(path), eval_fraction=0.25, prompt_field="question",
                answer_field="answer", shuffle=False)
    return TaskConfig(**{**base, **kw})


def _write_formats(records: list[dict], tmp: Path) -> dict[str, Path]:
    ds = datasets.Dataset.from_list(records)
    paths = {"jsonl": tmp / "d.jsonl", "json": tmp / "d.json", "parquet": tmp / "d.parquet", "csv": tmp / "d.csv",
             "disk": tmp / "saved"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    paths["json"].write_text(json.dumps(records), encoding="utf-8")  # one JSON array, not lines
    ds.to_parquet(str(paths["parquet"]))
    ds.to_csv(str(paths["csv"]), index=False)
    ds.save_to_disk(str(paths["disk"]))
    return paths


@needs_gsm8k
def test_every_file_format_gives_the_same_gsm8k_rows(gsm8k_records, tmp_path):
    paths = _write_formats(gsm8k_records, tmp_path)
    loaded = {fmt: load_rows(_task(path), seed=0) for fmt, path in paths.items()}
    train, held_out = loaded["jsonl"]
    assert len(train) == 30 and len(held_out) == 10
    assert train[0].answer == "18"  # Janet's ducks, "#### 18" cut to its number
    for fmt, pools in loaded.items():
        assert pools == (train, held_out), fmt
    assert {r.prompt for r in train}.isdisjoint(r.prompt for r in held_out)


def test_save_to_disk_splits_by_name_and_unknown_split_lists_the_splits(tmp_path):
    rows = [{"q": f"{i}+1=", "a": str(i + 1)} for i in range(12)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]),
                          "test": datasets.Dataset.from_list(rows[8:])}).save_to_disk(str(tmp_path / "dd"))
    cfg = TaskConfig(name="dataset", train_file=str(tmp_path / "dd"), eval_split="test", prompt_field="q",
                     answer_field="a", shuffle=False)
    train, held_out = load_rows(cfg, seed=0)
    assert [r.prompt for r in train] == [f"{i}+1=" for i in range(8)]
    assert [r.answer for r in held_out] == ["9", "10", "11", "12"]
    with pytest.raises(DatasetError, match=r"has no split 'validation' \(splits: train, test\); set task.train_split"):
        load_rows(cfg.model_copy(update={"eval_split": "validation"}), seed=0)


def test_fraction_split_and_shuffle_are_deterministic_by_seed(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": i}) + "\n" for i in range(100)))
    cfg = _task(path, eval_fraction=0.2, shuffle=True)
    train, held_out = load_rows(cfg, seed=7)
    assert len(train) == 80 and len(held_out) == 20
    assert {r.prompt for r in train} | {r.prompt for r in held_out} == {f"q{i}" for i in range(100)}
    assert load_rows(cfg, seed=7) == (train, held_out)
    other_train, other_held = load_rows(cfg, seed=8)
    assert other_held != held_out and other_train != train
    # Held-out prompts keep the file's order; the training pool is shuffled (and the cap takes its head).
    assert [int(r.answer) for r in held_out] == sorted(int(r.answer) for r in held_out)
    assert [int(r.answer) for r in train] != sorted(int(r.answer) for r in train)
    capped, _ = load_rows(cfg.model_copy(update={"train_prompts": 5}), seed=7)
    assert capped == train[:5]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "disk"])
def test_missing_field_is_one_line_naming_it_and_the_fields_that_exist(fmt, tmp_path):
    paths = _write_formats([{"problem": "1+1=", "solution": "2"}, {"problem": "2+2=", "solution": "4"}], tmp_path)
    with pytest.raises(DatasetError) as info:
        load_rows(_task(paths[fmt], eval_fraction=0.5), seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert "has no field 'question' (fields: problem, solution); set task.prompt_field" in message
    with pytest.raises(DatasetError, match=r"has no field 'level' \(fields: problem, solution\); set "
                                           r"task.difficulty_field"):
        load_rows(_task(paths[fmt], eval_fraction=0.5, prompt_field="problem", answer_field="solution",
                        difficulty_field="level"), seed=0)


def test_unreadable_and_unknown_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"unknown dataset format '.txt': use .jsonl, .json, .parquet, .csv"):
        load_rows(_task(tmp_path / "d.txt"), seed=0)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"cannot read .*bad.json as json") as info:
        load_rows(_task(tmp_path / "bad.json"), seed=0)
    assert "\n" not in str(info.value)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DatasetError, match="is not a directory written by save_to_disk"):
        load_rows(_task(tmp_path / "empty_dir"), seed=0)
    with pytest.raises(ConfigError, match="task dataset needs held-out prompts: set task.eval_file"):
        config_from_dict({"task": {"name": "dataset", "train_file": "x.csv"}})


# ---------------------------------------------------------------------------------- chat templates, token budget


def test_qwen_tokenizer_renders_chatml_with_the_configured_system_prompt(tmp_path, qwen_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "What is 2+2?", "answer": "4", "sys": "Answer in Latin."}) + "\n"
                    + json.dumps({"question": "Think: 3+3?", "answer": "6", "sys": None}) + "\n")
    cfg = _task(path, eval_fraction=None, eval_file=str(path), system_prompt="Write the answer after ####.")
    (first, second), _ = load_rows(cfg, seed=0, tokenizer=qwen_tokenizer)
    assert first.prompt == ("<|im_start|>system\nWrite the answer after ####.<|im_end|>\n"
                            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert first.record["question"] == "What is 2+2?"  # a custom reward still sees the raw row
    # A per-row system prompt wins; a null one falls back to task.system_prompt.
    (first, second), _ = load_rows(cfg.model_copy(update={"system_field": "sys"}), seed=0, tokenizer=qwen_tokenizer)
    assert first.prompt.startswith("<|im_start|>system\nAnswer in Latin.<|im_end|>")
    assert second.prompt.startswith("<|im_start|>system\nWrite the answer after ####.<|im_end|>")
    # No system prompt at all: Qwen2.5's template supplies its default one.
    (first, _), _ = load_rows(_task(path, eval_fraction=None, eval_file=str(path)), seed=0, tokenizer=qwen_tokenizer)
    assert first.prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_plain_mode_and_template_overrides(tmp_path, qwen_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "<think>keep me</think> 2+2?", "answer": "4"}) + "\n")
    base = _task(path, eval_fraction=None, eval_file=str(path))
    plain = base.model_copy(update={"chat_template": "plain", "system_prompt": "Be brief."})
    assert load_rows(plain, 0, tokenizer=qwen_tokenizer)[0][0].prompt == "Be brief.\n\n<think>keep me</think> 2+2?"
    inline = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    custom = base.model_copy(update={"chat_template": inline})
    assert load_rows(custom, 0, tokenizer=qwen_tokenizer)[0][0].prompt == "[user] <think>keep me</think> 2+2?\nA:"
    (tmp_path / "t.jinja").write_text(inline)
    from_file = base.model_copy(update={"chat_template": str(tmp_path / "t.jinja")})
    assert load_rows(from_file, 0, tokenizer=qwen_tokenizer)[0][0].prompt.endswith("2+2?\nA:")
    missing = base.model_copy(update={"chat_template": str(tmp_path / "none.jinja")})
    with pytest.raises(ConfigError, match="task.chat_template: template file .*none.jinja does not exist"):
        load_rows(missing, 0, tokenizer=qwen_tokenizer)
    # A tokenizer without a chat template (the quickstart's) renders plain text under auto.
    assert load_rows(base, 0, tokenizer=build_tokenizer("char"))[0][0].prompt == "<think>keep me</think> 2+2?"
    with pytest.raises(ConfigError, match="config key task.chat_template: must be auto, plain, a Jinja"):
        config_from_dict({"task": {"chat_template": "chatml"}})


def test_qwen3_think_blocks_stay_in_prompts_and_decoded_responses(qwen_tokenizer):
    from rlhf.core.data.chat import make_renderer
    from rlhf.core.models.qwen_tokenizer import load_qwen2_5_tokenizer

    qwen3 = load_qwen2_5_tokenizer(qwen3=True)
    # Qwen3's own template is not rebuilt offline; its enable_thinking switch is a template variable like this.
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
                "<think>\n\n</think>\n\n{% endif %}")
    render = make_renderer(TaskConfig(chat_template=template, chat_template_kwargs={"enable_thinking": False}), qwen3)
    assert render(["1+1?"], [None])[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = qwen3("<think>carry the one</think>\n#### 2<|im_end|>", add_special_tokens=False).input_ids
    assert qwen3.decode(ids, skip_special_tokens=True) == "<think>carry the one</think>\n#### 2"


@needs_gsm8k
def test_prompts_over_the_token_budget_are_dropped_counted_and_reported(qwen_tokenizer):
    cfg = TaskConfig(name="dataset", train_file=str(GSM8K / "test.jsonl"), eval_file=str(GSM8K / "test.jsonl"),
                     prompt_field="question", answer_field="answer", chat_template="plain", max_prompt_tokens=40,
                     train_prompts=100000, eval_prompts=100000)
    lines, stats = [], {}
    train, held_out = load_rows(cfg, seed=0, tokenizer=qwen_tokenizer, log=lines.append, stats=stats)
    lengths = [len(qwen_tokenizer(r.prompt, add_special_tokens=False).input_ids) for r in train]
    assert max(lengths) <= 40
    total = sum(1 for line in open(GSM8K / "test.jsonl") if line.strip())
    assert 0 < stats["train_dropped_too_long"] < total
    assert stats["train_prompts"] == len(train) == total - stats["train_dropped_too_long"]
    assert stats["eval_prompts"] == len(held_out) == stats["train_prompts"]
    report = next(line for line in lines if " train prompts " in line)
    assert f"dropped {stats['train_dropped_too_long']} of {total} train prompts examined ({total} in all) longer " \
           f"than task.max_prompt_tokens=40 tokens" in report
    assert report.count(" tokens): ") == 3  # the first three examples, with their lengths
    capped, _ = load_rows(cfg.model_copy(update={"train_prompts": 50}), seed=0, tokenizer=qwen_tokenizer)
    assert capped == train[:50]  # a cap renders and counts only as many rows as it needs, keeping the same ones
    with pytest.raises(DatasetError, match=r"every train prompt is longer than task.max_prompt_tokens=5 tokens"):
        load_rows(cfg.model_copy(update={"max_prompt_tokens": 5}), seed=0, tokenizer=qwen_tokenizer)
