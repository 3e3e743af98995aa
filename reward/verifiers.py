"""Rule-based verifiers: does a response's final answer match the reference? Pure functions of text."""
from __future__ import annotations

import re

from rlhf.think import answer_text

# The number after a ``#``; thousands separators as GSM8K writes them ("#### 1,234") are part of the number.
_FINAL_NUMBER_RE = re.compile(r"#\s*(-?\d{1,3}(?:,\d{3})+|-?\d+)")


def final_number(response: str) -> int | None:
    """The number after the last ``#`` of the response's answer part; None when there is none. The answer part is
    the text outside ``<think>`` blocks (rlhf/think.py): numbers tried out while thinking are not the answer, and a
    response that stopped inside an unclosed block has not answered."""
    found = _FINAL_NUMBER_RE.findall(answer_text(response))
    return int(found[-1].replace(",", "")) if found else None


def final_number_correct(response: str, reference: str | int) -> bool | None:
    """True/False for the number after the response's last ``#`` against the reference answer; None when the
    response has no parseable answer at all (so callers can tell "wrong" from "did not answer")."""
    answer = final_number(response)
    return None if answer is None else answer == int(reference)
