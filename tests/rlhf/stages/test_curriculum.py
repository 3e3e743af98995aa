"""RV/CD curriculum mixing for warm-up data (rlhf/stages/curriculum.py) and think-format warm-up examples."""
import random

import pytest

from rlhf.stages import curriculum
from rlhf.core.config.run_config import ThinkConfig, WarmupConfig
from reward.teachers.trace_select import Trace, select_traces, target_fn
from rlhf.core.tasks import arithmetic
from rlhf.core.data.think import split_think
from rlhf.stages.warmup import teacher_examples


def test_target_functions():
    matched = target_fn("matched", 0.0, 8.0)
    assert matched(0) == 0.0 and matched(9) == 8.0 and matched(4.5) == pytest.approx(4.0)
    assert target_fn("low")(9) == 1.0 and target_fn("medium")(0) == 4.5 and target_fn("high")(3) == 8.0
    with pytest.raises(ValueError, match="unknown curriculum"):
        target_fn("extreme")


def test_selection_keeps_per_cd_bin_the_traces_closest_to_the_target():
    traces = [Trace("a", "a0", 0, 0.5), Trace("a", "a1", 2, 0.5), Trace("a", "a2", 4, 0.5),   # bin 0
              Trace("b", "b0", 0, 8.0), Trace("b", "b1", 6, 8.0), Trace("b", "b2", 9, 8.0),   # bin 8
              Trace("c", "c0", 0, 8.7), Trace("c", "c1", 7, 8.7), Trace("c", "c2", 9, 8.7)]   # bin 8
    matched = select_traces(traces, target_fn("matched", 0.0, 8.0), keep=1 / 3)
    # bin 0: target 0.44 -> a0; bin 8 (six traces, keep 2): targets 7.1 and 7.7 -> c1 (0.7 off), b1 (1.1 off)
    assert [t.response for t in matched] == ["a0", "b1", "c1"]
    high = select_traces(traces, target_fn("high"), keep=1 / 3)  # target 8 everywhere
    # bin 0: a2 (4 off); bin 8: b2, c1 and c2 are all 1 off, the earlier two are kept
    assert [t.response for t in high] == ["a2", "b2", "c1"]
    everything = select_traces(traces, target_fn("low"), keep=1.0)
    assert everything == traces
    with pytest.raises(ValueError):
        select_traces(traces, target_fn("low"), keep=0)


def test_ties_go_to_the_earlier_trace_and_every_bin_keeps_one():
    traces = [Trace("a", "x", 2, 1.0), Trace("a", "y", 0, 1.0), Trace("b", "z", 5, 5.0)]
    assert [t.response for t in select_traces(traces, lambda cd: 1.0, keep=0.1)] == ["x", "z"]


def test_teacher_traces_are_scored_with_the_oracles_rv_and_cd():
    # RV = ceil(reasoning characters / 6): 0, 13 -> 3, 24 -> 4
    problem = arithmetic.parse_prompt("7+5-3=")
    traces = curriculum.teacher_traces([problem], think_block=True)
    assert [t.response for t in traces] == ["#9", "<think>7+5=12;12-3=9</think>#9",
                                            "<think>7+5=12;12-3=9;so 7+5-3=9</think>#9"]
    assert [t.rv for t in traces] == [0.0, 3.0, 4.0] and {t.cd for t in traces} == {float(problem.difficulty)}


def test_matched_curriculum_answers_easy_problems_barely_and_thinks_on_hard_ones():
    pairs = curriculum.curriculum_batch(random.Random(0), 300, target_fn("matched", 0.0, 8.0), 1 / 3, True)
    assert len(pairs) == 300
    by_level = {}
    for prompt, response in pairs:
        by_level.setdefault(arithmetic.parse_prompt(prompt).level, []).append(split_think(response).thought)
    assert sum(by_level[1]) / len(by_level[1]) < 0.5  # mostly bare answers on one-operation problems
    assert all(by_level[6])  # always thought out on six-operation ones


def test_think_format_warmup_obeys_switches():
    pairs = teacher_examples(WarmupConfig(terse_fraction=0.5), 0, ThinkConfig(format=True, switch_fraction=0.5))(400)
    on = [r for p, r in pairs if p.endswith("/think")]
    off = [r for p, r in pairs if p.endswith("/no_think")]
    assert len(on) > 50 and len(off) > 50
    assert all(split_think(r).thought for r in on) and not any(split_think(r).has_block for r in off)
    plain = [r for p, r in pairs if p.endswith("=")]
    assert all(r.startswith(("#", "<think>")) for r in plain)
