"""Rule-based verifiers: does a response's final answer match the reference? Pure functions of text."""
from __future__ import annotations

import functools
import re
import threading
from fractions import Fraction
from typing import Callable

from rlhf.core.tasks.arithmetic import final_number
from rlhf.core.config.registry import Registry
from rlhf.core.data.think import answer_text

def final_number_correct(response: str, reference: str | int) -> bool | None:
    """True/False for the number after the response's last ``#`` against the reference answer; None when the
    response has no parseable answer at all (so callers can tell "wrong" from "did not answer")."""
    answer = final_number(response)
    return None if answer is None else answer == int(reference)


# ----------------------------------------------------------------------------------- verifiers by dataset style
# Each takes (response, reference) and returns True/False, or None when the response gives no answer of the
# expected form (so "did not answer" can be rewarded apart from "answered wrong"). ``task.verifier`` picks one.

Verifier = Callable[[str, str], "bool | None"]

# GSM8K's "#### 1,234": the number after the last "#", with an optional "$", thousands separators and decimals.
_GSM8K_ANSWER_RE = re.compile(r"#\s*\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")


def _number(text: str) -> Fraction | None:
    """A plain number ("1,000", "-2.50", "$18", "18.") as an exact fraction; None for anything else."""
    text = text.strip().removeprefix("$").rstrip(".").replace(",", "").strip()
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_correct(response: str, reference: str) -> bool | None:
    """The number after the response's last ``#`` (``#### 1,000``, ``# $18.00``) against the reference, compared
    as numbers (1000 = 1,000 = 1000.0); None when the response has no such number."""
    found = _GSM8K_ANSWER_RE.findall(response)
    if not found:
        return None
    expected = _number(reference)
    answer = _number(found[-1])
    return answer == expected if expected is not None else found[-1].replace(",", "") == reference.strip()


def math_correct(response: str, reference: str) -> bool | None:
    """MATH style: the response's last ``\\boxed{...}`` against the reference (boxed or not), judged equal by
    math-verify (numbers, fractions, LaTeX forms, sets, intervals: ``1/2`` = ``0.5`` = ``\\frac{1}{2}``). A
    response without ``\\boxed`` has not given its answer in the expected form: None."""
    boxed = last_boxed(response)
    if boxed is None:
        return None
    from math_verify import LatexExtractionConfig, parse, verify

    # math-verify bounds its work with SIGALRM, which only the main thread may set; elsewhere run unbounded.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    answer = parse(boxed, [LatexExtractionConfig(boxed_match_priority=0)], parsing_timeout=timeout)
    if not answer:
        return None
    gold = _parse_reference(reference, timeout)
    if not gold:  # a reference math-verify cannot read: compare its text with the boxed text
        reference_boxed = last_boxed(reference) or f"\\boxed{{{reference}}}"
        return _boxed_content(boxed) == _boxed_content(reference_boxed) or str(answer[-1]).strip() == reference.strip()
    return bool(verify(list(gold), answer, timeout_seconds=timeout))


def _boxed_content(boxed: str) -> str:
    """What a ``\\boxed{...}`` holds, whitespace aside: two spellings of the same text compare equal."""
    return "".join(boxed[len("\\boxed{"):-1].split())


def last_boxed(text: str) -> str | None:
    """The last ``\\boxed{...}`` (or ``\\fbox{...}``) of the text, braces balanced; None when there is none or it
    is left open. Only the last one counts: a response that boxes a draft and then its answer means the answer."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    depth = 0
    for end in range(text.index("{", start), len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return "\\boxed" + text[text.index("{", start):end + 1]  # \\fbox read as \\boxed by math-verify
    return None


_MATH_DELIMITER_RE = re.compile(r"(?<!\\)\$")


@functools.lru_cache(maxsize=4096)
def _parse_reference(reference: str, timeout: int | None) -> tuple:
    """The reference parsed once per prompt (a group's n samples share it)."""
    from math_verify import parse

    # Only an unescaped "$" opens math: "\\$36" (MATH's currency) is a dollar sign inside math, not a delimiter.
    text = last_boxed(reference) or (reference if _MATH_DELIMITER_RE.search(reference) else f"${reference}$")
    return tuple(parse(text, parsing_timeout=timeout) or parse(reference, parsing_timeout=timeout))


# Any number in running text ("12", "-3", "1,000", "2.5"); the sentence's final full stop is not a decimal point.
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def last_number_correct(response: str, reference: str) -> bool | None:
    """The last number anywhere in the response against the reference, as numbers: how a chat model that answers
    in a sentence ("7 plus 5 is 12.") is checked; the ``#### N`` form ends in its number too. None when the
    response has no number."""
    found = _NUMBER_RE.findall(response)
    if not found:
        return None
    expected = _number(reference)
    return _number(found[-1]) == expected if expected is not None else found[-1] == reference.strip()


def exact_correct(response: str, reference: str) -> bool:
    """The whole response, surrounding whitespace aside, equals the reference."""
    return response.strip() == reference.strip()


def regex_verifier(pattern: str) -> Verifier:
    """The last match of ``pattern`` in the response (its first group, if it has groups) equals the reference,
    surrounding whitespace aside; None when nothing matches."""
    compiled = re.compile(pattern)

    def regex_correct(response: str, reference: str) -> bool | None:
        matches = list(compiled.finditer(response))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if compiled.groups else last.group(0)).strip() == reference.strip()

    return regex_correct


def _final_number_verifier(response: str, reference: str) -> bool | None:
    try:
        int(reference)
    except ValueError:
        return False  # a reference that is not an integer can never be matched by this verifier
    return final_number_correct(response, reference)


# ``task.verifier`` names one: a factory taking ``task.answer_regex`` (used by ``regex`` alone). A new verifier is
# a function of (response, reference) plus one entry here.
VERIFIERS: Registry[Callable[[str | None], Verifier]] = Registry("verifier")
VERIFIERS.register("final_number", lambda answer_regex: _final_number_verifier)
VERIFIERS.register("gsm8k", lambda answer_regex: gsm8k_correct)
VERIFIERS.register("last_number", lambda answer_regex: last_number_correct)
VERIFIERS.register("math", lambda answer_regex: math_correct)
VERIFIERS.register("exact", lambda answer_regex: exact_correct)
VERIFIERS.register("regex", lambda answer_regex: regex_verifier(answer_regex))


def make_verifier(name: str = "final_number", answer_regex: str | None = None) -> Verifier:
    """The verifier ``task.verifier`` names (``regex`` with ``task.answer_regex``)."""
    if name == "regex" and not answer_regex:
        raise ValueError("verifier regex needs task.answer_regex")
    if name not in VERIFIERS:
        raise ValueError(VERIFIERS.unknown(name))
    return _outside_think(VERIFIERS[name](answer_regex))


def verdict_figures(verifier: Verifier, responses: list[str], references: list[str]) -> list[dict]:
    """``correct`` (1.0/0.0) and ``answered`` per response: what held-out evaluation counts."""
    verdicts = [verifier(r, ref) for r, ref in zip(responses, references, strict=True)]
    return [{"correct": float(bool(v)), "answered": float(v is not None)} for v in verdicts]


def _outside_think(verifier: Verifier) -> Verifier:
    """Check only the answer outside ``<think>`` blocks: what the model tried while thinking is not its answer."""
    return lambda response, reference: verifier(answer_text(response), reference)
