"""Prompt sources for RL and evaluation: the synthetic arithmetic task, prompt datasets read with ``datasets``
(JSONL, JSON, Parquet, CSV files, or a ``save_to_disk`` directory), or a ``datasets.Dataset`` passed in from Python.

All give ``PromptRow``s: the prompt text, the reference answer the verifier checks against, and a difficulty
bin for per-difficulty figures (the arithmetic level; a field of the file; or none). ``load_rows`` also splits
train from held-out prompts (by split name or by fraction), shuffles by seed, renders dataset prompts with the chat
template (rlhf/core/data/chat.py) and drops, with a count, those longer than ``task.max_prompt_tokens``.

A bad row (not JSON, not UTF-8, a missing field, empty text, a wrong type) is skipped and counted, with the first
few shown in one log line; a source left with no usable row stops the run with a ``DatasetError`` naming the
first problem (typically a wrong ``task.*_field`` name, which every row then lacks).
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from rlhf.core.data.chat import ChatFormatError, make_renderer, prompt_conversation
from rlhf.core.config.run_config import TaskConfig
from rlhf.core.tasks import arithmetic


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
    system: str | None = None  # the system prompt rendered with it (task.system_field or task.system_prompt)
    # A chat row (prompt_field holds OpenAI-format messages): the conversation up to its last user turn, which is
    # the one answered (``prompt`` is that turn's text); earlier turns are context.
    messages: tuple | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict:
        """What a custom reward function sees for this prompt: its source record, or (for the arithmetic task)
        ``prompt``, ``answer`` and ``difficulty``."""
        if self.record is not None:
            return dict(self.record)
        return {"prompt": self.prompt, "answer": self.answer, "difficulty": self.difficulty}


def arithmetic_rows(n: int, seed: int) -> list[PromptRow]:
    return [PromptRow(p.prompt, str(p.answer), p.level) for p in arithmetic.make_problems(n, seed)]


def load_jsonl_rows(path: str | Path, prompt_field: str, answer_field: str, difficulty_field: str | None = None,
                    system_field: str | None = None, log: Callable[[str], None] | None = print,
                    counts: dict | None = None) -> list[PromptRow]:
    """Rows of a JSON-lines file; bad lines are skipped and reported with their line numbers (see the module), and
    counted in ``counts`` (``usable_rows``)."""
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
            rows.append(_row(record, where, prompt_field, answer_field, difficulty_field, system_field))
        except UnicodeDecodeError as err:
            problems.append(f"{where} is not UTF-8 text (byte {err.start}): re-encode the file as UTF-8")
        except json.JSONDecodeError as err:
            problems.append(f"{where} is not valid JSON ({err.msg})")
        except DatasetError as err:
            problems.append(str(err))
    return usable_rows(rows, problems, str(path), log, counts=counts)


def dataset_rows(dataset, prompt_field: str, answer_field: str, difficulty_field: str | None = None,
                 name: str = "dataset", system_field: str | None = None,
                 log: Callable[[str], None] | None = print, counts: dict | None = None) -> list[PromptRow]:
    """Rows of a ``datasets.Dataset`` (columns named by the ``task.*_field`` settings); bad rows are skipped,
    reported with their index and counted, as for JSONL files. ``name`` is how messages refer to the dataset."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        hint = ": pass one split, e.g. dataset['train']" if isinstance(dataset, datasets.DatasetDict) else ""
        raise DatasetError(f"{name} must be a datasets.Dataset, not a {type(dataset).__name__}{hint}")
    rows, problems = [], []
    for i, record in enumerate(dataset):
        try:
            rows.append(_row(record, f"{name}[{i}]", prompt_field, answer_field, difficulty_field, system_field))
        except DatasetError as err:
            problems.append(str(err))
    return usable_rows(rows, problems, name, log, counts=counts)


