"""Teacher traces on your prompts: write, grade, select, save (``distilrl traces``; the ``traces`` stage).

1. Write: the teacher ``traces.teacher`` names writes ``traces.samples_per_prompt`` responses per training prompt
   (reward/teachers/writers.py), or the data's own responses are taken (``dataset``: ``traces.response_field``,
   e.g. GSM8K's worked solutions). HTTP and HF teachers cache every reply in ``traces/cache``: a stopped job
   resumes there. Failed samples are counted, not fatal.
2. Grade: the verifier (``task.verifier``) checks each trace against the prompt's reference; RV and CD come by
   rule or from the label teacher's judgment (``traces.scores``; reward/teachers/trace_select.py).
3. Select: correct traces, then per CD bin the RV/CD curriculum (``traces.curriculum``, ``traces.keep``).
4. Save: a ``datasets`` dataset in ``traces/dataset`` (columns ``prompt``, ``response``, ``messages``: the
   conversation with the teacher's reply as its last turn; ``reference``, ``correct``, ``rv``, ``cd``,
   ``cd_bin``, ``prompt_index``) and ``traces/summary.json`` with the counts and the per-bin summary.
   ``warmup.traces_file`` points the SFT stage at it.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from reward.teachers import make_teacher
from reward.teachers.writers import HFWriter, OpenAIWriter, OracleWriter, with_verbosity
from reward.teachers.trace_select import Trace, cd_bin, rule_scores, select
from reward.scoring.verifiers import make_verifier
from rlhf.core.data.chat import with_system
from rlhf.core.checkpoints.atomic import write_json_atomic
from rlhf.core.config.run_config import ConfigError, RunConfig, TracesConfig
from rlhf.core.data.datasets import DatasetError, PromptRow, worked_solution
from rlhf.core.progress import Progress

DATASET_DIR, SUMMARY_FILE, CACHE_DIR = "dataset", "summary.json", "cache"


def make_writer(cfg: TracesConfig, cache_dir: Path | None):
    """The writing teacher ``cfg.teacher`` names (not ``dataset``: that one writes nothing)."""
    if cfg.teacher == "oracle":
        return OracleWriter(cfg.verbosity)
    if cfg.teacher == "hf":
        if not cfg.model_path:
            raise ConfigError("traces.teacher hf needs traces.model_path (a local Hugging Face model directory)")
        try:
            return HFWriter(cfg.model_path, cache_dir, cfg.temperature, cfg.max_new_tokens)
        except ValueError as err:
            raise ConfigError(f"config key traces.model_path: {err}") from None
    e = cfg.endpoint
    if not (e and e.model):
        raise ConfigError("traces.teacher openai needs traces.endpoint with a url (e.g. http://127.0.0.1:8000/v1) "
                          "and a model")
    try:
        return OpenAIWriter(e.url, e.model, e.api_key_env, e.concurrency, cache_dir, cfg.temperature,
                            cfg.max_new_tokens, e.timeout_s, e.max_retries)
    except ValueError as err:
        raise ConfigError(f"config key traces: {err}") from None


def conversation(row: PromptRow, system_prompt: str | None) -> list[dict]:
    """What the teacher is asked: a chat row's conversation, or the prompt as a user turn; with its system
    prompt (the row's, else ``task.system_prompt``)."""
    messages = list(row.messages) if row.messages else [{"role": "user", "content": row.prompt}]
    return with_system(messages, row.system or system_prompt)


def write_responses(cfg: RunConfig, rows: list[PromptRow], out_dir: Path, log: Callable[[str], None]
                    ) -> tuple[list[list[str | None]], dict]:
    """Per row, its ``samples_per_prompt`` responses (None where one failed), and the writer's counts."""
    t = cfg.traces
    if t.teacher == "dataset":
        missing = next((i for i, r in enumerate(rows) if not isinstance((r.record or {}).get(t.response_field), str)),
                       None)
        if missing is not None:
            raise DatasetError(f"training prompt {missing} has no text field {t.response_field!r} for "
                               f"traces.teacher dataset: set traces.response_field to the column holding responses")
        return [[r.record[t.response_field]] for r in rows], {"requests": 0, "cache_hits": 0, "failed": 0}
    writer = make_writer(t, out_dir / CACHE_DIR)
    conversations = [with_verbosity(conversation(r, cfg.task.system_prompt), t.verbosity) for r in rows]
    progress = Progress(len(rows) * t.samples_per_prompt, "traces", "sample", log)
    responses = writer.write(conversations, t.samples_per_prompt, progress.update)
    progress.close()
    stats = dict(writer.stats)
    stats["failed"] = sum(writer.failures.values())
    if writer.failures:
        reasons = "; ".join(f"{n} x {reason}" for reason, n in writer.failures.most_common(3))
        log(f"traces: {stats['failed']} sample(s) failed, not written: {reasons}")
    return responses, stats


def grade(cfg: RunConfig, rows: list[PromptRow], responses: list[list[str | None]], out_dir: Path
          ) -> tuple[list[Trace], int]:
    """(graded traces, samples a judge could not score): correctness by the verifier where the prompt has a
    reference, RV/CD by rule or by the label teacher."""
    verify = make_verifier(cfg.task.verifier, cfg.task.answer_regex)
    traces = []
    for i, (row, texts) in enumerate(zip(rows, responses, strict=True)):
        for j, text in enumerate(texts):
            if text is None:
                continue
            correct = bool(verify(text, row.answer)) if row.answer.strip() else None
            traces.append(Trace(row.prompt, text, 0.0, 0.0, correct, i))
    if cfg.traces.scores == "rule":
        difficulties = [r.difficulty for r in rows]
        return rule_scores(traces, cfg.traces.chars_per_rv, difficulties, _difficulty_range(cfg)), 0
    teacher = make_teacher(cfg.label, out_dir / CACHE_DIR)
    verdicts = teacher.judge([t.prompt for t in traces], [t.response for t in traces],
                             [worked_solution(rows[t.prompt_index], cfg.task.answer_field)
                              or rows[t.prompt_index].answer or None for t in traces])
    judged = [replace(t, rv=v.rv, cd=v.cd, correct=t.correct if t.correct is not None else v.correct)
              for t, v in zip(traces, verdicts) if v.error is None and v.rv is not None and v.cd is not None]
    return judged, len(traces) - len(judged)


def _difficulty_range(cfg: RunConfig) -> tuple[float, float] | None:
    if not cfg.task.difficulty_field:
        return None
    if cfg.traces.difficulty_range is None:
        raise ConfigError("traces.scores rule with task.difficulty_field needs traces.difficulty_range "
                          "(the field's easiest and hardest values, mapped to CD 0 and 9)")
    return cfg.traces.difficulty_range


def build_traces(cfg: RunConfig, rows: list[PromptRow], out_dir: str | Path,
                 log: Callable[[str], None] = print) -> dict:
    """Write, grade, select and save traces for ``rows`` (raw prompts: not rendered by a template) into
    ``out_dir``; returns the summary (also ``out_dir/summary.json``)."""
    import datasets

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    t, adaptive = cfg.traces, cfg.reward.adaptive
    rows = rows[:t.prompts]
    responses, stats = write_responses(cfg, rows, out_dir, log)
    traces, unjudged = grade(cfg, rows, responses, out_dir)
    kept, bins = select(traces, t.curriculum, t.keep, t.keep_unverified, adaptive.rv_at_cd0, adaptive.rv_at_cd9)
    if not kept:
        raise DatasetError(f"no trace kept of {len(traces)} written ({sum(x.correct is True for x in traces)} "
                           f"correct): check the teacher and task.verifier")
    records = [_record(cfg, rows[x.prompt_index], x) for x in kept]
    datasets.Dataset.from_list(records).save_to_disk(str(out_dir / DATASET_DIR))
    summary = {"prompts": len(rows), "samples": len(rows) * (1 if t.teacher == "dataset" else t.samples_per_prompt),
               "written": len(traces) + unjudged, "unjudged": unjudged,
               "correct": sum(x.correct is True for x in traces), "kept": len(kept), "teacher": t.teacher,
               "curriculum": t.curriculum, "teacher_stats": stats, "by_cd_bin": bins,
               "dataset": str(out_dir / DATASET_DIR), "wall_s": round(time.perf_counter() - start, 2)}
    write_json_atomic(out_dir / SUMMARY_FILE, summary)
    log(f"traces: {summary['written']} written for {len(rows)} prompts, {summary['correct']} correct, "
        f"{len(kept)} kept ({t.curriculum}); per CD bin kept: "
        + ", ".join(f"{b}:{e['kept']}/{e['traces']}" for b, e in bins.items()) + f" -> {summary['dataset']}")
    return summary


def _record(cfg: RunConfig, row: PromptRow, trace: Trace) -> dict:
    messages = conversation(row, cfg.task.system_prompt) + [{"role": "assistant", "content": trace.response}]
    return {"prompt": row.prompt, "response": trace.response, "messages": messages, "reference": row.answer,
            "correct": trace.correct, "rv": float(trace.rv), "cd": float(trace.cd), "cd_bin": cd_bin(trace.cd),
            "prompt_index": trace.prompt_index}
