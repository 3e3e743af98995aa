"""Think blocks (rlhf/core/data/think.py): splitting reasoning from answer, robust to messy samples; switches; the
verifier and the oracle read the answer part only."""
import pytest

from reward.scoring.verifiers import final_number, final_number_correct
from rlhf.core.tasks import arithmetic
from rlhf.core.data.think import answer_text, reasoning_text, split_think, strip_switch, with_switch, wrap


def test_a_plain_block_splits_into_reasoning_and_answer():
    parts = split_think("<think>7+5=12;12-3=9</think>#9")
    assert (parts.reasoning, parts.answer, parts.has_block, parts.closed, parts.thought) == \
        ("7+5=12;12-3=9", "#9", True, True, True)


def test_text_before_and_after_the_block_is_answer_text():
    parts = split_think("Let me see. <think>a+b</think> So: #4")
    assert parts.reasoning == "a+b" and parts.answer == "Let me see.  So: #4"


def test_an_unclosed_block_is_all_reasoning_and_no_answer():
    parts = split_think("<think>7+5=12;#12")
    assert parts.reasoning == "7+5=12;#12" and parts.answer == "" and not parts.closed
    assert final_number("<think>7+5=12;#12") is None  # it stopped while thinking: no answer
    assert final_number_correct("<think>7+5=12;#12", "12") is None


def test_nested_blocks_belong_to_the_outermost_one():
    parts = split_think("<think>a<think>b</think>c</think>#5")
    assert parts.reasoning == "abc" and parts.answer == "#5" and parts.closed
    unclosed = split_think("<think>a<think>b</think>c #5")  # the inner close does not end the outer block
    assert unclosed.reasoning == "abc #5" and unclosed.answer == "" and not unclosed.closed


def test_an_empty_block_is_a_block_but_not_thinking():
    parts = split_think("<think></think>#5")
    assert parts.has_block and not parts.thought and parts.answer == "#5"
    assert not split_think("<think>  \n</think>#5").thought


def test_a_stray_close_ends_a_block_opened_in_the_prompt():
    parts = split_think("7+5=12</think>#12")
    assert parts.reasoning == "7+5=12" and parts.answer == "#12"
    parts = split_think("x<think>a</think>y</think>z")  # everything before the stray close was reasoning
    assert parts.reasoning == "xay" and parts.answer == "z"


def test_several_blocks_and_no_block():
    parts = split_think("<think>a</think>b<think>c</think>d")
    assert parts.reasoning == "ac" and parts.answer == "bd"
    plain = split_think("7+5=12;#12")
    assert plain.answer == "7+5=12;#12" and not plain.has_block and not plain.thought


def test_reasoning_text_counts_blocks_and_steps_before_the_answer():
    assert reasoning_text("<think>7+5=12</think>#12") == "7+5=12"
    assert reasoning_text("7+5=12;#12") == "7+5=12;"  # written-out steps without a block reason too
    assert reasoning_text("#12") == "" and reasoning_text("<think></think>#12") == ""
    assert reasoning_text("<think>a</think>b;#3") == "ab;"


def test_the_verifier_reads_the_answer_outside_the_block():
    assert final_number("<think>maybe #3</think>#5") == 5  # a number tried while thinking is not the answer
    assert final_number_correct("<think>#5</think>so it is #6", "6") is True
    assert final_number("no block #7") == 7  # unchanged without blocks
    assert answer_text("<think>x</think>#1") == "#1"


def test_switches_are_added_replaced_and_stripped():
    assert with_switch("1+2=", "on") == "1+2= /think"
    assert with_switch("1+2=", "off") == "1+2= /no_think"
    assert with_switch("1+2= /think", "off") == "1+2= /no_think"
    assert with_switch("1+2=", "auto") == "1+2="
    assert strip_switch("1+2= /no_think") == "1+2=" and strip_switch("1+2=") == "1+2="
    with pytest.raises(ValueError, match="think mode"):
        with_switch("1+2=", "sometimes")


def test_the_oracle_judges_think_responses_by_their_answer_and_reasoning():
    problem = arithmetic.parse_prompt("7+5-3= /think")  # a switched prompt still parses
    assert problem.answer == 9
    thought = arithmetic.solution(problem, 1, think_block=True)
    assert thought == "<think>7+5=12;12-3=9</think>#9" and wrap("", "#9") == "#9"
    judged = arithmetic.judge(problem, thought)
    assert judged.correct and judged.rv == 3  # ceil(13 characters of reasoning / 6), tags not counted
    assert not arithmetic.judge(problem, "<think>12-3=9;#9").correct  # unclosed: no answer


def test_think_config_errors_name_the_key():
    from rlhf.core.config.run_config import ConfigError, load_config

    assert load_config(None, ["think.mode=off", "think.format=true"]).think.mode == "off"  # YAML false
    assert load_config(None, ["think.mode=on"]).think.mode == "on"
    with pytest.raises(ConfigError, match="think.mode"):
        load_config(None, ["think.mode=maybe"])
    with pytest.raises(ConfigError, match="think.switch_fraction"):
        load_config(None, ["think.switch_fraction=1.5"])
    with pytest.raises(ConfigError, match="warmup.curriculum"):
        load_config(None, ["warmup.curriculum=extreme"])
