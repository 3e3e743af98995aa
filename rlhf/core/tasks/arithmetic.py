"""The quickstart task: chains of single-digit additions and subtractions with graded difficulty.

A problem is a prompt such as ``7+5-3+9=``; the answer is the last number after ``#``. Difficulty grows with the
number of operations (level 1 = one operation, level L = L operations) and with carries and borrows across 10.

Why it suits a CPU quickstart: a tiny transformer can learn one step ("15+7=22") well, but not a whole chain in
one shot. So a terse answer (``#18``) is reliable on easy problems and a guess on hard ones, while written-out
running totals (``7+5=12;12-3=9;9+9=18;#18``) stay correct at every level. Hard problems really need the
steps; easy ones do not. That is exactly the decision adaptive thinking is about, and one RL can learn fast.

The oracle teacher lives here too, because only the task knows the truth: it writes solutions at a chosen
verbosity (for warm-up distillation) and judges any response (correctness, reasoning verbosity RV 0-9 and
cognitive difficulty CD 0-9).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from rlhf.core.data import think

MIN_LEVEL, MAX_LEVEL = 1, 6
MAX_TOTAL = 19
ANSWER_MARK = "#"


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    ops: tuple[str, ...]  # one fewer than operands, each "+" or "-"

    @property
    def level(self) -> int:
        return len(self.ops)

    @property
    def prompt(self) -> str:
        return self.expression + "="

    @property
    def expression(self) -> str:
        return str(self.operands[0]) + "".join(op + str(x) for op, x in zip(self.ops, self.operands[1:]))

    def running_totals(self) -> list[int]:
        totals = [self.operands[0]]
        for op, x in zip(self.ops, self.operands[1:]):
            totals.append(totals[-1] + x if op == "+" else totals[-1] - x)
        return totals

    @property
    def answer(self) -> int:
        return self.running_totals()[-1]

    @property
    def carries(self) -> int:
        """Steps whose result crosses a multiple of ten: the ones a person has to think about."""
        totals = self.running_totals()
        return sum(a // 10 != b // 10 for a, b in zip(totals, totals[1:]))

    @property
    def difficulty(self) -> int:
        """Cognitive difficulty CD on the 0-9 scale: 1.6 points per extra operation (levels 1-6 span 0-8), plus one
        when at least half the steps carry or borrow."""
        return min(9, round(1.6 * (self.level - 1)) + (1 if self.carries >= max(1, self.level // 2) else 0))


def make_problem(rng: random.Random, level: int) -> Problem:
    """A problem with ``level`` operations whose running totals stay within 0..MAX_TOTAL."""
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"level must be in {MIN_LEVEL}..{MAX_LEVEL}, got {level}")
    operands = [rng.randint(1, 9)]
    ops: list[str] = []
    total = operands[0]
    for _ in range(level):
        x = rng.randint(1, 9)
        # Totals stay within 0..MAX_TOTAL: every single step is then a small fact a tiny model learns quickly,
        # while the whole chain at once stays out of its reach.
        if total + x > MAX_TOTAL:
            op = "-"
        elif x > total:
            op = "+"
        else:
            op = "-" if rng.random() < 0.5 else "+"
        total = total + x if op == "+" else total - x
        operands.append(x)
        ops.append(op)
    return Problem(tuple(operands), tuple(ops))


def make_problems(n: int, seed: int, levels: tuple[int, ...] = tuple(range(MIN_LEVEL, MAX_LEVEL + 1))) -> list[Problem]:
    """``n`` problems, levels taken round-robin so every level is equally represented; deterministic by seed."""
    rng = random.Random(seed)
    return [make_problem(rng, levels[i % len(levels)]) for i in range(n)]


# --------------------------------------------------------------------------------------------------- teacher


def solution(problem: Problem, verbosity: int, think_block: bool = False) -> str:
    """The teacher's worked solution at a chosen verbosity: 0 = answer only, 1 = running totals, 2 = running
    totals, then the whole expression restated as a check. ``think_block``: the steps go in a Qwen3-style
    ``<think>`` block before the answer (a bare answer has no block)."""
    answer = f"{ANSWER_MARK}{problem.answer}"
    if verbosity <= 0:
        return answer
    totals = problem.running_totals()
    steps = [f"{a}{op}{x}={b}" for a, op, x, b in zip(totals, problem.ops, problem.operands[1:], totals[1:])]
    if verbosity >= 2:
        steps.append(f"so {problem.expression}={problem.answer}")
    if think_block:
        return think.wrap(";".join(steps), answer)
    return ";".join(steps) + ";" + answer


# The number after a ``#``; thousands separators as GSM8K writes them ("#### 1,234") are part of the number.
_FINAL_NUMBER_RE = re.compile(r"#\s*(-?\d{1,3}(?:,\d{3})+|-?\d+)")


def final_number(response: str) -> int | None:
    """The number after the last ``#`` of the response's answer part; None when there is none. The answer part is
    the text outside ``<think>`` blocks (rlhf/core/data/think.py): numbers tried out while thinking are not the answer,
    and a response that stopped inside an unclosed block has not answered."""
    found = _FINAL_NUMBER_RE.findall(think.answer_text(response))
    return int(found[-1].replace(",", "")) if found else None


def extract_answer(response: str) -> int | None:
    """The final answer: the number after the last ``#``; None when there is none (the verifiers' one rule)."""
    return final_number(response)


def reasoning_text(response: str) -> str:
    """The written-out reasoning: think blocks' text (tags not counted) and anything before the final answer mark."""
    return think.reasoning_text(response)


def reasoning_verbosity(response: str) -> int:
    """RV on the 0-9 scale: 0 for a bare answer, one point per 6 characters of reasoning, capped at 9."""
    return min(9, math.ceil(len(reasoning_text(response).strip()) / 6))


@dataclass(frozen=True)
class Judgment:
    correct: bool
    rv: int
    cd: int


def judge(problem: Problem, response: str) -> Judgment:
    """The oracle's verdict on one response: right or wrong, how verbose, how hard the problem was."""
    return Judgment(extract_answer(response) == problem.answer, reasoning_verbosity(response), problem.difficulty)


_PROMPT_RE = re.compile(r"^\s*(\d)((?:[+-]\d)+)=\s*$")


def parse_prompt(prompt: str) -> Problem:
    """Recover the problem from its prompt text (what a reward worker receives), a think switch allowed."""
    match = _PROMPT_RE.match(think.strip_switch(prompt))
    if not match:
        raise ValueError(f"not an arithmetic-task prompt: {prompt!r}")
    rest = match.group(2)
    return Problem((int(match.group(1)), *(int(d) for d in rest[1::2])), tuple(rest[0::2]))
