"""The adaptive-length reward (reward/scoring/adaptive.py) against hand-computed values, its reward-worker component, and
the per-difficulty figures (rlhf/rl/evaluate.py)."""
import pytest

from reward.scoring.adaptive import (AdaptiveLength, length_fit, length_penalty, rule_cd, rule_rv, skip_think_bonus,
                             target_rv)
from reward.teachers import OracleTeacher
from reward.scoring.worker import RewardError
from rlhf.core.config.run_config import AdaptiveConfig, ConfigError, load_config
from rlhf.core.data.datasets import PromptRow
from rlhf.rl.evaluate import difficulty_metrics, score_eval
from rlhf.core.data.samples import Sample
from tests.scoring import reward_worker

SHAPE = dict(rv_at_cd0=0.0, rv_at_cd9=8.0, tolerance=0.5, over_penalty=0.5, under_penalty=0.5)


def settings(**changes) -> dict:
    return {**AdaptiveConfig().model_dump(), "difficulty_range": (1, 6), **changes}


def test_target_rv_rises_linearly_with_cd_and_clips():
    assert target_rv(0, 0, 8) == 0 and target_rv(9, 0, 8) == 8
    assert target_rv(4.5, 0, 8) == pytest.approx(4.0)
    assert target_rv(3, 1, 7) == pytest.approx(3.0)  # 1 + 6 * 3/9
    assert target_rv(12, 0, 8) == 8 and target_rv(-1, 0, 8) == 0


def test_length_penalty_by_hand():
    assert length_penalty(2.0, 0.0, 0.5, 0.5, 0.5) == pytest.approx(0.75)  # over by 2, 1.5 beyond tolerance
    assert length_penalty(7.0, 8.0, 0.5, 0.5, 0.5) == pytest.approx(0.25)  # under by 1, 0.5 beyond
    assert length_penalty(4.3, 4.0, 0.5, 0.5, 0.5) == 0.0  # within tolerance
    assert length_penalty(3.0, 0.0, 0.5, 1.0, 0.25) == pytest.approx(2.5)  # over-thinking weighed separately
    assert length_penalty(0.0, 3.0, 0.5, 1.0, 0.25) == pytest.approx(0.625)  # ... from under-thinking


def test_length_fit_is_gated_on_correctness_and_clipped_at_zero():
    assert length_fit(True, 2.0, 0.0, **SHAPE) == pytest.approx(0.25)  # easy problem, over-thought: 1 - 0.75
    assert length_fit(True, 0.0, 0.0, **SHAPE) == 1.0  # easy problem, bare answer
    assert length_fit(True, 7.0, 9.0, **SHAPE) == pytest.approx(0.75)  # hard problem, a little short
    assert length_fit(True, 0.0, 9.0, **SHAPE) == 0.0  # hard problem, no reasoning: 1 - 3.75, clipped
    assert length_fit(False, 0.0, 0.0, **SHAPE) == 0.0  # wrong: nothing, however well sized


def test_skip_think_bonus_only_for_correct_unthought_easy_answers():
    assert skip_think_bonus(True, False, 1.0, 2.0, 0.3) == 0.3
    assert skip_think_bonus(True, True, 1.0, 2.0, 0.3) == 0.0
    assert skip_think_bonus(True, False, 3.0, 2.0, 0.3) == 0.0
    assert skip_think_bonus(False, False, 1.0, 2.0, 0.3) == 0.0


def test_rule_signals_by_hand():
    assert rule_rv("<think>7+5=12;12-3=9</think>#9", 6.0) == pytest.approx(13 / 6)
    assert rule_rv("7+5=12;#12", 6.0) == pytest.approx(7 / 6) and rule_rv("#9", 6.0) == 0.0
    assert rule_rv("<think>" + "x" * 100 + "</think>#1", 6.0) == 9.0
    assert rule_cd(1, 1, 6) == 0.0 and rule_cd(6, 1, 6) == 9.0 and rule_cd(3.5, 1, 6) == pytest.approx(4.5)
    with pytest.raises(ValueError):
        rule_cd(1, 6, 6)


def test_component_from_the_rule_source():
    component = AdaptiveLength(settings())
    responses = ["#12", "<think>7+5=12</think>#12", "#99", "<think>1+1=2;2+1=3;3+1=4;4+1=5;5+1=6;6+1=7</think>#7"]
    rewards = component.rewards(["7+5="] * 2 + ["x"] * 2, responses, ["12", "12", "7", "7"],
                                [True, True, False, True], [1, 1, 6, 6])
    # level 1 -> CD 0, target 0: bare 1.0; 6 characters of thought = RV 1, 0.5 beyond tolerance -> 1 - 0.25.
    # level 6 -> CD 9, target 8: wrong -> 0; 35 characters = RV 5.83, under by 2.17, 1.67 beyond -> 1 - 0.833.
    assert rewards == pytest.approx([1.0, 0.75, 0.0, 1 / 6])
    with pytest.raises(ValueError, match="difficulty"):
        component.rewards(["7+5="], ["#12"], ["12"], [True], [None])


