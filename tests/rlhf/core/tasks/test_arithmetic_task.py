"""Tests for the quickstart arithmetic task (rlhf.tasks.arithmetic) and its character tokenizer (rlhf.char_tokenizer)."""
from __future__ import annotations

from collections import Counter

import pytest

from rlhf.core.models.char_tokenizer import DEFAULT_ALPHABET, SPECIAL_TOKENS, build_char_tokenizer
from rlhf.core.tasks.arithmetic import (
    MAX_LEVEL,
    MAX_TOTAL,
    MIN_LEVEL,
    Problem,
    extract_answer,
    judge,
    make_problem,
    make_problems,
    parse_prompt,
    solution,
)

# 7+5-3: running totals 7, 12, 9; answer 9; two operations (level 2).
P = Problem((7, 5, 3), ("+", "-"))
PROBLEMS = make_problems(500, seed=0)

# ------------------------------------------------------------------------------------------- generation


def test_make_problems_is_deterministic_per_seed():
    assert make_problems(50, seed=1) == make_problems(50, seed=1)
    assert make_problems(50, seed=1) != make_problems(50, seed=2)


def test_make_problems_balances_levels_round_robin():
    levels = range(MIN_LEVEL, MAX_LEVEL + 1)
    assert Counter(p.level for p in make_problems(20 * len(levels), seed=3)) == {level: 20 for level in levels}
    # 7 problems over levels 1-5: levels 1 and 2 get the two extra ones, in order
    assert [p.level for p in make_problems(7, seed=3, levels=(1, 2, 3, 4, 5))] == [1, 2, 3, 4, 5, 1, 2]
    assert [p.level for p in make_problems(4, seed=3, levels=(2, 4))] == [2, 4, 2, 4]


def test_running_totals_stay_within_zero_and_max_total():
    for p in PROBLEMS:
        totals = p.running_totals()
        assert all(0 <= t <= MAX_TOTAL for t in totals), p
        assert all(1 <= x <= 9 for x in p.operands), p
        assert set(p.ops) <= {"+", "-"}
        assert len(p.ops) == len(p.operands) - 1 == p.level


def test_answer_matches_python_eval_of_the_expression():
    for p in PROBLEMS:
        assert p.answer == eval(p.expression), p.expression  # noqa: S307 - digits and +/- only
        assert p.prompt == p.expression + "="


def test_hand_made_problem_properties():
    assert P.expression == "7+5-3"
    assert P.prompt == "7+5-3="
    assert P.running_totals() == [7, 12, 9]
    assert P.answer == 9
    assert P.level == 2
    assert P.carries == 2  # 7 -> 12 and 12 -> 9 both cross 10


@pytest.mark.parametrize("level", [MIN_LEVEL - 1, MAX_LEVEL + 1])
def test_make_problem_refuses_a_level_out_of_range(level):
    import random

    with pytest.raises(ValueError, match="level"):
        make_problem(random.Random(0), level)


# --------------------------------------------------------------------------------------------- teacher


def test_solution_at_each_verbosity():
    assert solution(P, 0) == "#9"
    assert solution(P, 1) == "7+5=12;12-3=9;#9"
    assert solution(P, 2) == "7+5=12;12-3=9;so 7+5-3=9;#9"


def test_solutions_of_generated_problems_end_in_their_answer():
    for p in PROBLEMS[:50]:
        for verbosity in (0, 1, 2):
            assert extract_answer(solution(p, verbosity)) == p.answer


@pytest.mark.parametrize("response, answer", [
    ("#9", 9),
    ("x#3;#12", 12),  # the last answer mark wins
    ("no answer", None),
    ("# -4", -4),  # spaces after the mark and a sign are allowed
    ("", None),
    ("#", None),
    ("7+5=12;#12 then some trailing text", 12),
])
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


def test_judge_bare_correct_answer_has_rv_zero():
    # P: level 2, 2 carries -> cd = 2 * (2 - 1) + 1 = 3
    verdict = judge(P, "#9")
    assert (verdict.correct, verdict.rv, verdict.cd) == (True, 0, 3)


def test_judge_rv_rises_with_reasoning_length():
    # reasoning before the last '#':
    #   "7+5=12;12-3=9;"            14 chars -> ceil(14 / 6) = 3
    #   "7+5=12;12-3=9;so 7+5-3=9;" 25 chars -> ceil(25 / 6) = 5
    assert judge(P, solution(P, 1)).rv == 3
    assert judge(P, solution(P, 2)).rv == 5
    assert judge(P, solution(P, 1)).correct and judge(P, solution(P, 2)).correct


