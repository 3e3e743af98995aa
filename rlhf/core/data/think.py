"""Qwen3-style thinking: ``<think>...</think>`` reasoning blocks in responses, and the ``/think`` / ``/no_think``
switches a prompt can carry.

A response is split into its *reasoning* (the text inside think blocks) and its *answer* (everything outside).
The final answer is read from the answer part only, so a number the model tried out while thinking never counts
as its answer. Parsing is forgiving, because sampled text is messy:

- text before ``<think>`` or after ``</think>`` is answer text;
- nested blocks belong to the outermost one (inner tags are dropped from the reasoning);
- an unclosed block runs to the end: all reasoning, no answer (the model ran out of tokens while thinking);
- a ``</think>`` with no opening tag closes a block that began with the response (Qwen3's chat template can put
  ``<think>`` in the prompt, so the response starts inside the block);
- an empty block (``<think></think>``, Qwen3's no-think output) is a block, but not thinking.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"
THINK_SWITCH, NO_THINK_SWITCH = "/think", "/no_think"
_TAG_RE = re.compile(r"</?think>")
_SWITCH_RE = re.compile(r"\s*/(?:no_)?think\s*$")
ANSWER_MARK = "#"  # the verifiers' final-answer mark: text before it in the answer part is reasoning too


@dataclass(frozen=True)
class ThinkSplit:
    reasoning: str   # the text of every think block, tags removed
    answer: str      # the text outside the blocks
    has_block: bool  # a think tag appeared at all
    closed: bool     # every opened block was closed (False: the response stopped while thinking)

    @property
    def thought(self) -> bool:
        """Whether the response really thought: a block with something in it."""
        return bool(self.reasoning.strip())


def split_think(response: str) -> ThinkSplit:
    """Split a response into reasoning and answer (the rules are in the module docstring)."""
    reasoning, answer = [], []
    depth, pos, has_block = 0, 0, False
    for tag in _TAG_RE.finditer(response):
        text = response[pos:tag.start()]
        pos = tag.end()
        has_block = True
        if tag.group() == OPEN:
            (reasoning if depth else answer).append(text)
            depth += 1
        elif depth:
            reasoning.append(text)
            depth -= 1
        else:  # a stray close: everything so far was reasoning whose opening tag was in the prompt
            reasoning, answer = [_TAG_RE.sub("", response[:tag.start()])], []
    rest = response[pos:]
    (reasoning if depth else answer).append(rest)
    return ThinkSplit("".join(reasoning), "".join(answer), has_block, depth == 0)


def answer_text(response: str) -> str:
    """The part of a response the final answer is read from: outside every think block."""
    return split_think(response).answer


def reasoning_text(response: str) -> str:
    """All reasoning in a response: the think blocks' text, plus any answer-part text before the final answer mark
    (a response without blocks that writes its steps out before ``#N`` reasons too)."""
    parts = split_think(response)
    cut = parts.answer.rfind(ANSWER_MARK)
    # A mark of several (GSM8K's "#### 18") is one mark: its first #s are not reasoning.
    outside = parts.answer[:cut].rstrip(ANSWER_MARK) if cut >= 0 else ("" if parts.has_block else parts.answer)
    return "".join(s for s in (parts.reasoning.strip(), outside.strip()) if s)


def with_switch(prompt: str, mode: str) -> str:
    """The prompt with the switch for ``mode`` appended (on: ``/think``, off: ``/no_think``, auto: none), in
    place of any switch it already carried."""
    if mode == "auto":
        return prompt
    if mode not in ("on", "off"):
        raise ValueError(f"think mode must be on, off or auto, got {mode!r}")
    return f"{strip_switch(prompt)} {THINK_SWITCH if mode == 'on' else NO_THINK_SWITCH}"


def strip_switch(prompt: str) -> str:
    """The prompt without a trailing ``/think`` or ``/no_think``."""
    return _SWITCH_RE.sub("", prompt)


def wrap(reasoning: str, answer: str) -> str:
    """A response with its reasoning in a think block; no block at all when there is no reasoning."""
    return f"{OPEN}{reasoning}{CLOSE}{answer}" if reasoning else answer
