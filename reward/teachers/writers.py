"""Teachers that write: each turns conversations (OpenAI-format message lists ending in a user turn) into ``n``
responses per conversation, for distillation traces (reward/teachers/traces.py).

- ``OracleWriter``: the arithmetic task's oracle (``arithmetic.solution``), at each verbosity in turn or one.
- ``HFWriter``: a local Hugging Face causal LM, sampled with its chat template.
- ``OpenAIWriter``: any OpenAI-compatible ``/v1/chat/completions`` endpoint, one request per sample, at most
  ``concurrency`` in flight, retried as the HTTP judge is (openai_http.py).

The HTTP and HF writers keep every reply in an append-only cache file (cache.py), written as each arrives, so a
job stopped half way resumes where it stopped and a second run pays nothing. A sample that fails is ``None`` in
the result and its one-line reason is counted in ``failures``; it never stops the job.
"""
from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from reward.teachers.base import one_line
from reward.teachers.cache import ReplyCache, request_key
from reward.teachers.openai_http import OpenAITeacher, _RequestFailed
from rlhf.core.tasks import arithmetic

WRITER_CACHE_FILE = "traces_cache.jsonl"
# An instruction added to the system prompt of an LLM teacher asked for a verbosity.
VERBOSITY_INSTRUCTIONS = {
    "low": "Be brief: write only the steps you need, then the final answer.",
    "medium": "Reason step by step in a few sentences, then give the final answer.",
    "high": "Think it through carefully and in detail, step by step, checking your work, then give the final answer.",
}
ORACLE_VERBOSITY = {"low": 0, "medium": 1, "high": 2}

Progress = Callable[[int], None]  # called with the number of samples just finished


def with_verbosity(conversation: list[dict], verbosity: str) -> list[dict]:
    """The conversation with the verbosity instruction in its system prompt (one added if it has none)."""
    if verbosity == "auto":
        return conversation
    instruction = VERBOSITY_INSTRUCTIONS[verbosity]
    if conversation and conversation[0]["role"] == "system":
        first = {"role": "system", "content": f"{conversation[0]['content']}\n{instruction}"}
        return [first, *conversation[1:]]
    return [{"role": "system", "content": instruction}, *conversation]


def last_user_text(conversation: list[dict]) -> str:
    return next(m["content"] for m in reversed(conversation) if m["role"] == "user")


class OracleWriter:
    """The arithmetic oracle: sample ``i`` at verbosity ``i mod 3`` (``auto``: a spread for the curriculum to
    pick from), or every sample at the one asked for."""

    def __init__(self, verbosity: str = "auto", think_block: bool = False):
        self.verbosity, self.think_block = verbosity, think_block
        self.failures: Counter = Counter()
        self.stats = {"requests": 0, "cache_hits": 0, "failed": 0}

    def write(self, conversations: list[list[dict]], n: int, progress: Progress | None = None
              ) -> list[list[str | None]]:
        out = []
        for conversation in conversations:
            try:
                problem = arithmetic.parse_prompt(last_user_text(conversation))
            except ValueError:
                self.failures["oracle: not an arithmetic-task prompt"] += n
                self.stats["failed"] += n
                out.append([None] * n)
                continue
            levels = [ORACLE_VERBOSITY.get(self.verbosity, i % 3) for i in range(n)]
            out.append([arithmetic.solution(problem, level, self.think_block) for level in levels])
            self.stats["requests"] += n
            if progress:
                progress(n)
        return out