def usable_rows(rows: list, problems: list[str], name: str, log: Callable[[str], None] | None,
                shown: int = 3, counts: dict | None = None) -> list:
    """``rows`` when there are any, after one log line counting the skipped ones (``problems``, one line each,
    the first ``shown`` quoted; their number also added to ``counts["skipped"]``); a DatasetError naming the first
    problem when none is left."""
    if counts is not None:
        counts["skipped"] = counts.get("skipped", 0) + len(problems)
    if not rows:
        if problems:
            raise DatasetError(f"{name} has no usable rows ({len(problems)} skipped); the first: {problems[0]}")
        raise DatasetError(f"{name} holds no rows")
    if problems and log is not None:
        more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
        log(f"warning: skipped {len(problems)} of {len(rows) + len(problems)} rows of {name}: "
            f"{'; '.join(problems[:shown])}{more}")
    return rows


def _row(record: dict, where: str, prompt_field: str, answer_field: str, difficulty_field: str | None,
         system_field: str | None = None) -> PromptRow:
    for name in (prompt_field, answer_field) + tuple(f for f in (difficulty_field, system_field) if f):
        if name not in record:
            raise DatasetError(f"{where} has no field {name!r} (fields: {', '.join(sorted(record)) or 'none'}); "
                               f"set task.{_field_key(name, prompt_field, answer_field, difficulty_field)} to the "
                               f"right name")
    prompt, answer = record[prompt_field], record[answer_field]
    messages = None
    if isinstance(prompt, (list, tuple)):  # a chat row: OpenAI-format messages
        try:
            messages = tuple(prompt_conversation(prompt))
        except ChatFormatError as err:
            raise DatasetError(f"{where}: field {prompt_field!r} {err}") from None
        prompt = messages[-1]["content"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DatasetError(f"{where}: field {prompt_field!r} must be non-empty text or a list of chat messages")
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise DatasetError(f"{where}: field {answer_field!r} must be text or a number")
    difficulty = None
    if difficulty_field:
        difficulty = record[difficulty_field]
        if not isinstance(difficulty, int) or isinstance(difficulty, bool):
            raise DatasetError(f"{where}: field {difficulty_field!r} must be an integer")
    system = None
    if system_field:
        system = record[system_field]
        if system is not None and not isinstance(system, str):
            raise DatasetError(f"{where}: field {system_field!r} must be text (or null for none)")
    return PromptRow(prompt, final_answer(str(answer)), difficulty, record, system or None, messages)


def _field_key(name: str, prompt_field: str, answer_field: str, difficulty_field: str | None) -> str:
    return ("prompt_field" if name == prompt_field else "answer_field" if name == answer_field
            else "difficulty_field" if name == difficulty_field else "system_field")


def final_answer(answer: str) -> str:
    """GSM8K-style answers end in ``#### N`` after the worked solution: the reference is N."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "") if "####" in answer else answer.strip()


def worked_solution(row: PromptRow, answer_field: str) -> str | None:
    """The row's worked solution: its record's answer text where that holds more than the final answer (GSM8K's
    steps before ``#### N``); None for bare answers and rows without a record (the arithmetic task)."""
    text = (row.record or {}).get(answer_field)
    return text if isinstance(text, str) and final_answer(text) != text.strip() else None


# File suffix -> the ``datasets`` builder that reads it (prompt JSONL files have their own reader above: its errors
# name the line).
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_file_rows(path: str | Path, split: str | None, cfg: TaskConfig,
                   log: Callable[[str], None] | None = print, counts: dict | None = None) -> list[PromptRow]:
    """The rows of a prompt file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``) or of a ``save_to_disk``
    directory (a Dataset, or one ``split`` of a DatasetDict), fields named by ``cfg``."""
    path = Path(path)
    fields = dict(prompt_field=cfg.prompt_field, answer_field=cfg.answer_field,
                  difficulty_field=cfg.difficulty_field, system_field=cfg.system_field)
    if path.suffix == ".jsonl" and not path.is_dir():
        return load_jsonl_rows(path, **fields, log=log, counts=counts)
    dataset = open_dataset(path, split, "task.train_split / task.eval_split")
    return dataset_rows(dataset, **fields, name=str(path), log=log, counts=counts)


def open_dataset(path: str | Path, split: str | None = None, split_key: str = "the split"):
    """A ``datasets.Dataset`` from a ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file or a ``save_to_disk``
    directory (one ``split`` of a DatasetDict; ``split_key`` names the setting that picks it)."""
    import datasets

    path = Path(path)
    if path.is_dir():
        try:
            dataset = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise DatasetError(f"{path} is not a directory written by save_to_disk "
                               f"({' '.join(str(err).split())[:150]})") from None
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DatasetError(f"{path} has no split {split!r} (splits: {', '.join(dataset)}); set "
                                   f"{split_key} to one of them")
            dataset = dataset[split]
    elif not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    elif path.suffix not in _BUILDERS:
        raise DatasetError(f"{path}: unknown dataset format {path.suffix or '(no suffix)'!r}: use .jsonl, .json, "
                           f".parquet, .csv or a save_to_disk directory")
    else:
        try:
            with _quiet_logger("datasets"):  # it logs the reader's error itself; ours is the one line below
                return datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path), split="train")
        except Exception as err:  # noqa: BLE001 - the library's reasons vary by format; one line names the file
            root, kind = _root_cause(err), _BUILDERS[path.suffix]
            header = " with a header row naming its columns" if kind == "csv" else ""
            raise DatasetError(f"cannot read {path} as {kind} ({type(root).__name__}: "
                               f"{' '.join(str(root).split())[:200] or 'no detail'}): check that it is {kind}"
                               f"{header}") from None
    return dataset


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _root_cause(err: BaseException) -> BaseException:
    """``datasets`` wraps the reader's error ("An error occurred while generating the dataset"): the innermost
    one says what is wrong with the file (a line with too many fields, bytes that are not text)."""
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        err = inner
    return err


