"""Prompt text as the student sees it: a dataset prompt (and its system prompt) rendered with a chat template.

``task.chat_template``: ``auto`` uses the tokenizer's own template (Qwen's ChatML for the qwen2.5 tokenizer) and
plain text when it has none; ``plain`` sends the prompt as it is; anything else is a Jinja template, or the path
of a ``.jinja`` file holding one. Rendering ends with the assistant's turn opened (``add_generation_prompt``), so
the response is what the student writes next. Think blocks are left as they are: a ``<think>`` in a prompt or a
template's output stays in the text (``task.chat_template_kwargs`` passes e.g. Qwen3's ``enable_thinking``).
"""
from __future__ import annotations

from pathlib import Path

from rlhf.base.config import ConfigError, TaskConfig


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


def make_renderer(cfg: TaskConfig, tokenizer):
    """A function ``(prompts, systems) -> texts`` rendering a batch of prompts (each with its system prompt or
    None) the way ``cfg`` says, for ``tokenizer``."""
    template = template_override(cfg)
    if cfg.chat_template == "plain" or (template is None and not getattr(tokenizer, "chat_template", None)):
        return lambda prompts, systems: [f"{s}\n\n{p}" if s else p for p, s in zip(prompts, systems, strict=True)]

    def render(prompts: list[str], systems: list[str | None]) -> list[str]:
        conversations = [([{"role": "system", "content": s}] if s else []) + [{"role": "user", "content": p}]
                         for p, s in zip(prompts, systems, strict=True)]
        try:
            return tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True, **cfg.chat_template_kwargs)
        except Exception as err:  # noqa: BLE001 - a broken template is a config problem: one line, named
            raise ConfigError(f"config key task.chat_template: the chat template failed "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None

    return render
