"""The model manager: loaded checkpoints in an LRU bounded by memory, VAEs, LoRA adapters.

Checkpoints are loaded once (diffusers single-file loading) and kept while they fit the
budget, most recently used first; a new one unloads the least recently used until it fits,
as ComfyUI's model management does. LoRAs are peft adapters on the loaded modules: a
LoraLoader only names them, and `use_unet` / `use_text_encoders` switch the adapter set right
before a module runs, so changing LoRAs never reloads a checkpoint from disk.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from safetensors.torch import load_file

from engine.errors import UnsupportedModel
from engine.models.detect import Arch, detect_checkpoint
from engine.models.lora import LoraAdapters, summed
from engine.models.paths import ModelCatalog, file_fingerprint, safe_join, short_hash
from engine.models.single_file import load_checkpoint_pipeline, load_vae
from engine.nodes.base import FolderLookup
from prompts.cache import PromptEncoderCache
from prompts.embeddings import EmbeddingLibrary
from engine.values import ClipRef, LoraPatch, ModelRef

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class LoadedCheckpoint:
    """One checkpoint file in memory: its pipeline (all components) and what identifies it."""

    name: str
    path: Path
    arch: Arch
    pipe: DiffusionPipeline
    fingerprint: str
    load_seconds: float
    nbytes: int

    @property
    def key(self) -> str:
        return f"checkpoint:{self.name}:{self.fingerprint}"

    @cached_property
    def short_hash(self) -> str:
        """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
        return short_hash(self.path)


