"""A rule-based teacher for datasets with reference solutions (GSM8K and the like): it judges on CPU, with no
model, by the same rules the traces stage scores with (``traces.scores: rule``, reward/teachers/trace_select.py).

- quality: the task's verifier against the reference's final answer: 9 correct, 2 wrong, 0 no parseable answer
  (the arithmetic oracle's scale);
- RV: the response's reasoning length, ``chars_per_rv`` characters a point (reward/scoring/adaptive.py ``rule_rv``);
- CD: the reasoning steps of the reference's worked solution, a step a point (``reasoning_steps``): a problem whose
  solution takes more steps is harder. A bare reference answer (no worked solution) gives CD 0.

Its verdicts are certain (no soft labels). It needs a reference per row: a row without one is an error row. The
label stage passes the dataset's worked solution where it has one (rlhf/core/data/datasets.py ``worked_solution``).
"""
from __future__ import annotations

from rlhf.core.data.datasets import final_answer
from reward.scoring.adaptive import SCALE_MAX, rule_rv
from reward.teachers.base import Verdict, check_rows, failed
from reward.teachers.oracle import QUALITY_CORRECT, QUALITY_UNANSWERED, QUALITY_WRONG
from reward.teachers.trace_select import reasoning_steps
from reward.scoring.verifiers import make_verifier


class ReferenceTeacher:
    """Judges (prompt, response, reference) rows by the verifier ``verifier`` names (task.verifier's names)."""

    def __init__(self, verifier: str = "gsm8k", chars_per_rv: float = 40.0):
        if chars_per_rv <= 0:
            raise ValueError(f"chars_per_rv must be positive, got {chars_per_rv}")
        self.verify = make_verifier(verifier)
        self.chars_per_rv = chars_per_rv

    def judge(self, prompts: list[str], responses: list[str], references: list[str | None]) -> list[Verdict]:
        check_rows(prompts, responses, references)
        return [self._judge_one(r, ref) for r, ref in zip(responses, references)]

    def _judge_one(self, response: str, reference: str | None) -> Verdict:
        if reference is None or not str(reference).strip():
            # One fixed reason so labelling counts these rows under one heading.
            return failed("reference: the row has no reference answer to check against")
        reference = str(reference)
        answer = final_answer(reference)
        correct = self.verify(response, answer)
        quality = QUALITY_CORRECT if correct else QUALITY_UNANSWERED if correct is None else QUALITY_WRONG
        # A bare answer has no steps (reasoning_steps would count its one line: it has no answer mark).
        steps = reasoning_steps(reference) if answer != reference.strip() else 0
        return Verdict(quality=quality, correct=bool(correct), rv=rule_rv(response, self.chars_per_rv),
                       cd=float(min(SCALE_MAX, steps)))
