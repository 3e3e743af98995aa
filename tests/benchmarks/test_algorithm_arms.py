"""benchmarks/algorithm_arms.py: its arms' configs load, and its standard errors and table, on made-up figures (the
runs themselves take Ray and minutes: the benchmark is run by hand, its results in benchmarks/RESULTS.md)."""
import math
import sys

import pytest

from rlhf.core.config.run_config import load_config
from tests.paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import accuracy_stats as stats  # noqa: E402
import algorithm_arms as arms  # noqa: E402


def test_standard_errors_by_hand():
    assert stats.se(0.5, 100) == pytest.approx(0.05)
    # per-problem differences 0, -1, +1, +1: mean 0.25, sample variance 2.75 / 3, SE sqrt(variance / 4)
    d = stats.paired_difference([True, True, False, False], [True, False, True, True])
    assert d == {"points": 25.0, "se_points": round(100 * math.sqrt(2.75 / 3 / 4), 1), "paired": True, "n": 4,
                 "only_other_right": 2, "only_base_right": 1}
    u = stats.unpaired_difference({"accuracy": 0.5, "n": 100}, {"accuracy": 0.6, "n": 100})
    assert u["points"] == 10.0 and u["se_points"] == round(100 * math.hypot(0.05, math.sqrt(0.24 / 100)), 1)
    assert not u["paired"]
    with pytest.raises(ValueError):
        stats.paired_difference([True], [True, False])


def test_every_arm_is_a_valid_config(tmp_path):
    for name in arms.ARMS:
        cfg = load_config(str(REPO / "configs" / "tiny.yaml"), arms.arm_overrides(name, tmp_path / "base", tmp_path, 3))
        assert cfg.output_dir == str(tmp_path / name)
        if name == "dpo":
            assert cfg.stages == ["dpo", "eval"] and "rm" not in cfg.reward.components
        else:
            assert cfg.stages == ["rl", "eval"] and cfg.algorithm.steps == 3
            assert cfg.algorithm.policy_loss == {"grpo": "vanilla"}.get(name, name)
    assert arms.policy_dir(tmp_path, "dpo") == tmp_path / "dpo" / "dpo"


def _summary(accuracy: float, rl: bool) -> dict:
    evaluation = {"accuracy": accuracy, "n": 4, "mean_response_tokens": 20.0}
    summary = {"eval_after": evaluation, "wall_s": 50.0, "steps": 3 if rl else 0,
               "stage_s": {"rl": 30.0} if rl else {"dpo": 10.0}}
    if rl:
        summary["eval_before"] = {**evaluation, "accuracy": 0.25}
    else:
        summary["dpo"] = {"steps": 7, "train_pairs": 56, "pair_accuracy_before": 0.5, "pair_accuracy_after": 0.75,
                          "reward_accuracy": 0.8}
    return summary


def test_rows_differences_and_table():
    base = {"stage_s": {"warmup": 5.0, "label": 2.0, "train_rm": 3.0}}
    summaries = {"grpo": _summary(0.75, True), "dpo": _summary(0.5, False)}
    rows = {name: arms.arm_figures(name, s, base) for name, s in summaries.items()}
    assert rows["grpo"]["from_warmup_s"] == 35.0 and rows["dpo"]["from_warmup_s"] == 12.0
    assert rows["dpo"]["steps"] == 7 and rows["dpo"]["train_stage"] == "dpo"
    warmup = arms.warmup_figures(base, ["grpo", "dpo"], summaries, {})
    assert warmup["accuracy"] == 0.25 and warmup["n"] == 4
    answers = {"warmup": [True, False, False, False], "grpo": [True, True, True, False], "dpo": None}
    arms.compare(rows, warmup, answers)
    assert rows["grpo"]["vs_warmup"]["paired"] and rows["grpo"]["vs_warmup"]["points"] == 50.0
    assert rows["dpo"]["vs_grpo"]["points"] == -25.0 and not rows["dpo"]["vs_grpo"]["paired"]
    assert "vs_grpo" not in rows["grpo"]
    text = arms.table({"warmup": warmup, "arms": rows})
    assert "held-out problems: 4" in text and "+50.0" in text and "unpaired" in text
    assert len(text.splitlines()) == 4