def load_rows(cfg: TaskConfig, seed: int, train_dataset=None, eval_dataset=None, tokenizer=None,
              log: Callable[[str], None] | None = None, stats: dict | None = None
              ) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train rows, held-out eval rows): each from the ``datasets.Dataset`` passed in for it, else from the
    configured task; ``task.train_prompts`` and ``task.eval_prompts`` cap both.

    Dataset prompts: held out by ``task.eval_fraction`` when no eval file or split is named; the training pool
    shuffled by ``seed`` (``task.shuffle``) before the cap (held-out prompts keep their order, so figures compare
    across seeds); with a ``tokenizer``, rendered by the chat template and, past ``task.max_prompt_tokens``,
    dropped: counted in ``stats`` and reported through ``log`` with the first few examples."""
    fields = (cfg.prompt_field, cfg.answer_field, cfg.difficulty_field)
    stats = {} if stats is None else stats
    skipped: dict[str, dict] = {"train": {}, "eval": {}}  # bad rows per pool (a fraction held out: in train's)

    def given(dataset, name: str, which: str) -> list[PromptRow]:
        return dataset_rows(dataset, *fields, name=name, system_field=cfg.system_field, log=log,
                            counts=skipped[which])

    # Each pool: (rows, from a dataset?). Arithmetic prompts stay as they are: the warm-up trains on them plain.
    if train_dataset is not None:
        train = (given(train_dataset, "train_dataset", "train"), True)
    elif cfg.name == "arithmetic":
        train = (arithmetic_rows(cfg.train_prompts, seed + 1), False)
    else:
        train = (load_file_rows(cfg.train_file, cfg.train_split, cfg, log, skipped["train"]), True)
    if eval_dataset is not None:
        held_out = (given(eval_dataset, "eval_dataset", "eval"), True)
    elif cfg.name == "arithmetic":
        held_out = (arithmetic_rows(cfg.eval_prompts, seed + 2), False)
    elif cfg.eval_file or cfg.eval_split:
        held_out = (load_file_rows(cfg.eval_file or cfg.train_file, cfg.eval_split or "train", cfg, log,
                                   skipped["eval"]), True)
    else:
        rows, held = split_by_fraction(train[0], cfg.eval_fraction, seed)
        train, held_out = (rows, True), (held, True)
    if cfg.shuffle and train[1]:
        random.Random(seed).shuffle(train[0])
    render = make_renderer(cfg, tokenizer) if tokenizer is not None else None
    pools = []
    for which, (rows, from_dataset) in (("train", train), ("eval", held_out)):
        cap = cfg.train_prompts if which == "train" else cfg.eval_prompts
        if from_dataset and render is not None:
            rows = _prepare(rows, which, cfg, render, tokenizer, cap, log, stats)
        pools.append(rows[:cap])
    stats.update(train_prompts=len(pools[0]), eval_prompts=len(pools[1]),
                 train_skipped_bad=skipped["train"].get("skipped", 0),
                 eval_skipped_bad=skipped["eval"].get("skipped", 0))
    return pools[0], pools[1]


def split_by_fraction(rows: list[PromptRow], fraction: float, seed: int) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train, held out): ``fraction`` of the rows, drawn by ``seed``, held out; both keep the file's order."""
    held = max(1, round(len(rows) * fraction))
    if held >= len(rows):
        raise DatasetError(f"task.eval_fraction={fraction} of {len(rows)} rows leaves no training prompts")
    chosen = set(random.Random(seed).sample(range(len(rows)), held))
    return ([r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen])


