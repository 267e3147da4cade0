"""LoRA files as the manager reads them: a stable adapter name for each file in its current state, and the file's
tensors read once, the most recently used 32 kept (a few MB to a few hundred each, outside the model budget)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch
from safetensors.torch import load_file

from engine.errors import UnsupportedModel
from engine.models.paths import ModelCatalog, file_fingerprint
from engine.values import LoraPatch


class LoraFiles:
    """The LoRA folder's files, by name, read on first use."""

    def __init__(self, catalog: ModelCatalog, max_files: int = 32) -> None:
        self.catalog, self.max_files = catalog, max_files
        self._states: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def key(self, name: str) -> str:
        """A stable adapter name for a LoRA file in its current state (peft names take no dots)."""
        path = self.catalog.resolve("loras", name)
        digest = hashlib.sha1(f"{name}\0{file_fingerprint(path)}".encode()).hexdigest()[:12]
        return f"lora_{digest}"

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """A LoRA file's tensors (kohya/A1111 or diffusers keys), read once."""
        key = self.key(name)
        if key not in self._states:
            path = self.catalog.resolve("loras", name)
            try:
                self._states[key] = load_file(str(path))
            except Exception as err:  # safetensors raises its own error types for broken files
                raise UnsupportedModel(f"LoRA {name!r} could not be read as safetensors: {err}") from err
            while len(self._states) > self.max_files:
                self._states.popitem(last=False)
        self._states.move_to_end(key)
        return self._states[key]

    def of(self, patches: Sequence[LoraPatch]) -> dict[str, dict[str, torch.Tensor]]:
        """Each patch's file, by adapter name."""
        return {self.key(p.name): self.state(p.name) for p in patches}

    def clear(self) -> None:
        self._states.clear()
