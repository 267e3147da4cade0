"""`PromptEncoderCache`: an LRU of encoded prompts that the engine holds (no module-level state).

Keys hold plain values plus the `id()` of the models and tokenizers used; each entry also keeps
weak references to those objects and counts as a miss unless every one is still alive and the
very same object. So an entry never outlives its model, a new model that reuses a freed
model's id never sees the old result, and the cache never keeps a model in memory.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Generic, NamedTuple, TypeVar

if TYPE_CHECKING:  # annotations only: the cache itself never touches a tensor
    import torch

    from .encoded import EncodedPrompt

__all__ = ["CacheInfo", "PromptEncoderCache"]

V = TypeVar("V")


class CacheInfo(NamedTuple):
    """Statistics in `functools.lru_cache`'s shape."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class _WeakLRU(Generic[V]):
    """An LRU map whose entries are valid only while their owner objects live."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"cache size must be 1 or more, not {maxsize}")
        self.maxsize = maxsize
        self._entries: OrderedDict[Hashable, tuple[tuple[weakref.ref, ...], V]] = OrderedDict()

    def get(self, key: Hashable, owners: Sequence[object]) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        refs, value = entry
        if len(refs) != len(owners) or any(ref() is not owner for ref, owner in zip(refs, owners)):
            del self._entries[key]  # an owner died and its id was reused: stale
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, owners: Sequence[object], value: V) -> None:
        self._entries[key] = (tuple(weakref.ref(owner) for owner in owners), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


class PromptEncoderCache:
    """Encoded prompts by (text, encoders, layer, weighting, cap, embeddings), most recent kept.

    Pass one to `encode_prompt(..., cache=...)`. It also keeps each encoder's encoding of the
    empty prompt, which ComfyUI-style weighting needs. Thread-safe; results come back as copies,
    so a caller changing a tensor in place cannot corrupt the cache.
    """

    def __init__(self, maxsize: int = 64) -> None:
        self._prompts: _WeakLRU[EncodedPrompt] = _WeakLRU(maxsize)
        self._empty: _WeakLRU[torch.Tensor] = _WeakLRU(16)
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def lookup(self, key: Hashable, owners: Sequence[object]) -> EncodedPrompt | None:
        """The stored result for `key` (counted as a hit or a miss)."""
        with self._lock:
            value = self._prompts.get(key, owners)
            if value is None:
                self._misses += 1
            else:
                self._hits += 1
            return value

    def store(self, key: Hashable, owners: Sequence[object], value: EncodedPrompt) -> None:
        """Keep `value` for `key` while every object in `owners` lives."""
        with self._lock:
            self._prompts.put(key, owners, value)

    def empty_lookup(self, key: Hashable, owners: Sequence[object]) -> torch.Tensor | None:
        """An encoder's stored empty-prompt encoding (not counted in `cache_info`)."""
        with self._lock:
            return self._empty.get(key, owners)

    def empty_store(self, key: Hashable, owners: Sequence[object], value: torch.Tensor) -> None:
        """Keep an encoder's empty-prompt encoding."""
        with self._lock:
            self._empty.put(key, owners, value)

    def cache_info(self) -> CacheInfo:
        """Hits, misses, maximum and current size of the prompt entries."""
        with self._lock:
            return CacheInfo(self._hits, self._misses, self._prompts.maxsize, len(self._prompts))

    def clear(self) -> None:
        """Drop every entry and reset the statistics."""
        with self._lock:
            self._prompts.clear()
            self._empty.clear()
            self._hits = self._misses = 0