class OpenAIWriter(OpenAITeacher):
    """``OpenAITeacher``'s HTTP machinery (retries, back-off, key handling) writing responses instead of verdicts."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, concurrency: int = 4,
                 cache_dir: str | Path | None = None, temperature: float = 0.7, max_tokens: int = 512,
                 timeout_s: float = 120.0, max_retries: int = 2, backoff_s: float = 0.5):
        super().__init__(base_url, model, api_key_env, concurrency, max_retries=max_retries, backoff_s=backoff_s,
                         timeout_s=timeout_s, cache_dir=None, max_tokens=max_tokens, temperature=temperature)
        self.cache = ReplyCache(cache_dir, WRITER_CACHE_FILE) if cache_dir is not None else None
        self.failures: Counter = Counter()

    def write(self, conversations: list[list[dict]], n: int, progress: Progress | None = None
              ) -> list[list[str | None]]:
        out: list[list[str | None]] = [[None] * n for _ in conversations]
        todo = []
        for i, conversation in enumerate(conversations):
            payload = {"model": self.model, "messages": conversation, "temperature": self.temperature,
                       "max_tokens": self.max_tokens}
            for j in range(n):
                key = request_key({**payload, "sample": j}, self.url)  # n samples of one prompt: n cache entries
                cached = self.cache.get(key) if self.cache is not None else None
                if cached is not None:
                    out[i][j] = cached
                else:
                    todo.append((i, j, payload, key))
        self._count("cache_hits", len(conversations) * n - len(todo))
        if progress and len(todo) < len(conversations) * n:
            progress(len(conversations) * n - len(todo))
        if not todo:
            return out
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo)), thread_name_prefix="traces-http") as pool:
            futures = {pool.submit(self._fetch_or_error, payload, key): (i, j) for i, j, payload, key in todo}
            for future in as_completed(futures):
                i, j = futures[future]
                reply = future.result()
                if isinstance(reply, _RequestFailed):
                    self.failures[str(reply)] += 1
                    self._count("failed_rows")
                else:
                    out[i][j] = reply
                if progress:
                    progress(1)
        return out


class HFWriter:
    """A local causal LM (safetensors, no remote code) sampling ``n`` responses per conversation, in batches of
    ``batch_size`` conversations, through its chat template (the turns' text joined by blank lines where it has
    none)."""

    def __init__(self, model_path: str | Path, cache_dir: str | Path | None = None, temperature: float = 0.7,
                 max_new_tokens: int = 512, batch_size: int = 8):
        from reward.teachers.hf_judge import load_judge

        self.model, self.tokenizer = load_judge(model_path)
        self.model.eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # generation continues each row from its last token
        self.name = str(model_path)
        self.temperature, self.max_new_tokens, self.batch_size = temperature, max_new_tokens, batch_size
        self.cache = ReplyCache(cache_dir, WRITER_CACHE_FILE) if cache_dir is not None else None
        self.failures: Counter = Counter()
        self.stats = {"requests": 0, "cache_hits": 0, "failed": 0}
        self._lock = threading.Lock()

    def _key(self, conversation: list[dict], sample: int) -> str:
        return request_key({"model": self.name, "messages": conversation, "temperature": self.temperature,
                            "max_tokens": self.max_new_tokens, "sample": sample}, f"local:{self.name}")

    def _text(self, conversation: list[dict]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in conversation) + "\n\n"

    def write(self, conversations: list[list[dict]], n: int, progress: Progress | None = None
              ) -> list[list[str | None]]:
        out: list[list[str | None]] = [[None] * n for _ in conversations]
        todo = []
        for i, conversation in enumerate(conversations):
            cached = [self.cache.get(self._key(conversation, j)) if self.cache else None for j in range(n)]
            if all(c is not None for c in cached):
                out[i] = cached
                self.stats["cache_hits"] += n
            else:
                todo.append(i)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            try:
                texts = self._generate([self._text(conversations[i]) for i in batch], n)
            except Exception as err:  # noqa: BLE001 - a batch that fails costs its samples, not the job
                self.failures[one_line(f"generation failed: {type(err).__name__}: {err}")] += n * len(batch)
                self.stats["failed"] += n * len(batch)
                continue
            for k, i in enumerate(batch):
                out[i] = texts[k * n:(k + 1) * n]
                for j, text in enumerate(out[i]):
                    if self.cache is not None:
                        self.cache.put(self._key(conversations[i], j), text)
            self.stats["requests"] += n * len(batch)
            if progress:
                progress(n * len(batch))
        return out

    def _generate(self, texts: list[str], n: int) -> list[str]:
        import torch

        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        sample = self.temperature > 0
        with torch.no_grad():
            ids = self.model.generate(**enc, do_sample=sample, temperature=self.temperature if sample else None,
                                      max_new_tokens=self.max_new_tokens, num_return_sequences=n,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
