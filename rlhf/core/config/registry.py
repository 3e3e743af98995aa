"""A name -> implementation table: the extension points (rollout engines, teachers, reward components, verifiers,
advantage estimators) are each one ``Registry``, kept beside their implementations.

Adding an implementation is one module plus one ``register`` line (or decorator). A config names an entry by its
key; an unknown key is refused at start with one line listing the registered ones (rlhf/registered.py).
"""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in registration order. ``kind`` names what they are, for error messages."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """``registry.register("name", entry)``, or ``@registry.register("name")`` over a class or function."""
        if entry is None:
            def decorate(obj: T) -> T:
                self.register(name, obj)
                return obj
            return decorate
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(self.unknown(name))
        return self._entries[name]

    def unknown(self, name: str) -> str:
        return f"unknown {self.kind} {name!r}: registered are {', '.join(self._entries)}"

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return self._entries.items()
