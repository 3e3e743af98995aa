"""The config explains itself: keys, types, defaults and descriptions read from the declarations
(``distilrl config [SECTION]``, what ``--help`` is to flags)."""
from __future__ import annotations

import difflib
import textwrap
import typing

from pydantic import BaseModel

from rlhf.core.config.run_config import ConfigError, RunConfig


def _sections(annotation) -> list[type[BaseModel]]:
    """The config sections a field's type holds (``LoraSettings | None`` holds LoraSettings)."""
    args = typing.get_args(annotation) or (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or str(annotation).replace("typing.", "")


def _keys(model: type[BaseModel], prefix: str) -> dict[str, tuple]:
    """Every key under ``model`` by its dotted name: (field info, the section it opens or None)."""
    keys: dict[str, tuple] = {}
    for name, info in model.model_fields.items():
        subs = _sections(info.annotation)
        keys[prefix + name] = (info, subs[0] if subs else None)
        for sub in subs:
            keys.update(_keys(sub, f"{prefix}{name}."))
    return keys


def describe(key: str | None = None, width: int = 100) -> str:
    """The keys under ``key`` (a section such as ``rollout`` or ``reward.adaptive``, or one key), or every key."""
    keys = _keys(RunConfig, "")
    if key is not None and key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f": did you mean {close[0]}?" if close else f"; top-level keys: {', '.join(RunConfig.model_fields)}"
        raise ConfigError(f"no config key {key}{hint}")
    lines = []
    for name, (info, section) in keys.items():
        if key is not None and name != key and not name.startswith(key + "."):
            continue
        if section is not None:
            head = f"{name}  [section {section.__name__}]"
            text = (section.__doc__ or "").strip() if name == key or info.description is None else info.description
        else:
            default = info.get_default(call_default_factory=True)
            head, text = f"{name}: {_type_name(info.annotation)} = {default!r}", info.description or ""
        lines.append(head)
        lines += textwrap.wrap(" ".join(text.split()), width=width, initial_indent="    ",
                               subsequent_indent="    ")
    return "\n".join(lines)
