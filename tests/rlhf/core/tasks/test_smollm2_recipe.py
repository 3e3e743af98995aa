"""configs/smollm2_distil.yaml and its task: the config and the override lines its comment gives load; the committed
data is what the generator (rlhf/core/tasks/arithmetic_words.py) writes; the problems and the last_number verifier
against hand-worked examples."""
from __future__ import annotations

import json
import random
import shlex

import pytest

from reward.scoring.verifiers import make_verifier
from rlhf.core.config.run_config import load_config
from rlhf.core.data.datasets import final_answer
from rlhf.core.tasks import arithmetic_words as words
from tests.paths import REPO

CONFIG = REPO / "configs" / "smollm2_distil.yaml"
DATA = REPO / "configs" / "data" / "arithmetic_words"


def test_the_recipe_loads_with_the_whole_chain():
    cfg = load_config(str(CONFIG))
    assert cfg.stages == ["traces", "sft", "label", "train_rm", "rl", "eval"]
    assert cfg.model.lora is not None and cfg.warmup.lora is not None and cfg.reward.components == {"rm": 1.0}
    assert cfg.task.verifier == cfg.label.verifier == "last_number"
    assert cfg.rollout.engine == "hf_static" and cfg.trainer.precision == "auto"
    assert (REPO / cfg.task.train_file).is_file() and (REPO / cfg.task.eval_file).is_file()


def test_the_oracle_and_adaptive_lines_in_its_comment_load():
    lines = [line[1:] for line in CONFIG.read_text().splitlines() if line.startswith("#   distilrl run " + "configs/")]
    variants = {}
    for line in lines:
        overrides = shlex.split(line)[3:]
        if overrides:
            cfg = load_config(str(CONFIG), overrides)
            variants[cfg.output_dir] = cfg
    assert variants["runs/smollm2_oracle"].reward.components == {"verifier": 1.0}
    adaptive = variants["runs/smollm2_adaptive"]
    assert adaptive.reward.components == {"rm": 1.0, "adaptive": 0.5}
    assert adaptive.reward.adaptive.difficulty_range == (1.0, 3.0)


def test_the_committed_data_is_the_generators(tmp_path):
    words.main([str(tmp_path)])
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_text() == (DATA / name).read_text(), name


def test_problems_in_words_with_worked_answers():
    problem = words.Problem((13, 7, 4), ("+", "-"))
    assert words.question(problem) == "What is 13 plus 7 minus 4?"
    assert words.worked_answer(problem) == "13 plus 7 is 20. 20 minus 4 is 16.\n#### 16"
    assert final_answer(words.worked_answer(problem)) == "16"
    rng = random.Random(0)
    for level in (1, 2, 3):
        for _ in range(50):
            p = words.make_problem(rng, level)
            assert p.level == level and all(0 <= t <= words.TOTAL for t in p.running_totals())


def test_held_out_problems_are_distinct_and_never_trained_on():
    test = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()]
    train = {json.loads(line)["question"] for line in (DATA / "train.jsonl").read_text().splitlines()}
    questions = [r["question"] for r in test]
    assert len(set(questions)) == len(questions) == 400 and not set(questions) & train
    assert {r["difficulty"] for r in test} == {1, 2, 3}


def test_last_number_verifier():
    verify = make_verifier("last_number")
    assert verify("13 plus 7 is 20. 20 minus 4 is 16.", "16") is True
    assert verify("13 plus 7 is 20.\n#### 20", "20") is True
    assert verify("It is 1,000.", "1000") is True
    assert verify("16, or maybe 17", "16") is False
    assert verify("I cannot say.", "16") is None


def test_a_bad_level_range_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        words.main([str(tmp_path), "--levels", "0-2"])
    assert "levels start at 1" in capsys.readouterr().err
    assert not (tmp_path / "test.jsonl").exists()