def test_judge_rv_is_capped_at_nine():
    # 100 chars -> ceil(100 / 6) = 17, capped at 9
    assert judge(P, "x" * 100 + "#9").rv == 9


def test_judge_wrong_or_missing_answer_is_incorrect():
    assert judge(P, "#8").correct is False
    # no answer mark: the whole response counts as reasoning, 5 chars -> ceil(5 / 6) = 1
    verdict = judge(P, "hello")
    assert (verdict.correct, verdict.rv) == (False, 1)


@pytest.mark.parametrize("problem, cd", [
    (Problem((2, 3), ("+",)), 0),  # level 1, no carry: 2 * 0 + 0
    (Problem((8, 5), ("+",)), 1),  # level 1, 8 -> 13 carries: 2 * 0 + 1
    (Problem((1, 1, 1, 1), ("+", "+", "+")), 3),  # level 3, no carry: round(1.6 * 2) + 0
    (Problem((1, 1, 1, 1, 1, 1), ("+",) * 5), 6),  # level 5, no carry: round(1.6 * 4) + 0
    (Problem((9, 9, 9, 9, 9, 9), ("+", "-", "+", "-", "+")), 7),  # level 5, 5 carries: round(6.4) + 1
    (Problem((9,) * 7, ("+", "-") * 3), 9),  # level 6, 6 carries: round(8.0) + 1
])
def test_judge_cd_on_hand_made_problems(problem, cd):
    assert judge(problem, "#0").cd == cd


def test_cd_is_in_range_and_rises_with_level():
    by_level: dict[int, set[int]] = {}
    for p in PROBLEMS:
        by_level.setdefault(p.level, set()).add(judge(p, "#0").cd)
    assert sorted(by_level) == list(range(MIN_LEVEL, MAX_LEVEL + 1))
    for level in range(MIN_LEVEL, MAX_LEVEL):
        # Bins may touch (a hard level-2 problem can score like an easy level-3 one) but never cross.
        assert max(by_level[level]) <= min(by_level[level + 1]), by_level
        assert sum(by_level[level]) / len(by_level[level]) < sum(by_level[level + 1]) / len(by_level[level + 1])
    assert all(0 <= cd <= 9 for cds in by_level.values() for cd in cds)


# -------------------------------------------------------------------------------------------- prompts


def test_parse_prompt_round_trips_generated_prompts():
    for p in PROBLEMS:
        assert parse_prompt(p.prompt) == p
    assert parse_prompt("7+5-3=") == P


@pytest.mark.parametrize("junk", ["", "hello", "7+5-3", "7=", "12+3=", "7+=", "7*5=", "7+5=12", "=7+5"])
def test_parse_prompt_rejects_junk(junk):
    with pytest.raises(ValueError):
        parse_prompt(junk)


# ------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_tokenizer_round_trips_a_solution_exactly_one_token_per_character(tok):
    text = solution(P, 2)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    # digits come first after the three special tokens: '7' is id 3 + 7 = 10
    assert ids[0] == 10


def test_tokenizer_round_trips_prompt_plus_solution_for_generated_problems(tok):
    for p in PROBLEMS[:20]:
        text = p.prompt + solution(p, 2)
        assert tok.decode(tok(text)["input_ids"]) == text


def test_tokenizer_keeps_spaces_and_newlines_one_per_token(tok):
    text = "a b  c\n\nx\n"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_tokenizer_special_token_ids(tok):
    assert SPECIAL_TOKENS == ("<pad>", "<eos>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == 3 + len(DEFAULT_ALPHABET)


def test_tokenizer_maps_unknown_characters_to_unk(tok):
    assert tok("7é5", add_special_tokens=False)["input_ids"] == [10, 2, 8]
    assert tok("€")["input_ids"] == [tok.unk_token_id]


def test_tokenizer_decode_skips_eos_and_pad(tok):
    ids = tok("#9")["input_ids"] + [tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "#9"


def test_tokenizer_refuses_an_alphabet_with_repeats():
    with pytest.raises(ValueError, match="repeats"):
        build_char_tokenizer("0123456789+-+")


def test_tokenizer_saves_and_loads_with_auto_tokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = solution(P, 2)
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    assert loaded("é")["input_ids"] == [2]
    assert loaded.decode(loaded("a\n\nb")["input_ids"]) == "a\n\nb"
    assert len(loaded) == len(tok)
