"""One kind of auxiliary model the manager (engine/models/manager.py) keeps loaded: VAEs, ControlNets, upscalers.

Entries are keyed by the file's name and fingerprint (engine/models/paths.py `file_fingerprint`), so a file
replaced on disk is a new entry and the old one is stale. Each carries its size in bytes and the tick of its
last use on the manager's clock, one clock for every kind: eviction compares ticks across kinds, least
recently used first. The cache only keeps the books; the manager decides what leaves (its memory budget),
tells its unload listeners and frees the memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Resident", "ResidentCache"]

T = TypeVar("T")


@dataclass
class Resident(Generic[T]):
    """One loaded model, the file state it came from, what it takes and when it was last used."""

    value: T
    name: str  # the file's name in its models folder
    fingerprint: str
    nbytes: int
    used: int


class ResidentCache(Generic[T]):
    """Loaded models of one `kind` by key, least recently used first; past `max_entries` the oldest is let go."""

    def __init__(self, kind: str, clock: Iterator[int], *, max_entries: int | None = None) -> None:
        self.kind = kind  # as the manager's log lines name it: "ControlNet", "upscale model"
        self._clock = clock
        self._max_entries = max_entries
        self._entries: OrderedDict[str, Resident[T]] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        """The keys, least recently used first; a copy, so the manager may drop entries meanwhile."""
        return iter(list(self._entries))

    def get(self, key: str) -> T | None:
        """The model under `key`, which becomes the most recently used; None when it is not loaded."""
        return self._entries[key].value if self.touch(key) else None

    def add(self, key: str, value: T, name: str, fingerprint: str, nbytes: int) -> T:
        """Keep `value` as the most recently used; past `max_entries` the least recently used leaves quietly."""
        self._entries[key] = Resident(value, name, fingerprint, nbytes, next(self._clock))
        while self._max_entries is not None and len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return value

    def touch(self, key: str) -> bool:
        """Make `key` the most recently used, if it is loaded."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        self._entries.move_to_end(key)
        entry.used = next(self._clock)
        return True

    def pop(self, key: str) -> Resident[T]:
        """Take `key`'s entry out (the manager tells its listeners and frees the memory)."""
        return self._entries.pop(key)

    def stale(self, name: str, fingerprint: str) -> list[str]:
        """The keys of `name` loaded from another state of its file (it changed on disk since)."""
        return [key for key, e in self._entries.items() if e.name == name and e.fingerprint != fingerprint]

    def names(self) -> list[str]:
        """The loaded files' names, least recently used first."""
        return [e.name for e in self._entries.values()]

    def nbytes(self) -> int:
        """What the loaded models of this kind take, in bytes."""
        return sum(e.nbytes for e in self._entries.values())

    def last_used(self, keep: frozenset[str] = frozenset()) -> list[tuple[int, str]]:
        """(tick, key) of every entry but those in `keep`: the manager's eviction candidates of this kind."""
        return [(e.used, key) for key, e in self._entries.items() if key not in keep]

    def clear(self) -> None:
        """Forget every entry quietly."""
        self._entries.clear()
