"""RV/CD curriculum mixing for warm-up data, as OmniThought selected traces for the DistilQwen-ThoughtX models.

The teacher writes every problem at each verbosity; the traces are scored with reasoning verbosity (RV) and
cognitive difficulty (CD); then, within each CD bin, the traces whose RV is closest to a target are kept. The
target is ``matched`` (rising with CD: short answers to easy problems, written-out reasoning for hard ones) or a
fixed ``low``, ``medium`` or ``high`` verbosity.
"""
from __future__ import annotations

import random
from typing import Callable

from reward.teachers.trace_select import Trace, select_traces
from rlhf.core.tasks import arithmetic

VERBOSITIES = (0, 1, 2)  # the teacher's answer only / running totals / totals and a check


def teacher_traces(problems: list[arithmetic.Problem], think_block: bool = False) -> list[Trace]:
    """Every problem solved by the oracle teacher at each verbosity, each trace judged for RV and CD."""
    traces = []
    for problem in problems:
        for verbosity in VERBOSITIES:
            response = arithmetic.solution(problem, verbosity, think_block)
            judgment = arithmetic.judge(problem, response)
            traces.append(Trace(problem.prompt, response, float(judgment.rv), float(judgment.cd)))
    return traces


def curriculum_batch(rng: random.Random, n: int, target: Callable[[float], float], keep: float,
                     think_block: bool = False) -> list[tuple[str, str]]:
    """``n`` (prompt, response) pairs of curriculum-selected traces on fresh problems of every level."""
    levels = range(arithmetic.MIN_LEVEL, arithmetic.MAX_LEVEL + 1)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        problems = [arithmetic.make_problem(rng, rng.choice(levels)) for _ in range(n)]
        pairs += [(t.prompt, t.response) for t in select_traces(teacher_traces(problems, think_block), target, keep)]
    return pairs[:n]
