"""Prompt sources for RL and evaluation: the synthetic arithmetic task, or prompts from a JSONL file.

Both give ``PromptRow``s: the prompt text, the reference answer the verifier checks against, and a difficulty
bin for per-difficulty figures (the arithmetic level; a field of the file; or none).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import TaskConfig
from rlhf.tasks import arithmetic


class DatasetError(ValueError):
    """A dataset that cannot be used, with a one-line message naming the file, row and field."""


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    answer: str
    difficulty: int | None = None


def arithmetic_rows(n: int, seed: int) -> list[PromptRow]:
    return [PromptRow(p.prompt, str(p.answer), p.level) for p in arithmetic.make_problems(n, seed)]


def load_jsonl_rows(path: str | Path, prompt_field: str, answer_field: str,
                    difficulty_field: str | None = None) -> list[PromptRow]:
    """Rows of a JSON-lines file; any bad row stops the load with its line number and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    raw = path.read_bytes()
    try:
        # Split on "\n" only: str.splitlines() also breaks at U+2028, U+0085, \x1c..., which JSON allows raw in strings.
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DatasetError(f"{path} line {line} is not UTF-8 text (byte {err.start}): re-encode it as UTF-8") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{where} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{where} is a JSON {type(record).__name__}, not an object with fields")
        for field in (prompt_field, answer_field) + ((difficulty_field,) if difficulty_field else ()):
            if field not in record:
                raise DatasetError(f"{where} has no field {field!r} (fields: {', '.join(sorted(record)) or 'none'}); "
                                   f"set task.{_field_key(field, prompt_field, answer_field)} to the right name")
        prompt, answer = record[prompt_field], record[answer_field]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{where}: field {prompt_field!r} must be non-empty text")
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise DatasetError(f"{where}: field {answer_field!r} must be text or a number")
        difficulty = None
        if difficulty_field:
            difficulty = record[difficulty_field]
            if not isinstance(difficulty, int) or isinstance(difficulty, bool):
                raise DatasetError(f"{where}: field {difficulty_field!r} must be an integer")
        rows.append(PromptRow(prompt, _final_answer(str(answer)), difficulty))
    if not rows:
        raise DatasetError(f"{path} holds no rows")
    return rows


def _field_key(field: str, prompt_field: str, answer_field: str) -> str:
    return "prompt_field" if field == prompt_field else "answer_field" if field == answer_field else "difficulty_field"


def _final_answer(answer: str) -> str:
    """GSM8K-style answers end in ``#### N`` after the worked solution: the reference is N."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "") if "####" in answer else answer.strip()


def load_rows(cfg: TaskConfig, seed: int) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train rows, held-out eval rows) for the configured task."""
    if cfg.name == "arithmetic":
        return arithmetic_rows(cfg.train_prompts, seed + 1), arithmetic_rows(cfg.eval_prompts, seed + 2)
    fields = (cfg.prompt_field, cfg.answer_field, cfg.difficulty_field)
    train = load_jsonl_rows(cfg.train_file, *fields)[: cfg.train_prompts]
    held_out = load_jsonl_rows(cfg.eval_file, *fields)[: cfg.eval_prompts]
    return train, held_out
