"""Merged models (the ModelMerge* and CLIPMerge* nodes) in the model manager's budget.

A merge's pipeline belongs to the node output cache, which keeps it while a workflow's outputs hold it; the book
holds it weakly, counts its new modules' bytes while it lives, and forgets it once it is gone. The manager decides
when one is dropped (a budget eviction, its checkpoint unloaded) and tells the node cache.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from diffusers import DiffusionPipeline

__all__ = ["MergeBook", "MergedModel"]


@dataclass
class MergedModel:
    """The new modules of one merge, counted in the model budget while the pipeline holding them lives."""

    key: str
    label: str
    parent: str  # the key of the loaded checkpoint whose other components the merged pipeline shares
    pipe: weakref.ref[DiffusionPipeline]
    nbytes: int
    used: int = 0


class MergeBook:
    """The merges in memory, by key."""

    def __init__(self) -> None:
        self._merges: dict[str, MergedModel] = {}

    def add(self, merge: MergedModel) -> None:
        self._merges[merge.key] = merge

    def pop(self, key: str) -> MergedModel:
        return self._merges.pop(key)

    def keys(self) -> list[str]:
        return list(self._merges)

    def of(self, pipe: DiffusionPipeline | None) -> MergedModel | None:
        """The merge whose pipeline `pipe` is, if it is one."""
        if pipe is None:
            return None
        return next((m for m in self._merges.values() if m.pipe() is pipe), None)

    def live(self) -> list[tuple[MergedModel, DiffusionPipeline]]:
        """Each merge whose pipeline still lives, with that pipeline."""
        return [(m, pipe) for m in self._merges.values() if (pipe := m.pipe()) is not None]

    def children(self, parent: str) -> list[str]:
        """The merges sharing the components of checkpoint `parent`."""
        return [key for key, merge in self._merges.items() if merge.parent == parent]

    def nbytes(self) -> int:
        self.forget_dead()
        return sum(m.nbytes for m in self._merges.values())

    def labels(self) -> list[str]:
        """The live merges' labels, least recently used first."""
        self.forget_dead()
        return [m.label for m in sorted(self._merges.values(), key=lambda m: m.used)]

    def last_used(self, keep: frozenset[str]) -> list[tuple[int, str]]:
        """(last use, key) of each merge not in `keep`: candidates for eviction."""
        return [(m.used, key) for key, m in self._merges.items() if key not in keep]

    def forget_dead(self) -> None:
        # the node cache let go of a merge's last output on its own (LRU): its memory is free already
        for key in [key for key, merge in self._merges.items() if merge.pipe() is None]:
            del self._merges[key]