def test_component_from_the_teacher_and_rm_sources():
    teacher = AdaptiveLength(settings(source="teacher"), OracleTeacher())
    # "7+5=": one operation that carries -> oracle CD 1, target 8/9; "#12": RV 0, under by 0.389 beyond tolerance.
    # "<think>7+5=12;so 7+5=12</think>#12": 16 characters -> RV 3, over by 2.11, 1.61 beyond -> 1 - 0.806.
    rewards = teacher.rewards(["7+5="] * 2, ["#12", "<think>7+5=12;so 7+5=12</think>#12"], ["12"] * 2,
                              [True, True])
    assert rewards == pytest.approx([1 - 0.5 * (8 / 9 - 0.5), 1 - 0.5 * (3 - 8 / 9 - 0.5)])
    rm = AdaptiveLength(settings(source="rm", skip_think_bonus=0.2))
    scores = [{"quality": 0.0, "rv": 1.0, "cd": 0.0}, {"quality": 0.0, "rv": 6.0, "cd": 9.0}]
    # RV 1 on CD 0: 1 - 0.25, plus the skip bonus (no block, easy); RV 6 on CD 9: 1 - 0.75.
    assert rm.rewards(["a", "b"], ["1;#1", "#2"], ["1", "2"], [True, True], None, scores) == \
        pytest.approx([0.75 + 0.2, 0.25])


def test_reward_worker_adds_the_weighted_component_to_the_verifier():
    worker = reward_worker({"verifier": 1.0, "adaptive": 0.5}, 
                           adaptive=AdaptiveConfig(**settings()))
    results = worker.score(["7+5="] * 3, ["#12", "<think>7+5=12</think>#12", "<think>7+5=12</think>#13"],
                           ["12"] * 3, None, [1, 1, 1])
    assert [r["reward"] for r in results] == pytest.approx([1.5, 1.375, 0.0])
    assert [r["adaptive"] for r in results] == pytest.approx([1.0, 0.75, 0.0])
    with pytest.raises(RewardError, match="adaptive reward"):
        worker.score(["7+5="], ["#12"], ["12"])  # the rule source needs difficulties


def test_adaptive_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="reward.adaptive.source"):
        load_config(None, ["reward.adaptive.source=oracle"])
    with pytest.raises(ConfigError, match="difficulty_range"):
        load_config(None, ["reward.adaptive.difficulty_range=[6, 1]"])
    data = tmp_path / "d.jsonl"
    with pytest.raises(ConfigError, match="reward.adaptive.source rule needs task.difficulty_field"):
        load_config(None, ["task.name=dataset", f"task.train_file={data}", f"task.eval_file={data}",
                           "reward.components={verifier: 1.0, adaptive: 0.5}"])
    with pytest.raises(ConfigError, match="source rm needs a local reward model"):
        load_config(None, ["reward.components={verifier: 1.0, adaptive: 0.5}", "reward.adaptive.source=rm"])


def _sample(text: str, tokens: int) -> Sample:
    return Sample(0, [4], list(range(tokens)), [-0.1] * tokens, "stop", text)


def test_per_difficulty_figures_by_hand():
    samples = [_sample("#3", 3), _sample("<think>1+2=3</think>#3", 23), _sample("<think>ab</think>#5", 19),
               _sample("<think>abcd</think>#6", 21)]
    correct = [True, True, False, True]
    metrics = difficulty_metrics([1, 1, 6, 6], samples, correct)
    assert metrics["difficulty/1/accuracy"] == 1.0 and metrics["difficulty/6/accuracy"] == 0.5
    assert metrics["difficulty/1/response_tokens"] == 13.0 and metrics["difficulty/6/response_tokens"] == 20.0
    assert metrics["difficulty/1/think_rate"] == 0.5 and metrics["difficulty/6/think_rate"] == 1.0
    assert metrics["difficulty/1/reasoning_tokens"] == 2.5  # (0 + 5 characters) / 2
    assert metrics["difficulty/6/reasoning_tokens"] == 3.0  # (2 + 4) / 2
    assert metrics["charts/think_rate"] == 0.75 and metrics["charts/reasoning_tokens"] == 2.75
    rows = [PromptRow("p", "3", 1), PromptRow("p", "3", 1), PromptRow("q", "5", 6), PromptRow("q", "6", 6)]
    figures = score_eval(rows, samples, [{"correct": float(c)} for c in correct], count_tokens=lambda t: 2 * len(t))
    assert figures["by_difficulty"]["6"] == {"accuracy": 0.5, "mean_response_tokens": 20.0, "think_rate": 1.0,
                                             "mean_reasoning_tokens": 6.0, "n": 2}
    assert figures["think_rate"] == 0.75 and figures["n"] == 4


def test_thinking_figures_only_where_think_blocks_are_in_use():
    """A MATH response without blocks is not all reasoning, nor longer in reasoning than in response tokens."""
    samples = [_sample(r"First, 3 + 4 = 7. ### Answer \boxed{7}", 12), _sample(r"\boxed{8}", 4)]
    metrics = difficulty_metrics([2, 2], samples, [True, False], count_tokens=lambda t: 100)
    assert metrics == {"difficulty/2/accuracy": 0.5, "difficulty/2/response_tokens": 8.0}
    figures = score_eval([PromptRow("p", "7", 2), PromptRow("q", "7", 2)], samples,
                         [{"correct": 1.0}, {"correct": 0.0}])
    assert "think_rate" not in figures and "think_rate" not in figures["by_difficulty"]["2"]
    # with a block in the batch, reasoning is capped at the response's own length
    thought = [_sample("<think>" + "x" * 50 + "</think>#7", 12), _sample("#7", 2)]
    metrics = difficulty_metrics([1, 1], thought, [True, True], count_tokens=len)
    assert metrics["charts/think_rate"] == 0.5 and metrics["charts/reasoning_tokens"] == 6.0  # (12 + 0) / 2
