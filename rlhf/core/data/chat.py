"""Prompt text as the student sees it: a dataset prompt (and its system prompt) rendered with a chat template.

``task.chat_template``: ``auto`` uses the tokenizer's own template (Qwen's ChatML for the qwen2.5 tokenizer) and
plain text when it has none; ``plain`` sends the prompt as it is; anything else is a Jinja template, or the path
of a ``.jinja`` file holding one. Rendering ends with the assistant's turn opened (``add_generation_prompt``), so
the response is what the student writes next. Think blocks are left as they are: a ``<think>`` in a prompt or a
template's output stays in the text (``task.chat_template_kwargs`` passes e.g. Qwen3's ``enable_thinking``).
"""
from __future__ import annotations

from pathlib import Path

from rlhf.core.config.run_config import ConfigError, TaskConfig


def template_override(cfg: TaskConfig) -> str | None:
    """The Jinja template the config gives instead of the tokenizer's own; None for ``auto`` and ``plain``."""
    if cfg.chat_template in ("auto", "plain"):
        return None
    if cfg.chat_template.endswith(".jinja"):
        path = Path(cfg.chat_template)
        if not path.is_file():
            raise ConfigError(f"config key task.chat_template: template file {path} does not exist")
        return path.read_text(encoding="utf-8")
    return cfg.chat_template


ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A ``messages`` value that is not an OpenAI-format conversation; the message says what is wrong."""


def check_messages(value) -> list[dict]:
    """An OpenAI-format conversation as a list of ``{"role", "content"}`` dicts (extra keys dropped): roles
    system/user/assistant, text content. Raises ChatFormatError naming the first problem."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ChatFormatError("must be a non-empty list of {role, content} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ChatFormatError(f"message {i} must be a dict with role system, user or assistant")
        if not isinstance(message.get("content"), str):
            raise ChatFormatError(f"message {i} ({message['role']}) must have text content")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def prompt_conversation(value) -> list[dict]:
    """The conversation an RL prompt asks the model to continue: up to its last user turn (what comes after,
    such as a reference assistant reply, is cut); earlier turns are context."""
    messages = check_messages(value)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ChatFormatError("has no user turn to answer")
    return messages[:last_user + 1]


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """``system`` as the conversation's system prompt where it has none of its own."""
    if not system or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def plain_text(messages: list[dict]) -> str:
    """A conversation as plain text, for tokenizers without a chat template: turns apart by blank lines, except
    that a reply follows its prompt directly (as the arithmetic task's ``7+5=`` is followed by ``#12``)."""
    return "".join(("" if i == 0 or m["role"] == "assistant" else "\n\n") + m["content"]
                   for i, m in enumerate(messages))


def uses_template(cfg: TaskConfig, tokenizer) -> bool:
    """Whether prompts are rendered with a chat template (the config's or the tokenizer's), not as plain text."""
    if cfg.chat_template == "plain":
        return False
    return template_override(cfg) is not None or bool(getattr(tokenizer, "chat_template", None))


def make_renderer(cfg: TaskConfig, tokenizer):
    """A function ``(prompts, systems, conversations=None) -> texts`` rendering a batch of prompts (each with its
    system prompt or None; or, where ``conversations[i]`` is given, that conversation up to its last user turn)
    the way ``cfg`` says, for ``tokenizer``."""
    template = template_override(cfg)
    plain = not uses_template(cfg, tokenizer)

    def conversations_of(prompts, systems, conversations):
        conversations = conversations or [None] * len(prompts)
        return [with_system(list(c), s) if c else with_system([{"role": "user", "content": p}], s)
                for p, s, c in zip(prompts, systems, conversations, strict=True)]

    if plain:
        return lambda prompts, systems, conversations=None: [
            plain_text(c) for c in conversations_of(prompts, systems, conversations)]

    def render(prompts: list[str], systems: list[str | None], conversations: list | None = None) -> list[str]:
        conversations = conversations_of(prompts, systems, conversations)
        try:
            return tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True, **cfg.chat_template_kwargs)
        except Exception as err:  # noqa: BLE001 - a broken template is a config problem: one line, named
            raise ConfigError(f"config key task.chat_template: the chat template failed "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None

    return render
