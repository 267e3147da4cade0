"""LoRA files as the manager reads them: a stable adapter name for each file in its current state, and the file's
tensors read once, the most recently used 32 kept (a few MB to a few hundred each, outside the model budget)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from engine.errors import UnsupportedModel
from engine.models.paths import ModelCatalog, file_fingerprint
from engine.values import LoraPatch


@dataclass(frozen=True)
class LoraFile:
    """One LoRA file's tensors in one state, with the name it has in the loras folder."""

    name: str
    state: dict[str, torch.Tensor]


class LoraFiles:
    """The LoRA folder's files, by name, read on first use."""

    def __init__(self, catalog: ModelCatalog, max_files: int = 32) -> None:
        self.catalog, self.max_files = catalog, max_files
        self._states: OrderedDict[str, LoraFile] = OrderedDict()  # by adapter key

    def key(self, name: str) -> str:
        """A stable adapter name for a LoRA file in its current state (peft names take no dots)."""
        path = self.catalog.resolve("loras", name)
        digest = hashlib.sha1(f"{name}\0{file_fingerprint(path)}".encode()).hexdigest()[:12]
        return f"lora_{digest}"

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """A LoRA file's tensors (kohya/A1111 or diffusers keys), read once."""
        return self._file(self.key(name), name).state

    def of(self, patches: Sequence[LoraPatch]) -> dict[str, LoraFile]:
        """Each patch's file, by adapter name."""
        return {key: self._file(key, p.name) for key, p in ((self.key(p.name), p) for p in patches)}

    def _file(self, key: str, name: str) -> LoraFile:
        if key not in self._states:
            path = self.catalog.resolve("loras", name)
            try:
                state = load_file(str(path))
            except Exception as err:  # safetensors raises its own error types for broken files
                raise UnsupportedModel(f"LoRA {name!r} could not be read as safetensors: {err}") from err
            # the file's earlier states: re-saved, it is never read under their keys again
            for stale in [k for k, file in self._states.items() if file.name == name]:
                del self._states[stale]
            self._states[key] = LoraFile(name, state)
            while len(self._states) > self.max_files:
                self._states.popitem(last=False)
        self._states.move_to_end(key)
        return self._states[key]

    def clear(self) -> None:
        self._states.clear()
