"""Node output cache keyed by input signatures, with ComfyUI's semantics.

A node's signature is its class_type, its constant inputs, a fingerprint of the files it
reads, and the signatures of the nodes feeding it (node ids do not count). So an identical
upstream subgraph hits the cache across prompts, and a reroll with a new seed re-runs only
the sampler and what follows it. Unlike ComfyUI's default (it keeps only the last prompt's
outputs) this is an LRU over many prompts, because a bot interleaves many users' graphs; it is
bounded by entries and by the bytes of the tensors its values hold (models are not counted here:
the model manager holds them, under its own budget).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.device import memory_budget
from engine.values import ClipRef, ModelRef, VaeRef

log = logging.getLogger(__name__)

GIB = 1024**3
# Model handles: their weights are the model manager's to count (engine/models/manager.py).
MODEL_HANDLES = (ModelRef, ClipRef, VaeRef)


@dataclass(frozen=True)
class CacheEntry:
    """What one node produced: socket values, ComfyUI `ui` output, and its share of the run meta."""

    values: tuple[Any, ...]
    ui: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    # Loaded-checkpoint keys the values hold on to, so an evicted model drops its entries too.
    holds: frozenset[str] = frozenset()


def signatures(
    order: list[str] | tuple[str, ...],
    class_types: Mapping[str, str],
    constants: Mapping[str, Mapping[str, Any]],
    links: Mapping[str, Mapping[str, tuple[str, int]]],
    fingerprint: Callable[[str], str | None],
) -> dict[str, str]:
    """The signature of every node in `order` (which must be topological)."""
    sigs: dict[str, str] = {}
    for node_id in order:
        parts = {
            "class_type": class_types[node_id],
            "constants": sorted((k, _stable(v)) for k, v in constants.get(node_id, {}).items()),
            "links": sorted((name, sigs[src], index) for name, (src, index) in links.get(node_id, {}).items()),
            "fingerprint": fingerprint(node_id),
        }
        sigs[node_id] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return sigs


def _stable(value: Any) -> Any:
    # floats keep their repr so 1.0 and 1 stay different keys, as ComfyUI's cache keys do
    return repr(value) if isinstance(value, float) else value


def node_cache_budget(configured: int, device: torch.device) -> int:
    """Bytes of tensors the node cache keeps: the configured number, else an eighth of the automatic model
    budget, at most 2 GiB (cached latents and conditioning sit on the device, next to the models)."""
    return configured if configured > 0 else min(2 * GIB, memory_budget(device) // 8)


def nbytes_of(value: Any) -> int:
    """Bytes of the tensors a node output holds (Latent, ImageBatch, Mask, Conditioning); model handles 0.

    A tensor counts its whole storage, once: a LatentFromBatch slice keeps its source batch in memory.
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            key = (str(item.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, MODEL_HANDLES):
            continue
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            pending.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif isinstance(item, (tuple, list)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
    return total


class OutputCache:
    """Most-recently-used node outputs, bounded by entry count and by the bytes of their tensors."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.nbytes = 0  # what the kept entries' tensors take
        self.hits = 0
        self.misses = 0
        self.evictions = 0  # entries pushed out to stay within the bounds
        self.too_big = 0  # outputs not kept because one alone is over max_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, signature: str) -> CacheEntry | None:
        entry = self._entries.get(signature)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(signature)
        self.hits += 1
        return entry

    def put(self, signature: str, entry: CacheEntry) -> None:
        """Keep `entry` as the most recent, then drop the least recent ones past either bound."""
        self._discard(signature)
        if self.max_entries <= 0:
            return
        size = nbytes_of(entry.values)
        if size > self.max_bytes:
            # keeping it would push out everything else and still not fit
            self.too_big += 1
            log.info("a node output of %.1f MB is not cached: over the node cache's %.1f MB ([engine] "
                     "node_cache_bytes)", size / 1e6, self.max_bytes / 1e6)
            return
        self._entries[signature] = entry
        self._sizes[signature] = size
        self.nbytes += size
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            self._discard(next(iter(self._entries)))
            self.evictions += 1

    def drop_holding(self, key: str) -> int:
        """Forget every entry holding a loaded model that is being unloaded; returns how many."""
        doomed = [sig for sig, entry in self._entries.items() if key in entry.holds]
        for sig in doomed:
            self._discard(sig)
        return len(doomed)

    def discard(self, signature: str) -> None:
        """Forget one entry (a failed run's SaveImage output, whose files were removed)."""
        self._discard(signature)

    def clear(self) -> None:
        self._entries.clear()
        self._sizes.clear()
        self.nbytes = 0

    def _discard(self, signature: str) -> None:
        if self._entries.pop(signature, None) is not None:
            self.nbytes -= self._sizes.pop(signature)
