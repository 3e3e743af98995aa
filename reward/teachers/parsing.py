"""Reading a judge's verdict out of free text: ``parse_verdict``.

LLM judges do not always follow the format asked for. In order of trust, this accepts: a JSON object anywhere in
the text (inside a code fence, after a preamble, nested one level down), then ``key: value`` patterns such as
``quality: 7``, ``Quality = 7/9``, ``**RV**: 3`` or ``Reasoning verbosity (0-9): 3``, case-insensitive. Scores are
clamped to 0-9; a score out of another maximum (``8/10``) is rescaled to 0-9.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from reward.teachers.base import CORRECT_THRESHOLD, SCORE_MAX, clamp_score

# Accepted spellings of each field; JSON keys are compared lower-cased with spaces and hyphens as underscores.
_JSON_KEYS = {
    "quality": ("quality", "quality_score", "overall_quality", "overall", "score", "rating"),
    "rv": ("rv", "reasoning_verbosity", "verbosity", "rv_score"),
    "cd": ("cd", "cognitive_difficulty", "difficulty", "cd_score"),
    "correct": ("correct", "is_correct", "correctness"),
}
# In free text a bare "score" is too ambiguous ("RV score: 3"), so only these names count.
_TEXT_KEYS = {
    "quality": r"overall\s+quality|quality",
    "rv": r"reasoning[\s_-]+verbosity|rv",
    "cd": r"cognitive[\s_-]+difficulty|cd",
}
# Between a name and its value: markdown emphasis, quotes, an optional "(RV)" / "(0-9)" / "score", then : or =.
_FILLER = r"""[\s*_"'`]*(?:\(\s*(?:[a-z]{2}|0\s*[-–]\s*9)\s*\)\s*)?(?:score\s*)?[*_"'`]*\s*[:=]\s*[*_"'`]*\s*"""
_NUMBER = r"(\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?(?!\s*[-–]\s*\d)"  # "7", "7.5", "7/9"; not a range "0-9"
_TEXT_PATTERNS = {name: re.compile(rf"\b(?:{names}){_FILLER}{_NUMBER}", re.IGNORECASE)
                  for name, names in _TEXT_KEYS.items()}
_CORRECT_PATTERN = re.compile(rf"\b(?:is[\s_]+)?correct(?:ness)?{_FILLER}(true|false|yes|no)\b", re.IGNORECASE)
_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "correct", "1"), ("false", "no", "incorrect", "wrong", "0")


def parse_verdict(text: str) -> dict[str, Any]:
    """``{"quality", "rv", "cd": float | None, "correct": bool | None}`` from a judge's reply.

    ``correct`` falls back to quality >= 5 when the reply does not say. Raises ``ValueError`` (one line) when the
    reply holds no score at all.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty judge reply")
    found = _from_json(text) or _from_patterns(text)
    if not found or all(found.get(k) is None for k in ("quality", "rv", "cd")):
        raise ValueError("no quality/rv/cd score found in the judge reply")
    verdict = {k: found.get(k) for k in ("quality", "rv", "cd", "correct")}
    if verdict["correct"] is None and verdict["quality"] is not None:
        verdict["correct"] = verdict["quality"] >= CORRECT_THRESHOLD
    return verdict


def _from_json(text: str) -> dict[str, Any] | None:
    """The first JSON object in the text that names at least one score."""
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        fields = _fields_of(obj)
        if fields:
            return fields
    return None


def _fields_of(obj: Any, depth: int = 0) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    keys = {str(k).strip().lower().replace(" ", "_").replace("-", "_"): v for k, v in obj.items()}
    fields: dict[str, Any] = {}
    for name, aliases in _JSON_KEYS.items():
        for alias in aliases:
            if alias in keys:
                value = _as_bool(keys[alias]) if name == "correct" else _as_score(keys[alias])
                if value is not None:
                    fields[name] = value
                    break
    if any(fields.get(k) is not None for k in ("quality", "rv", "cd")):
        return fields
    if depth < 2:  # {"verdict": {"quality": 7, ...}}
        for value in obj.values():
            nested = _fields_of(value, depth + 1)
            if nested:
                return nested
    return None


def _from_patterns(text: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, pattern in _TEXT_PATTERNS.items():
        matches = pattern.findall(text)
        if matches:
            value, scale = matches[-1]  # the last mention: judges tend to restate the rubric before answering
            fields[name] = _scaled(float(value), float(scale) if scale else None)
    correct = _CORRECT_PATTERN.findall(text)
    if correct:
        fields["correct"] = _as_bool(correct[-1])
    return fields


def _as_score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return clamp_score(value) if math.isfinite(value) else None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*" + _NUMBER + r"\s*", value)
        if match:
            return _scaled(float(match.group(1)), float(match.group(2)) if match.group(2) else None)
    return None


def _scaled(value: float, out_of: float | None) -> float:
    if out_of and out_of != SCORE_MAX:
        value = value / out_of * SCORE_MAX
    return clamp_score(value)


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    return None
