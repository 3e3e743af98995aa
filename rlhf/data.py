"""Prompt sources for RL and evaluation: the synthetic arithmetic task, prompts from a JSONL file, or a
``datasets.Dataset`` passed in from Python.

All give ``PromptRow``s: the prompt text, the reference answer the verifier checks against, and a difficulty
bin for per-difficulty figures (the arithmetic level; a field of the file; or none).

A bad row (not JSON, not UTF-8, a missing field, empty text, a wrong type) is skipped and counted, with the first
few shown in one log line; a source left with no usable row stops the run with a ``DatasetError`` naming the
first problem (typically a wrong ``task.*_field`` name, which every row then lacks).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rlhf.config import TaskConfig
from rlhf.tasks import arithmetic


class DatasetError(ValueError):
    """A dataset that cannot be used, with a one-line message naming the file, row and field."""


@dataclass(frozen=True)
class PromptRow:
    """One prompt: its text, the reference answer, an optional difficulty bin, and the record it came from."""

    prompt: str
    answer: str
    difficulty: int | None = None
    # All fields of the source line or dataset row, for a custom reward function that needs more than the answer.
    record: dict | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict:
        """What a custom reward function sees for this prompt: its source record, or (for the arithmetic task)
        ``prompt``, ``answer`` and ``difficulty``."""
        if self.record is not None:
            return dict(self.record)
        return {"prompt": self.prompt, "answer": self.answer, "difficulty": self.difficulty}


def arithmetic_rows(n: int, seed: int) -> list[PromptRow]:
    return [PromptRow(p.prompt, str(p.answer), p.level) for p in arithmetic.make_problems(n, seed)]


def load_jsonl_rows(path: str | Path, prompt_field: str, answer_field: str, difficulty_field: str | None = None,
                    log: Callable[[str], None] = print) -> list[PromptRow]:
    """Rows of a JSON-lines file; bad lines are skipped and reported with their line numbers (see the module)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    rows, problems = [], []
    # Split the bytes on "\n" only: str.splitlines() also breaks at U+2028, U+0085, \x1c..., which JSON allows raw
    # in strings; and decoding line by line lets one badly encoded line cost only itself.
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise DatasetError(f"{where} is a JSON {type(record).__name__}, not an object with fields")
            rows.append(_row(record, where, prompt_field, answer_field, difficulty_field))
        except UnicodeDecodeError as err:
            problems.append(f"{where} is not UTF-8 text (byte {err.start}): re-encode the file as UTF-8")
        except json.JSONDecodeError as err:
            problems.append(f"{where} is not valid JSON ({err.msg})")
        except DatasetError as err:
            problems.append(str(err))
    return usable_rows(rows, problems, str(path), log)


def dataset_rows(dataset, prompt_field: str, answer_field: str, difficulty_field: str | None = None,
                 name: str = "dataset", log: Callable[[str], None] = print) -> list[PromptRow]:
    """Rows of a ``datasets.Dataset`` (columns named by the ``task.*_field`` settings); bad rows are skipped and
    reported with their index, as for JSONL files. ``name`` is how messages refer to the dataset."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        hint = ": pass one split, e.g. dataset['train']" if isinstance(dataset, datasets.DatasetDict) else ""
        raise DatasetError(f"{name} must be a datasets.Dataset, not a {type(dataset).__name__}{hint}")
    rows, problems = [], []
    for i, record in enumerate(dataset):
        try:
            rows.append(_row(record, f"{name}[{i}]", prompt_field, answer_field, difficulty_field))
        except DatasetError as err:
            problems.append(str(err))
    return usable_rows(rows, problems, name, log)


def usable_rows(rows: list, problems: list[str], name: str, log: Callable[[str], None], shown: int = 3) -> list:
    """``rows`` when there are any, after one log line counting the skipped ones (``problems``, one line each,
    the first ``shown`` quoted); a DatasetError naming the first problem when none is left."""
    if not rows:
        if problems:
            raise DatasetError(f"{name} has no usable rows ({len(problems)} skipped); the first: {problems[0]}")
        raise DatasetError(f"{name} holds no rows")
    if problems:
        more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
        log(f"warning: skipped {len(problems)} of {len(rows) + len(problems)} rows of {name}: "
            f"{'; '.join(problems[:shown])}{more}")
    return rows


def _row(record: dict, where: str, prompt_field: str, answer_field: str, difficulty_field: str | None) -> PromptRow:
    for name in (prompt_field, answer_field) + ((difficulty_field,) if difficulty_field else ()):
        if name not in record:
            raise DatasetError(f"{where} has no field {name!r} (fields: {', '.join(sorted(record)) or 'none'}); "
                               f"set task.{_field_key(name, prompt_field, answer_field)} to the right name")
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
    return PromptRow(prompt, _final_answer(str(answer)), difficulty, record)


def _field_key(name: str, prompt_field: str, answer_field: str) -> str:
    return "prompt_field" if name == prompt_field else "answer_field" if name == answer_field else "difficulty_field"


def _final_answer(answer: str) -> str:
    """GSM8K-style answers end in ``#### N`` after the worked solution: the reference is N."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "") if "####" in answer else answer.strip()


def load_rows(cfg: TaskConfig, seed: int, train_dataset=None, eval_dataset=None,
              log: Callable[[str], None] = print) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train rows, held-out eval rows): each from the ``datasets.Dataset`` passed in for it, else from the
    configured task; ``task.train_prompts`` and ``task.eval_prompts`` cap both."""
    fields = (cfg.prompt_field, cfg.answer_field, cfg.difficulty_field)

    def pool(dataset, name: str, file: str | None, size: int, task_seed: int) -> list[PromptRow]:
        if dataset is not None:
            return dataset_rows(dataset, *fields, name=name, log=log)[:size]
        if cfg.name == "arithmetic":
            return arithmetic_rows(size, task_seed)
        return load_jsonl_rows(file, *fields, log=log)[:size]

    return (pool(train_dataset, "train_dataset", cfg.train_file, cfg.train_prompts, seed + 1),
            pool(eval_dataset, "eval_dataset", cfg.eval_file, cfg.eval_prompts, seed + 2))
