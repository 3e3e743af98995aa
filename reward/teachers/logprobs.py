"""On-policy distillation's teacher: a local causal LM that gives its log-probability of every token the student
sampled. The ``TeacherLogprobWorker`` Ray actor holds the teacher; its per-token log-probs, minus the sampler's,
are the ``teacher_kl`` reward (rlhf/rl/update.py): minus the reverse KL, log p_teacher(token) - log p_student(token).

The teacher must read the student's token ids as the same text: the tokenizers' vocabularies must be equal, checked
at start (``check_same_vocabulary``), else the log-probs would be of other tokens altogether.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from reward.teachers.openai_http import OpenAITeacher, _RequestFailed

from rlhf.core.algorithms.tokens import token_logprobs

from rlhf.core.data import packing
from rlhf.core.distributed.threads import apply as apply_threads
from rlhf.core.models.build import ModelLoadError, load_student, load_tokenizer

def check_same_vocabulary(student_tokenizer, teacher_dir: str | Path) -> None:
    """A one-line ModelLoadError when the teacher's tokenizer maps any token to another id than the student's."""
    teacher = load_tokenizer(teacher_dir).get_vocab()
    student = student_tokenizer.get_vocab()
    if teacher != student:
        differ = sum(1 for token, i in student.items() if teacher.get(token) != i) + len(set(teacher) - set(student))
        raise ModelLoadError(f"reward.teacher_model_path {teacher_dir}: the teacher's vocabulary ({len(teacher)} "
                             f"tokens) is not the student's ({len(student)} tokens; {differ} differ): on-policy "
                             f"distillation needs a teacher with the student's tokenizer")


class TeacherLogprobWorker:
    """The teacher in one process: ``logprobs`` of a batch's rows, as the trainer computes its own (same packing,
    same alignment: position t holds log p(token t | tokens < t), 0 at each sequence's first position)."""

    def __init__(self, model_dir: str, threads: int, micro_batch_size: int, temperature: float):
        apply_threads("teacher worker", threads)
        self.model, _ = load_student(model_dir, "reward.teacher_model_path")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval().requires_grad_(False)
        self.model.config.use_cache = False
        self.micro_batch_size = micro_batch_size
        # The student's sampling temperature: both sides' log-probs are of logits / temperature.
        self.temperature = temperature

    @torch.no_grad()
    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, L) on the CPU: the teacher's log-prob of each token of the rows (input_ids, attention_mask)."""
        def compute(mb):
            logits = self.model(**packing.model_inputs(mb)).logits / self.temperature
            return packing.zero_sequence_starts(token_logprobs(logits, mb["input_ids"]), mb)

        can_pack = self.model.config._attn_implementation in packing.PACKABLE_ATTENTION
        return packing.per_token(batch, self.micro_batch_size, self.device, can_pack, compute)


class RemoteTeacherLogprobs(OpenAITeacher):
    """The teacher behind an OpenAI-compatible *completions* endpoint that echoes the prompt's log-probs (vLLM:
    ``echo: true, logprobs: 0``): each row's token ids are sent as the prompt, so the server scores exactly the
    student's tokens (it must use the student's tokenizer, which cannot be checked from here). Log-probs are the
    server's own, at temperature 1. The judge's machinery is reused: retries, bounded concurrency, the on-disk
    cache keyed by endpoint and ids, redirects refused; a row that fails for good comes back as NaN and is counted
    (``stats['failed_rows']``), and the update gives it no distillation reward."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, concurrency: int = 4,
                 cache_dir: str | Path | None = None, **http):
        super().__init__(base_url, model, api_key_env, concurrency, cache_dir=cache_dir, **http)
        self.url = self.url[: -len("/chat/completions")] + "/completions"

    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, L): each row's teacher log-probs (0 at the first token and at padding; NaN for a failed row)."""
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        rows = [ids[:n] for ids, n in zip(batch["input_ids"].tolist(), lengths)]
        replies = self._replies([{"model": self.model, "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0,
                                  "temperature": 0.0} for ids in rows])
        out = torch.zeros(batch["input_ids"].shape)
        for i, (ids, reply) in enumerate(zip(rows, replies)):
            values = None if isinstance(reply, Exception) else json.loads(reply)
            if values is None or len(values) < len(ids):
                out[i] = float("nan")
                self._count("failed_rows")
                continue
            out[i, 1:len(ids)] = torch.tensor([float(v) for v in values[1:len(ids)]])
        return out

    def _content(self, raw: bytes) -> str:
        """The echoed prompt's token log-probs, as JSON text (what the cache keeps)."""
        try:
            values = json.loads(raw)["choices"][0]["logprobs"]["token_logprobs"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _RequestFailed("malformed reply from the teacher server (no choices[0].logprobs.token_logprobs)") \
                from None
        if not isinstance(values, list) or not all(v is None or isinstance(v, (int, float)) for v in values[1:]):
            raise _RequestFailed("the teacher server's token_logprobs are not a list of numbers")
        return json.dumps([None] + values[1:])
