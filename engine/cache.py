"""Node output cache keyed by input signatures, with ComfyUI's semantics.

A node's signature is its class_type, its constant inputs, a fingerprint of the files it
reads, and the signatures of the nodes feeding it (node ids do not count). So an identical
upstream subgraph hits the cache across prompts, and a reroll with a new seed re-runs only
the sampler and what follows it. Unlike ComfyUI's default (it keeps only the last prompt's
outputs) this is an LRU over many prompts, because a bot interleaves many users' graphs.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


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


class OutputCache:
    """Most-recently-used node outputs, bounded by entry count."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0

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
        if self.max_entries <= 0:
            return
        self._entries[signature] = entry
        self._entries.move_to_end(signature)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def drop_holding(self, key: str) -> int:
        """Forget every entry holding a loaded model that is being unloaded; returns how many."""
        doomed = [sig for sig, entry in self._entries.items() if key in entry.holds]
        for sig in doomed:
            del self._entries[sig]
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()
