"""Labelling: the teacher judges student samples (and its own solutions), giving the distilled RM's training data.

Two datasets come out, written with the ``datasets`` library (``save_to_disk``):
  pointwise: prompt, response, quality, correct, rv, cd, difficulty, and soft labels where the teacher gave them;
  pairwise:  prompt, chosen, rejected, margin (teacher quality difference / 9) and both sides' targets.

The job is resumable: judged rows are appended to ``rows.jsonl`` chunk by chunk (with the prompts they cover), so an
interrupted run skips what is already judged. Rows the teacher could not judge are counted and reported, not fatal.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rlhf.core.data.datasets import PromptRow
from rlhf.core.progress import Progress

# A response's text for the teacher, and the optional teacher-written solutions added beside student samples.
SampleFn = Callable[[list[str], int], list[list[str]]]
SolveFn = Callable[[PromptRow], list[str]]

SCORE_FIELDS = ("quality", "rv", "cd")


@dataclass
class LabelReport:
    prompts: int = 0
    judged: int = 0
    failed: int = 0
    resumed_prompts: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        worst = ", ".join(f"{n} x {e}" for e, n in sorted(self.errors.items(), key=lambda kv: -kv[1])[:3])
        return (f"labelled {self.prompts} prompts: {self.judged} responses judged, {self.failed} failed"
                + (f" ({worst})" if worst else "") + (f"; {self.resumed_prompts} prompts resumed from disk"
                                                      if self.resumed_prompts else ""))


class TeacherError(RuntimeError):
    """The teacher cannot judge at all (every row of a first batch failed); the message says how."""


def label(rows: list[PromptRow], sample: SampleFn, teacher, out_dir: str | Path, samples_per_prompt: int,
          solve: SolveFn | None = None, chunk_prompts: int = 64, log: Callable[[str], None] = print,
          reference_of: Callable[[PromptRow], str] | None = None) -> LabelReport:
    """Judge ``samples_per_prompt`` student samples per prompt (plus the teacher's own solutions when ``solve``
    is given); append the judged rows to ``out_dir/rows.jsonl``; return counts. Safe to call again after a crash.
    The teacher sees ``reference_of(row)`` as the reference (default the answer; e.g. a worked solution)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.jsonl"
    done = _done_prompts(rows_file)
    report = LabelReport(prompts=len(rows))
    todo = [r for r in rows if r.prompt not in done]
    report.resumed_prompts = len(rows) - len(todo)
    progress = Progress(len(rows), f"labelling {out.name}", "prompt", log)
    if report.resumed_prompts:
        progress.update(report.resumed_prompts)
    for start in range(0, len(todo), chunk_prompts):
        chunk = todo[start:start + chunk_prompts]
        responses = sample([r.prompt for r in chunk], samples_per_prompt)
        items = []
        for row, row_responses in zip(chunk, responses, strict=True):
            extra = solve(row) if solve else []
            items += [(row, text, "student") for text in row_responses] + [(row, text, "teacher") for text in extra]
        verdicts = teacher.judge([r.prompt for r, _, _ in items], [t for _, t, _ in items],
                                 [reference_of(r) if reference_of else r.answer for r, _, _ in items])
        if start == 0 and items and all(v.error for v in verdicts):
            # A teacher that fails every row (endpoint down, wrong model name, replies it cannot parse) would
            # otherwise mark every prompt done with nothing judged; stop before writing anything.
            errors: dict[str, int] = {}
            for v in verdicts:
                errors[v.error] = errors.get(v.error, 0) + 1
            worst, count = max(errors.items(), key=lambda kv: kv[1])
            raise TeacherError(f"the teacher judged none of the first {len(items)} responses ({count} x {worst}): "
                               f"check the label.* settings and the judge")
        lines = []
        for (row, text, source), verdict in zip(items, verdicts, strict=True):
            if verdict.error:
                report.failed += 1
                report.errors[verdict.error] = report.errors.get(verdict.error, 0) + 1
                continue
            report.judged += 1
            lines.append(json.dumps(judged_row(row, text, source, verdict)))
        # The chunk's prompts are recorded with its rows in one append: a crash mid-write loses at most this chunk.
        lines.append(json.dumps({"done_prompts": [r.prompt for r in chunk]}))
        with open(rows_file, "a") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        progress.update(len(chunk), judged=report.judged, failed=report.failed)
    progress.close()
    log(report.line())
    return report


def judged_row(row: PromptRow, text: str, source: str, verdict) -> dict:
    """One judged response as ``rows.jsonl`` holds it (and ``make_pairs`` reads it): the prompt and its reference
    answer, the response, who wrote it (``student``/``teacher``), and the teacher's verdict."""
    return {"prompt": row.prompt, "reference": row.answer, "response": text, "source": source,
            "difficulty": row.difficulty,
            "quality": verdict.quality, "correct": verdict.correct, "rv": verdict.rv, "cd": verdict.cd,
            "quality_probs": verdict.quality_probs, "rv_probs": verdict.rv_probs, "cd_probs": verdict.cd_probs}


def _done_prompts(rows_file: Path) -> set[str]:
    done: set[str] = set()
    if rows_file.exists():
        for record in _read_jsonl(rows_file):
            done.update(record.get("done_prompts", ()))
    return done


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a crash: everything after it is untrusted
    return records


def judged_rows(out_dir: str | Path) -> list[dict]:
    """The judged rows of a labelling directory, only from chunks that were completely written."""
    rows, pending = [], []
    for record in _read_jsonl(Path(out_dir) / "rows.jsonl"):
        if "done_prompts" in record:
            rows += pending
            pending = []
        else:
            pending.append(record)
    return rows


def make_pairs(rows: list[dict], seed: int, max_pairs_per_prompt: int = 8) -> list[dict]:
    """Pairs of responses to the same prompt whose teacher quality differs: the better one is chosen."""
    rng = random.Random(seed)
    by_prompt: dict[str, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt"], []).append(row)
    pairs = []
    for prompt, group in by_prompt.items():
        candidates = [(a, b) for i, a in enumerate(group) for b in group[i + 1:]
                      if a["quality"] != b["quality"] and a["response"] != b["response"]]
        rng.shuffle(candidates)
        for a, b in candidates[:max_pairs_per_prompt]:
            chosen, rejected = (a, b) if a["quality"] > b["quality"] else (b, a)
            pair = {"prompt": prompt, "reference": chosen.get("reference"), "chosen": chosen["response"],
                    "rejected": rejected["response"],
                    "margin": (chosen["quality"] - rejected["quality"]) / 9.0, "difficulty": chosen["difficulty"]}
            for side, row in (("chosen", chosen), ("rejected", rejected)):
                for name in SCORE_FIELDS:
                    pair[f"{side}_{name}"] = row[name]
                    pair[f"{side}_{name}_probs"] = row[f"{name}_probs"]
                pair[f"{side}_correct"] = row["correct"]
            pairs.append(pair)
    return pairs


def write_datasets(out_dir: str | Path, seed: int) -> dict[str, int]:
    """Write ``pointwise/`` and ``pairwise/`` with ``datasets`` from the judged rows; returns their sizes."""
    from datasets import Dataset

    out = Path(out_dir)
    rows = judged_rows(out)
    pairs = make_pairs(rows, seed)
    for name, records in (("pointwise", rows), ("pairwise", pairs)):
        if records:
            Dataset.from_list(records).save_to_disk(str(out / name))
    return {"pointwise": len(rows), "pairwise": len(pairs)}

