"""Teacher back-ends: they judge (prompt, response, reference) rows and return one ``Verdict`` per row.

- ``OracleTeacher``: the arithmetic task's exact oracle (certain verdicts, no soft labels).
- ``HFJudgeTeacher``: a local Hugging Face causal LM read through its next-token digit distribution (soft labels).
- ``OpenAITeacher``: any OpenAI-compatible chat endpoint, with retries, a concurrency limit and an on-disk cache.
- ``ReferenceTeacher``: rules against the dataset's reference solution (verifier, reasoning length, the solution's
  steps): certain verdicts on CPU for GSM8K-like data, the stand-in for an LLM judge.

A row that cannot be judged comes back with ``Verdict.error`` set; ``judge`` itself does not raise for it.
Teachers that write responses (distillation traces) are in ``writers.py``: the oracle, a local HF model and the
OpenAI-compatible endpoint, sharing this package's HTTP client and reply cache.

``TEACHERS`` is the registry ``label.teacher`` names: a factory per back-end taking the ``label`` config section and
the directory an HTTP teacher caches its replies in. A new back-end is one module plus one entry here.
"""
from __future__ import annotations

from pathlib import Path

from rlhf.core.config.run_config import LabelConfig
from rlhf.core.config.registry import Registry
from reward.teachers.base import Teacher, Verdict
from reward.teachers.hf_judge import HFJudgeTeacher
from reward.teachers.openai_http import OpenAITeacher
from reward.teachers.oracle import OracleTeacher
from reward.teachers.parsing import parse_verdict
from reward.teachers.reference import ReferenceTeacher

__all__ = ["Teacher", "Verdict", "OracleTeacher", "HFJudgeTeacher", "OpenAITeacher", "ReferenceTeacher",
           "parse_verdict", "TEACHERS", "make_teacher"]

TEACHERS: Registry = Registry("teacher")
TEACHERS.register("oracle", lambda cfg, cache_dir: OracleTeacher())
TEACHERS.register("reference", lambda cfg, cache_dir: ReferenceTeacher(cfg.verifier or "final_number",
                                                                      cfg.chars_per_rv))
TEACHERS.register("hf", lambda cfg, cache_dir: HFJudgeTeacher(cfg.teacher_model_path))
TEACHERS.register("openai", lambda cfg, cache_dir: OpenAITeacher(
    base_url=cfg.endpoint.url, model=cfg.endpoint.model, api_key_env=cfg.endpoint.api_key_env,
    concurrency=cfg.endpoint.concurrency, max_retries=cfg.endpoint.max_retries, timeout_s=cfg.endpoint.timeout_s,
    cache_dir=str(cache_dir) if cache_dir else None))


def make_teacher(cfg: LabelConfig, cache_dir: Path | None = None) -> Teacher:
    """The teacher ``cfg.teacher`` names; an HTTP teacher caches its replies in ``cache_dir``."""
    return TEACHERS[cfg.teacher](cfg, cache_dir)
