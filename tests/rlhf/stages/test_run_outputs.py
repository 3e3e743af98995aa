"""What a run leaves for its user (issue 35): model keys a loaded student ignores said once and left out of
config.yaml, a pretrained student that no warm-up changed loaded from its own directory instead of copied into
warmup/, and ``distilrl eval --show N`` printing answers to read."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhf.cli import main
from rlhf.core.config.run_config import ModelConfig, RunConfig
from rlhf.core.models.build import build_student, build_tokenizer, load_student, save_student
from rlhf.stages.run_dir import build_policy, ignored_model_keys, prepare_run_dir, untrained_start_dir
from tests.paths import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A tiny student saved as a run saves one (its char tokenizer has a pad token)."""
    path = tmp_path_factory.mktemp("models") / "student"
    tokenizer = build_tokenizer("char")
    model = build_student(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                      intermediate_size=64), tokenizer, seed=0)
    save_student(model, tokenizer, path)
    return path


def test_model_keys_beside_a_model_path_are_warned_in_one_line_and_left_out_of_config_yaml(student, tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path / "run"),
                    model={"model_name_or_path": str(student), "hidden_size": 256, "tokenizer": "qwen2.5"})
    assert ignored_model_keys(cfg.model) == ["model.tokenizer=qwen2.5", "model.hidden_size=256"]
    assert ignored_model_keys(RunConfig(model={"hidden_size": 256}).model) == []  # a built student uses them
    said = []
    model, _ = build_policy(cfg, said.append)
    assert model.config.hidden_size == 32
    [warning] = [line for line in said if line.startswith("warning")]
    assert warning.startswith("warning: model.tokenizer=qwen2.5, model.hidden_size=256 ignored: the student is "
                              "model.model_name_or_path")
    saved = yaml.safe_load((prepare_run_dir(cfg) / "config.yaml").read_text())
    assert saved["model"] == {"model_name_or_path": str(student), "lora": None}
    assert saved["rollout"] == cfg.rollout.model_dump()  # every other section whole


def test_an_unchanged_pretrained_student_is_loaded_from_its_source_not_copied(student, tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path), model={"model_name_or_path": str(student)})
    _, tokenizer = load_student(student)
    assert untrained_start_dir(cfg, tokenizer, tmp_path / "warmup") == str(student.resolve())
    assert not (tmp_path / "warmup").exists()
    # A chat-template override lives in the tokenizer files: those are written, the weights hard-linked.
    template = "{% for m in messages %}{{ m.content }};{% endfor %}"
    cfg = RunConfig(output_dir=str(tmp_path), model={"model_name_or_path": str(student)},
                    task={"chat_template": template})
    tokenizer.chat_template = template
    start = Path(untrained_start_dir(cfg, tokenizer, tmp_path / "warmup"))
    weights = start / "model.safetensors"
    assert start == tmp_path / "warmup" and weights.samefile(student / "model.safetensors")  # linked, not copied
    assert not (start / "tokenizer_config.json").samefile(student / "tokenizer_config.json")
    model, loaded = load_student(start)
    assert loaded.chat_template == template and model.config.hidden_size == 32


def test_eval_show_prints_answers_to_read(student, capsys):
    code = main(["eval", str(student), "--config", TINY, "task.eval_prompts=3", "eval.max_new_tokens=4",
                 "--show", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    figures = json.loads(captured.out)
    assert figures["n"] == 3 and len(figures["answers"]) == 2
    first = figures["answers"][0]
    assert set(first) == {"prompt", "response", "reference", "correct", "response_tokens"}
    assert "--- answer 1 of 2: " in captured.err and "--- answer 2 of 2: " in captured.err
    assert f"[prompt]\n{first['prompt']}\n[response]\n{first['response']}" in captured.err
    assert main(["eval", str(student), "--config", TINY, "--show", "-1"]) == 2
