"""The engine's samples turned into OpenAI's answers: stop strings applied, per-token text and log-probs, and the
reply as one JSON object or as the chunks of a server-sent-events stream (chat and completions shapes).

Stop strings are applied to the finished text (the engines stop at end-of-sequence or ``max_tokens`` only): the
text ends before the first stop string, and the tokens (usage, log-probs) end with the one that completed it.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rlhf.core.data.samples import Sample
from rlhf.serve.openai_request import GenerationRequest
from rlhf.serve.tool_calls import split_tool_calls

_WINDOW = 6  # tokens decoded together to find one token's text (a character may span several byte tokens)


@dataclass
class Choice:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # the sampler's log-prob of each token, under the distribution it was drawn from
    finish_reason: str
    pieces: list[str]  # each token's share of ``text``; joined, they are ``text``
    top: list[list[tuple[int, float]]] | None = None  # per token, the most likely (token, log-prob) pairs
    tool_calls: list[dict] | None = None  # OpenAI tool calls read out of ``text`` (chat with tools)
    content: str | None = None  # with tool calls: what is left of ``text`` around them


def read_tool_calls(choice: Choice, request: GenerationRequest) -> Choice:
    """``choice`` with the calls to the request's tools taken out of its text (finish_reason "tool_calls");
    unchanged where the request offered none or the model wrote none."""
    if not request.tools:
        return choice
    content, calls = split_tool_calls(choice.text, request.tools)
    if calls:
        choice.content, choice.finish_reason = content, "tool_calls"
        choice.tool_calls = calls if request.parallel_tool_calls else calls[:1]
    return choice


def token_ends(tokenizer, ids: list[int]) -> list[int]:
    """For each token, the length of the decoded text up to and including it (special tokens decode to
    nothing); a token that ends inside a multi-byte character ends where the previous one did."""
    ends, end = [], 0
    for i in range(len(ids)):
        start = max(0, i - _WINDOW)
        before = tokenizer.decode(ids[start:i], skip_special_tokens=True)
        now = tokenizer.decode(ids[start:i + 1], skip_special_tokens=True)
        if not now.endswith("\ufffd") and now.startswith(before):
            end += len(now) - len(before)
        ends.append(end)
    return ends


def finish(tokenizer, sample: Sample, stops: list[str]) -> Choice:
    """``sample`` cut at the first of ``stops`` in its text (finish_reason "stop"), with per-token pieces."""
    ids, logprobs, text, reason = list(sample.response_ids), list(sample.logprobs), sample.text, sample.finish_reason
    ends = token_ends(tokenizer, ids)
    found = [(text.find(s), s) for s in stops if s in text]
    if found:
        at, stop = min(found)
        keep = next((k + 1 for k, end in enumerate(ends) if end >= at + len(stop)), len(ids))
        ids, logprobs, ends, text, reason = ids[:keep], logprobs[:keep], ends[:keep], text[:at], "stop"
    ends = [min(end, len(text)) for end in ends]
    if ends:
        ends[-1] = len(text)  # whatever the windowed decoding missed belongs to the last token
    pieces = [text[(ends[k - 1] if k else 0):end] for k, end in enumerate(ends)]
    return Choice(text, ids, logprobs, reason, pieces)


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, choice: Choice, start: int = 0, stop: int | None = None) -> dict[str, Any]:
    """OpenAI chat's ``logprobs`` (``{"content": [...]}``) for tokens ``start:stop`` of ``choice``."""
    content = []
    for k in range(start, len(choice.token_ids) if stop is None else stop):
        token = _token(tokenizer, choice.token_ids[k])
        alternatives = [{"token": (t := _token(tokenizer, i)), "logprob": lp, "bytes": list(t.encode())}
                        for i, lp in (choice.top[k] if choice.top else [])]
        content.append({"token": token, "logprob": choice.logprobs[k], "bytes": list(token.encode()),
                        "top_logprobs": alternatives})
    return {"content": content}


