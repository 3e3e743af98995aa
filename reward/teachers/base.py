"""The teacher interface: every back-end (oracle, local LLM judge, HTTP LLM judge) turns rows of
(prompt, response, reference) into ``Verdict``s, one per row, in order.

A row that cannot be judged never raises out of ``judge``: it comes back as a ``Verdict`` with ``error`` set and
no scores, so a labelling job counts it and goes on. Only caller bugs (lists of different lengths) and
configuration errors (at construction) raise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

SCORE_MIN, SCORE_MAX = 0.0, 9.0
CORRECT_THRESHOLD = 5.0  # a quality at or above this counts as a correct response when the teacher gives no bit


@dataclass
class Verdict:
    quality: float | None        # 0-9 overall quality of the response (correct, well reasoned = high); None if failed
    correct: bool | None
    rv: float | None             # reasoning verbosity 0-9
    cd: float | None             # cognitive difficulty of the problem 0-9
    quality_probs: list[float] | None = None   # soft labels over scores 0..9, where the teacher gives them
    rv_probs: list[float] | None = None
    cd_probs: list[float] | None = None
    error: str | None = None     # one-line reason when this row could not be judged (then the scores are None)


@runtime_checkable
class Teacher(Protocol):
    def judge(self, prompts: list[str], responses: list[str], references: list[str | None]) -> list[Verdict]: ...


def failed(reason: str) -> Verdict:
    """The verdict for a row that could not be judged."""
    return Verdict(None, None, None, None, error=one_line(reason))


def one_line(text: object, limit: int = 300) -> str:
    """Reasons are counted and printed by labelling: keep each to one bounded line."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def clamp_score(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"score {value} is not a finite number")
    return min(SCORE_MAX, max(SCORE_MIN, float(value)))


def check_rows(prompts: list[str], responses: list[str], references: list[str | None]) -> None:
    """Lists of different lengths are a caller bug, not a failing row: raise."""
    if not len(prompts) == len(responses) == len(references):
        raise ValueError(f"judge needs one response and one reference per prompt: got {len(prompts)} prompts, "
                         f"{len(responses)} responses, {len(references)} references")