def _prepare(rows: list[PromptRow], which: str, cfg: TaskConfig, render, tokenizer, cap: int, log, stats: dict
             ) -> list[PromptRow]:
    """Up to ``cap`` rows with their prompt rendered (system prompt included), those over the token budget dropped.
    Rows are rendered and counted a chunk at a time until ``cap`` are kept: a 1M-row file capped at 2,000 prompts
    costs 2,000 renders, not a million; the report says how many rows were examined."""
    kept, dropped, examined = [], [], 0
    chunk = min(512, max(64, cap + cap // 4))  # a little over the cap: most of a chunk fits the budget
    for start in range(0, len(rows), chunk):
        if len(kept) >= cap:
            break
        part = rows[start:start + chunk]
        texts = render([r.prompt for r in part], [r.system or cfg.system_prompt for r in part],
                       [r.messages for r in part])
        examined += len(part)
        lengths = ([len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
                   if cfg.max_prompt_tokens else [0] * len(part))
        for i, (row, text, n) in enumerate(zip(part, texts, lengths)):
            if cfg.max_prompt_tokens and n > cfg.max_prompt_tokens:
                dropped.append((start + i, n))
            else:
                kept.append(replace(row, prompt=text, messages=None))
    if not cfg.max_prompt_tokens:
        return kept
    stats[f"{which}_dropped_too_long"] = len(dropped)
    if log is not None:
        examples = "; ".join(f"#{i} ({n} tokens): {_excerpt(rows[i].record, rows[i].prompt, cfg.prompt_field)}"
                             for i, n in dropped[:3])
        log(f"data: dropped {len(dropped)} of {examined} {which} prompts examined ({len(rows)} in all) longer than "
            f"task.max_prompt_tokens={cfg.max_prompt_tokens} tokens (chat template included)"
            + (f", e.g. {examples}" if dropped else ""))
    if not kept:
        raise DatasetError(f"every {which} prompt is longer than task.max_prompt_tokens={cfg.max_prompt_tokens} "
                           f"tokens (the shortest has {min(n for _, n in dropped)}): raise it")
    return kept


def _excerpt(record: dict | None, prompt: str, prompt_field: str, width: int = 60) -> str:
    text = " ".join(str(record[prompt_field] if record else prompt).split())
    return repr(text if len(text) <= width else text[:width] + "...")