@dataclass
class ManagerStats:
    """Counters a job's meta reports: checkpoint cache hits, misses, evictions and load time."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class _Lookup(FolderLookup):
    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def resolve(self, folder: str, name: str) -> Path:
        return self._manager.resolve(folder, name)


class ModelManager:
    """Loads, caches and patches models for the executor; one per engine."""

    def __init__(self, catalog: ModelCatalog, *, device: torch.device, dtype: torch.dtype,
                 memory_budget: int, input_dir: Path) -> None:
        self.catalog = catalog
        self.device = device
        self.dtype = dtype
        self.memory_budget = memory_budget
        self.input_dir = input_dir
        self.stats = ManagerStats()
        self.lookup: FolderLookup = _Lookup(self)
        self._checkpoints: OrderedDict[str, LoadedCheckpoint] = OrderedDict()
        self._vaes: OrderedDict[str, AutoencoderKL] = OrderedDict()
        self._loras: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.adapters = LoraAdapters()
        # text -> conditioning, keyed by encoder identity and LoRA stack (prompts/cache.py)
        self.prompt_cache = PromptEncoderCache(maxsize=128)
        self._unload_listeners: list[Callable[[str], Any]] = []

    @cached_property
    def embeddings(self) -> EmbeddingLibrary:
        """Textual-inversion embeddings of the models folder, read when a prompt names one."""
        return EmbeddingLibrary(self.catalog.root / "embeddings")

    def stats_snapshot(self) -> dict[str, Any]:
        """Cache hits, misses, evictions, load time and LoRA activity so far, for a job's meta."""
        return {**self.stats.snapshot(), "lora_loads": self.adapters.loads,
                "lora_switches": self.adapters.switches, "loaded": self.loaded_names()}

    # -- names -----------------------------------------------------------------------------

    def choices(self, folder: str) -> list[str]:
        """The names a COMBO input may take: files of a models folder, or images in the input folder."""
        if folder == "input":
            if not self.input_dir.is_dir():
                return []
            return sorted(p.relative_to(self.input_dir).as_posix() for p in self.input_dir.rglob("*")
                          if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return self.catalog.list(folder)

    def resolve(self, folder: str, name: str) -> Path:
        """A file's path, refusing names that leave their folder."""
        if folder == "input":
            return safe_join(self.input_dir, name, what="input image")
        return self.catalog.resolve(folder, name)

    def on_unload(self, listener: Callable[[str], Any]) -> None:
        """Call `listener(checkpoint key)` whenever a checkpoint leaves memory."""
        self._unload_listeners.append(listener)

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(self, name: str) -> LoadedCheckpoint:
        """The loaded checkpoint `name`, loading it (and unloading others to fit) on a miss."""
        path = self.catalog.resolve("checkpoints", name)
        fingerprint = file_fingerprint(path)
        cached = self._checkpoints.get(name)
        if cached is not None and cached.fingerprint == fingerprint:
            self._checkpoints.move_to_end(name)
            self.stats.hits += 1
            return cached
        if cached is not None:  # the file changed on disk: the old weights are stale
            self._unload(name)
        self.stats.misses += 1
        # a pickle name only resolves when the owner allowed weights-only loading (ModelCatalog)
        arch = detect_checkpoint(path, allow_weights_only_pickle=self.catalog.allow_weights_only_pickle)
        # free room first, with the file's size as the estimate: loading next to models that must go
        # anyway would need both in memory at once
        self._make_room(path.stat().st_size)
        started = time.perf_counter()
        pipe = load_checkpoint_pipeline(path, arch, self.device, self.dtype)
        seconds = time.perf_counter() - started
        loaded = LoadedCheckpoint(name, path, arch, pipe, fingerprint, seconds, _pipeline_bytes(pipe))
        self.stats.load_seconds += seconds
        self._make_room(loaded.nbytes)
        self._checkpoints[name] = loaded
        log.info("loaded checkpoint %s (%s, %.1f MB) in %.2f s", name, arch.family, loaded.nbytes / 1e6, seconds)
        return loaded

    def count_hit(self, checkpoints: int = 1) -> None:
        """Count checkpoints a run reused through the node output cache (still in memory) as cache hits."""
        self.stats.hits += checkpoints

    def loaded_names(self) -> list[str]:
        """Checkpoints in memory, least recently used first."""
        return list(self._checkpoints)

    def unload_all(self) -> None:
        """Free every model (after an out-of-memory error, as ComfyUI does)."""
        for name in list(self._checkpoints):
            self._unload(name)
        self._vaes.clear()
        self._loras.clear()
        _free_memory(self.device)

    def _make_room(self, incoming: int) -> None:
        used = sum(c.nbytes for c in self._checkpoints.values())
        while self._checkpoints and used + incoming > self.memory_budget:
            name = next(iter(self._checkpoints))
            used -= self._checkpoints[name].nbytes
            self._unload(name)
            self.stats.evictions += 1

    def _unload(self, name: str) -> None:
        loaded = self._checkpoints.pop(name)
        for listener in self._unload_listeners:
            listener(loaded.key)
        log.info("unloaded checkpoint %s", name)
        del loaded
        _free_memory(self.device)

    # -- VAEs ------------------------------------------------------------------------------

    def vae(self, name: str) -> AutoencoderKL:
        """A standalone VAE file from `vae/`, cached by name and file state."""
        path = self.catalog.resolve("vae", name)
        key = f"{name}:{file_fingerprint(path)}"
        if key not in self._vaes:
            self._vaes[key] = load_vae(path, self.device, self.dtype)
            while len(self._vaes) > 4:
                self._vaes.popitem(last=False)
        self._vaes.move_to_end(key)
        return self._vaes[key]

    # -- LoRAs -----------------------------------------------------------------------------

    def lora_key(self, name: str) -> str:
        """A stable adapter name for a LoRA file in its current state (peft names take no dots)."""
        path = self.catalog.resolve("loras", name)
        digest = hashlib.sha1(f"{name}\0{file_fingerprint(path)}".encode()).hexdigest()[:12]
        return f"lora_{digest}"

    def lora_state(self, name: str) -> dict[str, torch.Tensor]:
        """A LoRA file's tensors (kohya/A1111 or diffusers keys), read once."""
        key = self.lora_key(name)
        if key not in self._loras:
            path = self.catalog.resolve("loras", name)
            try:
                self._loras[key] = load_file(str(path))
            except Exception as err:  # safetensors raises its own error types for broken files
                raise UnsupportedModel(f"LoRA {name!r} could not be read as safetensors: {err}") from err
            while len(self._loras) > 32:
                self._loras.popitem(last=False)
        self._loras.move_to_end(key)
        return self._loras[key]

    def use_unet(self, model: ModelRef) -> torch.nn.Module:
        """The UNet of `model` with exactly its LoRAs active (none: adapters off, the bare weights)."""
        wanted = summed(model.loras, self.lora_key)
        self._wrap_lora_errors(model.loras, model.checkpoint.name,
                               lambda: self.adapters.activate_unet(model.pipe, wanted, self._files(model.loras)))
        return model.pipe.unet

    def use_text_encoders(self, clip: ClipRef) -> list[torch.nn.Module]:
        """The text encoders of `clip` with exactly its LoRAs active."""
        wanted = summed(clip.loras, self.lora_key)
        self._wrap_lora_errors(clip.loras, clip.checkpoint.name,
                               lambda: self.adapters.activate_text_encoders(clip.pipe, wanted, self._files(clip.loras)))
        return [m for m in (clip.pipe.text_encoder, getattr(clip.pipe, "text_encoder_2", None)) if m is not None]

    def _files(self, patches: Sequence[LoraPatch]) -> dict[str, dict[str, torch.Tensor]]:
        return {self.lora_key(p.name): self.lora_state(p.name) for p in patches}

    @staticmethod
    def _wrap_lora_errors(patches: Sequence[LoraPatch], model: str, action: Callable[[], None]) -> None:
        try:
            action()
        except UnsupportedModel as err:
            names = ", ".join(repr(p.name) for p in patches)
            raise UnsupportedModel(f"LoRA {names} does not fit checkpoint {model!r}: {err}") from err


def _pipeline_bytes(pipe: DiffusionPipeline) -> int:
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in component.parameters())
    return total


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
