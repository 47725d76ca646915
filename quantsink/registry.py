"""Registries with aliases; an unknown name suggests the close match.

Modelled on lm-evaluation-harness ``api/registry.py``: every plug-in family
(models, corpora, schemes, mitigations) is a ``Registry`` and dispatch is a
lookup, never an if-ladder.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Generic, Iterator, TypeVar

from .errors import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    help: str
    aliases: tuple[str, ...]


class Registry(Generic[T]):
    """Names (and aliases) -> objects, with helpful errors."""

    def __init__(self, kind: str, plural: str = ""):
        self.kind = kind
        self.plural = plural or kind + "s"  # corpus -> corpora
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None, *, help: str = "",
                 aliases: tuple[str, ...] = ()) -> Any:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is None."""
        def add(target: T) -> T:
            if name in self._entries or name in self._aliases:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = Entry(name, target, help, tuple(aliases))
            for alias in aliases:
                self._aliases[alias] = name
            return target

        return add if obj is None else add(obj)

    def canonical(self, name: str) -> str:
        key = name.strip().lower()
        if key in self._entries:
            return key
        if key in self._aliases:
            return self._aliases[key]
        raise UsageError(self.unknown_message(name))

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)].obj

    def entry(self, name: str) -> Entry[T]:
        return self._entries[self.canonical(name)]

    def __contains__(self, name: str) -> bool:
        key = name.strip().lower()
        return key in self._entries or key in self._aliases

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def unknown_message(self, name: str) -> str:
        valid = self.names() + list(self._aliases)
        close = difflib.get_close_matches(name.lower(), valid, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return (f"unknown {self.kind} {name!r}.{hint} "
                f"Valid {self.plural}: {', '.join(self.names())}.")
