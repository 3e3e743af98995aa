"""The arithmetic task's oracle as a teacher: it knows the true answer, so its verdicts are certain (no soft
labels). Quality is 9 for a correct final answer, 2 for a wrong one, 0 when there is no parseable answer."""
from __future__ import annotations

from rlhf.core.tasks.arithmetic import extract_answer, judge, parse_prompt

from reward.teachers.base import Verdict, check_rows, failed

QUALITY_CORRECT, QUALITY_WRONG, QUALITY_UNANSWERED = 9.0, 2.0, 0.0


class OracleTeacher:
    """Judges arithmetic-task rows exactly; any other prompt is an error row. References are not needed: the
    prompt itself determines the answer."""

    def judge(self, prompts: list[str], responses: list[str], references: list[str | None]) -> list[Verdict]:
        check_rows(prompts, responses, references)
        return [self._judge_one(p, r) for p, r in zip(prompts, responses)]

    @staticmethod
    def _judge_one(prompt: str, response: str) -> Verdict:
        try:
            problem = parse_prompt(prompt)
        except ValueError:
            # One fixed reason (not the prompt text) so labelling can count these rows under one heading.
            return failed("oracle: not an arithmetic-task prompt")
        j = judge(problem, response)
        if j.correct:
            quality = QUALITY_CORRECT
        elif extract_answer(response) is None:
            quality = QUALITY_UNANSWERED
        else:
            quality = QUALITY_WRONG
        return Verdict(quality=quality, correct=j.correct, rv=float(j.rv), cd=float(j.cd))