def text_logprobs(tokenizer, choice: Choice, start: int = 0, stop: int | None = None,
                  offset: int = 0) -> dict[str, Any]:
    """The completions API's ``logprobs`` (parallel lists) for tokens ``start:stop`` of ``choice``."""
    stop = len(choice.token_ids) if stop is None else stop
    offsets = [offset + len("".join(choice.pieces[:k])) for k in range(start, stop)]
    top = None
    if choice.top is not None:
        top = [{_token(tokenizer, i): lp for i, lp in choice.top[k]} for k in range(start, stop)]
    return {"tokens": [_token(tokenizer, i) for i in choice.token_ids[start:stop]],
            "token_logprobs": choice.logprobs[start:stop], "top_logprobs": top, "text_offset": offsets}


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _message(choice: Choice) -> dict[str, Any]:
    """The assistant's message: its text, or its tool calls and the text around them."""
    if choice.tool_calls:
        return {"role": "assistant", "content": choice.content, "tool_calls": choice.tool_calls}
    return {"role": "assistant", "content": choice.text}


def _tool_call_chunks(head: dict[str, Any], i: int, choice: Choice, tokenizer,
                      logprobs: bool) -> Iterator[dict[str, Any]]:
    """A reply with tool calls streams its text around the calls as one chunk (carrying every token's log-prob)
    and then the calls, each whole, as OpenAI's deltas with an ``index``."""
    if choice.content:
        yield {**head, "choices": [{"index": i, "delta": {"content": choice.content}, "finish_reason": None,
                                    "logprobs": chat_logprobs(tokenizer, choice) if logprobs else None}]}
    calls = [{"index": k, **call} for k, call in enumerate(choice.tool_calls)]
    yield {**head, "choices": [{"index": i, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}]}


def reply(request: GenerationRequest, tokenizer, model: str, choices: list[Choice],
          prompt_tokens: int) -> dict[str, Any]:
    """The whole answer as one JSON object."""
    head = _head(request, model)
    if request.kind == "chat":
        head["choices"] = [{"index": i, "message": _message(c), "finish_reason": c.finish_reason,
                            "logprobs": chat_logprobs(tokenizer, c) if request.logprobs else None}
                           for i, c in enumerate(choices)]
    else:
        head["choices"] = [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                            "logprobs": text_logprobs(tokenizer, c) if request.logprobs else None}
                           for i, c in enumerate(choices)]
    head["usage"] = usage(prompt_tokens, choices)
    return head


def chunks(request: GenerationRequest, tokenizer, model: str, choices: list[Choice],
           prompt_tokens: int) -> Iterator[dict[str, Any]]:
    """The answer as stream chunks: per choice, (chat) a role chunk, one chunk per token, a finish chunk; then,
    with ``stream_options.include_usage``, a usage chunk without choices (OpenAI's order of fields)."""
    head = _head(request, model, stream=True)
    chat = request.kind == "chat"
    for i, choice in enumerate(choices):
        if chat:
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
        if chat and choice.tool_calls:
            yield from _tool_call_chunks(head, i, choice, tokenizer, request.logprobs)
        for k, piece in enumerate([] if chat and choice.tool_calls else choice.pieces):
            if chat:
                part = {"index": i, "delta": {"content": piece}, "finish_reason": None,
                        "logprobs": chat_logprobs(tokenizer, choice, k, k + 1) if request.logprobs else None}
            else:
                part = {"index": i, "text": piece, "finish_reason": None, "logprobs": text_logprobs(
                    tokenizer, choice, k, k + 1) if request.logprobs else None}
            yield {**head, "choices": [part]}
        last = {"delta": {}} if chat else {"text": ""}
        yield {**head, "choices": [{"index": i, **last, "logprobs": None, "finish_reason": choice.finish_reason}]}
    if request.include_usage:
        yield {**head, "choices": [], "usage": usage(prompt_tokens, choices)}


def _head(request: GenerationRequest, model: str, stream: bool = False) -> dict[str, Any]:
    if request.kind == "chat":
        kind, prefix = ("chat.completion.chunk" if stream else "chat.completion"), "chatcmpl"
    else:
        kind, prefix = "text_completion", "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}
