"""Teacher back-ends: they judge (prompt, response, reference) rows and return one ``Verdict`` per row.

- ``OracleTeacher``: the arithmetic task's exact oracle (certain verdicts, no soft labels).
- ``HFJudgeTeacher``: a local Hugging Face causal LM read through its next-token digit distribution (soft labels).
- ``OpenAITeacher``: any OpenAI-compatible chat endpoint, with retries, a concurrency limit and an on-disk cache.

A row that cannot be judged comes back with ``Verdict.error`` set; ``judge`` itself does not raise for it.
"""
from reward.teachers.base import Teacher, Verdict
from reward.teachers.hf_judge import HFJudgeTeacher
from reward.teachers.openai_http import OpenAITeacher
from reward.teachers.oracle import OracleTeacher
from reward.teachers.parsing import parse_verdict

__all__ = ["Teacher", "Verdict", "OracleTeacher", "HFJudgeTeacher", "OpenAITeacher", "parse_verdict"]
