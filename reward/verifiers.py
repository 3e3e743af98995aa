"""Rule-based verifiers: does a response's final answer match the reference? Pure functions of text."""
from __future__ import annotations

from rlhf.tasks.arithmetic import extract_answer


def final_number_correct(response: str, reference: str | int) -> bool | None:
    """True/False for the number after the response's last ``#`` against the reference answer; None when the
    response has no parseable answer at all (so callers can tell "wrong" from "did not answer")."""
    answer = extract_answer(response)
    if answer is None:
        return None
    return answer == int(reference)
