"""Grading and selection of teacher traces: correctness by the verifier, RV/CD by rule or by a judge, and the
RV/CD curriculum that keeps, per CD bin, the traces whose reasoning verbosity fits a target.

This is OmniThought's selection for the DistilQwen-ThoughtX models, on any data: ``matched`` keeps short
reasoning for easy problems and long for hard ones (target RV rising with CD, reward/scoring/adaptive.py's
``target_rv``); ``low``, ``medium`` and ``high`` aim at one verbosity everywhere (the slow-thinking series is
``high``); ``none`` keeps every correct trace. rlhf/stages/curriculum.py uses the same functions for the arithmetic
task's warm-up.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from reward.scoring.adaptive import SCALE_MAX, rule_cd, rule_rv, target_rv
from rlhf.core.data import think

FIXED_TARGETS = {"low": 1.0, "medium": 4.5, "high": 8.0}  # RV on the 0-9 scale
CURRICULA = ("none", "matched", *FIXED_TARGETS)


@dataclass(frozen=True)
class Trace:
    prompt: str
    response: str
    rv: float
    cd: float
    correct: bool | None = None  # None: nothing to check it against
    prompt_index: int = 0  # which prompt of the source (several traces may share one)


def target_fn(kind: str, rv_at_cd0: float = 0.0, rv_at_cd9: float = 8.0) -> Callable[[float], float]:
    """The target RV as a function of CD for a curriculum kind."""
    if kind == "matched":
        return lambda cd: target_rv(cd, rv_at_cd0, rv_at_cd9)
    if kind in FIXED_TARGETS:
        return lambda cd: FIXED_TARGETS[kind]
    raise ValueError(f"unknown curriculum {kind!r}: use matched, {', '.join(FIXED_TARGETS)}")


def cd_bin(cd: float) -> int:
    """The CD bin of a score: its integer part, 0-9."""
    return int(min(SCALE_MAX, max(0.0, cd)))


def select_traces(traces: list, target: Callable[[float], float], keep: float) -> list:
    """Per CD bin (the CD's integer part), the ``keep`` share (rounded, at least one) of the bin's traces whose
    RV is closest to ``target(cd)``; ties go to the earlier trace. Returned in their original order. Any objects
    with ``rv`` and ``cd`` attributes."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    bins: dict[int, list[int]] = {}
    for i, trace in enumerate(traces):
        bins.setdefault(cd_bin(trace.cd), []).append(i)
    chosen: list[int] = []
    for members in bins.values():
        ranked = sorted(members, key=lambda i: (abs(traces[i].rv - target(traces[i].cd)), i))
        chosen += ranked[:max(1, round(keep * len(members)))]
    return [traces[i] for i in sorted(chosen)]


def reasoning_steps(response: str) -> int:
    """Reasoning steps by rule: the non-empty lines of the reasoning (think blocks and the text before the final
    answer)."""
    return sum(1 for line in think.reasoning_text(response).splitlines() if line.strip().strip("#").strip())


def rule_scores(traces: list[Trace], chars_per_rv: float, difficulties: list[float | None] | None = None,
                difficulty_range: tuple[float, float] | None = None) -> list[Trace]:
    """RV and CD by rule. RV: the reasoning's length, ``chars_per_rv`` characters a point (capped at 9). CD: the
    prompt's difficulty (``difficulties[prompt_index]``) scaled from ``difficulty_range`` to 0-9 where given;
    else the mean number of reasoning steps of the prompt's correct traces (all of them where none is correct),
    a step a point: a problem whose solutions take more steps is harder."""
    every: dict[int, list[int]] = {}
    right: dict[int, list[int]] = {}
    for trace in traces:
        n = reasoning_steps(trace.response)
        every.setdefault(trace.prompt_index, []).append(n)
        if trace.correct is not False:
            right.setdefault(trace.prompt_index, []).append(n)
    steps = {i: right.get(i) or counts for i, counts in every.items()}
    scored = []
    for trace in traces:
        if difficulty_range is not None and difficulties is not None:
            difficulty = difficulties[trace.prompt_index]
            if difficulty is None:
                raise ValueError(f"prompt {trace.prompt_index} has no difficulty for the rule's CD")
            cd = rule_cd(float(difficulty), *difficulty_range)
        else:
            counts = steps[trace.prompt_index]
            cd = min(SCALE_MAX, sum(counts) / len(counts))
        scored.append(replace(trace, rv=rule_rv(trace.response, chars_per_rv), cd=cd))
    return scored


def select(traces: list[Trace], curriculum: str, keep: float, keep_unverified: bool = True,
           rv_at_cd0: float = 0.0, rv_at_cd9: float = 8.0) -> tuple[list[Trace], dict]:
    """(kept traces, per-bin summary). Wrong traces go first (and unverified ones unless ``keep_unverified``);
    then per CD bin the curriculum picks (``none``: every remaining trace). The summary maps each CD bin to its
    ``traces``, ``correct``, ``kept``, the ``target_rv`` there, and the kept traces' ``mean_rv``."""
    if curriculum not in CURRICULA:
        raise ValueError(f"unknown curriculum {curriculum!r}: use {', '.join(CURRICULA)}")
    usable = [t for t in traces if t.correct is True or (t.correct is None and keep_unverified)]
    if curriculum == "none" or not usable:
        kept, target = usable, None
    else:
        target = target_fn(curriculum, rv_at_cd0, rv_at_cd9)
        kept = select_traces(usable, target, keep)
    summary: dict[str, dict] = {}
    for trace in traces:
        entry = summary.setdefault(str(cd_bin(trace.cd)), {"traces": 0, "correct": 0, "kept": 0, "rv_sum": 0.0})
        entry["traces"] += 1
        entry["correct"] += trace.correct is True
    for trace in kept:
        entry = summary[str(cd_bin(trace.cd))]
        entry["kept"] += 1
        entry["rv_sum"] += trace.rv
    for name, entry in summary.items():
        entry["mean_rv"] = round(entry.pop("rv_sum") / entry["kept"], 3) if entry["kept"] else None
        entry["target_rv"] = round(target(int(name) + 0.5), 3) if target else None
    return kept, dict(sorted(summary.items(), key=lambda item: int(item[0])))
