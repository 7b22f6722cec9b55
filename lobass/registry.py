"""One registry idiom for everything a config value names by a short string.

Scorers (``scorer.name``), data readers (``data.reader``) and prompt readers
(``eval.generation.sets.<name>.reader``) are each a :class:`Registry`: adding one is one function
and one ``add`` line in its module. Judges and loggers are classes named by Hydra's ``_target_``
instead, because they take constructor arguments from their config group. The config checks read
the names through :mod:`lobass.schema.registries` without importing torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one kind, refusing duplicates and naming the choices on a miss."""

    def __init__(self, kind: str, error: type[Exception] = ValueError) -> None:
        """``kind`` names the entries in messages ("scorer"); ``error`` is what a miss raises."""
        self.kind = kind
        self.error = error
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a second entry under one name is a bug."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry ``name``, or ``self.error`` listing the valid names."""
        if name not in self._entries:
            raise self.error(f"unknown {self.kind} {name!r}; choose one of {sorted(self)}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
