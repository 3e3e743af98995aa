"""RV/CD curriculum mixing for warm-up data, as OmniThought selected traces for the DistilQwen-ThoughtX models.

The teacher writes every problem at each verbosity; the traces are scored with reasoning verbosity (RV) and
cognitive difficulty (CD); then, within each CD bin, the traces whose RV is closest to a target are kept. The
target is ``matched`` (rising with CD: short answers to easy problems, written-out reasoning for hard ones) or a
fixed ``low``, ``medium`` or ``high`` verbosity.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from reward.adaptive import target_rv
from rlhf.base.tasks import arithmetic

FIXED_TARGETS = {"low": 1.0, "medium": 4.5, "high": 8.0}  # RV on the 0-9 scale
VERBOSITIES = (0, 1, 2)  # the teacher's answer only / running totals / totals and a check


@dataclass(frozen=True)
class Trace:
    prompt: str
    response: str
    rv: float
    cd: float


def target_fn(kind: str, rv_at_cd0: float = 0.0, rv_at_cd9: float = 8.0) -> Callable[[float], float]:
    """The target RV as a function of CD for a curriculum kind."""
    if kind == "matched":
        return lambda cd: target_rv(cd, rv_at_cd0, rv_at_cd9)
    if kind in FIXED_TARGETS:
        return lambda cd: FIXED_TARGETS[kind]
    raise ValueError(f"unknown curriculum {kind!r}: use matched, {', '.join(FIXED_TARGETS)}")


def select_traces(traces: list[Trace], target: Callable[[float], float], keep: float) -> list[Trace]:
    """Per CD bin (the CD's integer part), the ``keep`` share (rounded, at least one) of the bin's traces whose
    RV is closest to ``target(cd)``; ties go to the earlier trace. Returned in their original order."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    bins: dict[int, list[int]] = {}
    for i, trace in enumerate(traces):
        bins.setdefault(int(trace.cd), []).append(i)
    chosen: list[int] = []
    for members in bins.values():
        ranked = sorted(members, key=lambda i: (abs(traces[i].rv - target(traces[i].cd)), i))
        chosen += ranked[:max(1, round(keep * len(members)))]
    return [traces[i] for i in sorted(chosen)]


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
