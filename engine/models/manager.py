"""The model manager: loaded checkpoints, merged models and upscalers in an LRU bounded by memory, VAEs, LoRAs.

Checkpoints are loaded once (diffusers single-file loading) and kept while they fit the
budget, most recently used first; a new one unloads the least recently used until it fits,
as ComfyUI's model management does. A merge (engine/nodes/merging.py) makes new weights that
live in node outputs, not here: the manager counts them in the same budget while any value
holds them, and evicting one tells the node cache to let go of it. LoRAs are peft adapters
on the loaded modules: a LoraLoader only names them, and `use_unet` / `use_text_encoders`
switch the adapter set right before a module runs, so changing LoRAs never reloads a
checkpoint from disk; the adapters' bytes count in their checkpoint's (or merge's) share of the budget. Upscale
models (engine/models/upscale/) and ControlNets (engine/models/controlnet/) are kept each in a resident cache (engine/models/resident.py) by name and file state (a diff ControlNet also by its
base model), in the same budget and LRU as checkpoints, and evicting one tells the node cache to let go of it.
Standalone VAEs have a resident cache of their own, outside the budget: the four most recently used.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from engine.errors import UnsupportedModel
from engine.heap import free_cached_memory, return_freed_memory
from engine.images_io import IMAGE_SUFFIXES
from engine.input_folder import INPUT_FOLDERS, LATENT_SUFFIXES
from engine.models.checkpoint import LoadedCheckpoint
from engine.models.compiled import UnetCompiler
from engine.models.controlnet.load import LoadedControlNet, controlnet_layout, load_controlnet
from engine.models.controlnet.residuals import chain_of
from engine.models.cuda_graphs import UnetGraphs
from engine.models.detect import detect_checkpoint
from engine.models.lora import LoraAdapters, summed
from engine.models.lora_files import LoraFiles
from engine.models.merges import MergeBook, MergedModel
from engine.models.paths import FolderLookup, ModelCatalog, file_fingerprint, safe_join
from engine.models.resident import ResidentCache
from engine.models.single_file import check_checkpoint_layout, load_checkpoint_pipeline, load_vae
from engine.models.upscale import UpscaleModel, load_upscaler, upscaler_key
from prompts.cache import PromptEncoderCache
from prompts.embeddings import EmbeddingLibrary
from engine.values import ClipRef, Conditioning, ControlNetRef, LoraPatch, ModelRef

log = logging.getLogger(__name__)


class _Weighed(Protocol):
    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=_Weighed)


@dataclass
class ManagerStats:
    """Counters a job's meta reports: checkpoint cache hits, misses, evictions and load time; upscaler reuse."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    upscale_hits: int = 0  # an UpscaleModelLoader served from memory
    upscale_loads: int = 0  # ... or read from disk

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
                 memory_budget: int, input_dir: Path, compiler: UnetCompiler | None = None,
                 vae_dtype: torch.dtype | None = None, graphs: UnetGraphs | None = None) -> None:
        self.catalog = catalog
        self.compiler = compiler  # [engine] compile: the UNet's compiled forward for plain runs
        self.graphs = graphs  # [engine] cuda_graphs: the UNet's call replayed as CUDA graphs for plain runs
        self.device = device
        self.dtype = dtype
        self.vae_dtype = dtype if vae_dtype is None else vae_dtype  # [engine] vae_dtype (engine/device.py)
        self.memory_budget = memory_budget
        self.input_dir = input_dir
        self.stats = ManagerStats()
        self.lookup: FolderLookup = _Lookup(self)
        self._checkpoints: OrderedDict[str, LoadedCheckpoint] = OrderedDict()
        self._merges = MergeBook()
        self._clock = itertools.count(1)
        self._vaes: ResidentCache[AutoencoderKL] = ResidentCache("VAE", self._clock, max_entries=4)
        self._upscalers: ResidentCache[UpscaleModel] = ResidentCache("upscale model", self._clock)  # by model_key
        self._controlnets: ResidentCache[LoadedControlNet] = ResidentCache("ControlNet", self._clock)
        self._budgeted: tuple[ResidentCache[Any], ...] = (self._upscalers, self._controlnets)  # in memory_budget
        self.lora_files = LoraFiles(catalog)
        self.adapters = LoraAdapters(on_resize=self._adapters_resized)
        # text -> conditioning, keyed by encoder identity and LoRA stack (prompts/cache.py)
        self.prompt_cache = PromptEncoderCache(maxsize=128)
        self._unload_listeners: list[Callable[[str], Any]] = []
        self._compiled_used = 0  # the clock at the last run through the compiled UNet

    @cached_property
    def embeddings(self) -> EmbeddingLibrary:
        """Textual-inversion embeddings of the models folder, read when a prompt names one."""
        return EmbeddingLibrary(self.catalog.root / "embeddings")

    def stats_snapshot(self) -> dict[str, Any]:
        """Cache hits, misses, evictions, load time and LoRA activity so far, for a job's meta."""
        return {**self.stats.snapshot(), "lora_loads": self.adapters.loads, "lora_switches": self.adapters.switches,
                "lora_removals": self.adapters.removals, "loaded": self.loaded_names()}

    # -- names -----------------------------------------------------------------------------

    def choices(self, folder: str) -> list[str]:
        """The names a COMBO input may take: files of a models folder, or images ("input") or .latent files
        ("input_latents") in the input folder."""
        if folder in INPUT_FOLDERS:
            if not self.input_dir.is_dir():
                return []
            suffixes = IMAGE_SUFFIXES if folder == "input" else LATENT_SUFFIXES
            return sorted(p.relative_to(self.input_dir).as_posix() for p in self.input_dir.rglob("*")
                          if p.is_file() and p.suffix.lower() in suffixes)
        return self.catalog.list(folder)

    def resolve(self, folder: str, name: str) -> Path:
        """A file's path, refusing names that leave their folder."""
        if folder in INPUT_FOLDERS:
            return safe_join(self.input_dir, name, what="input image" if folder == "input" else "input latent")
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
            cached.used = next(self._clock)
            self.stats.hits += 1
            return cached
        if cached is not None:  # the file changed on disk: the old weights are stale
            self._unload(name)
        self.stats.misses += 1
        # a pickle name only resolves when the owner allowed weights-only loading (ModelCatalog)
        arch = detect_checkpoint(path, allow_weights_only_pickle=self.catalog.allow_weights_only_pickle)
        # a file its header shows is broken (a weight missing) is refused before anything is evicted for it
        check_checkpoint_layout(path, arch)
        # free room first, with the file's size as the estimate: loading next to models that must go
        # anyway would need both in memory at once
        self._make_room(path.stat().st_size)
        started = time.perf_counter()
        pipe = load_checkpoint_pipeline(path, arch, self.device, self.dtype, layout_checked=True)
        if pipe.vae.dtype != self.vae_dtype:  # its own precision: bfloat16 on most GPUs, as ComfyUI's
            pipe.vae.to(self.vae_dtype)
        seconds = time.perf_counter() - started
        return_freed_memory()  # the loader's conversion buffers, kept by the CPU heap reuse otherwise
        loaded = LoadedCheckpoint(name, path, arch, pipe, fingerprint, seconds, _pipeline_bytes(pipe),
                                  next(self._clock))
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
        for key in self._merges.keys():
            self._drop_merge(key)
        for cache in self._budgeted:
            for key in cache:
                self._drop(cache, key)
        self._vaes.clear()
        self.lora_files.clear()
        if self.graphs is not None:
            self.graphs.clear()
        free_cached_memory(self.device)

    def resident_bytes(self) -> int:
        """What the loaded checkpoints, live merges, upscalers, ControlNets and frozen compiled graphs take: the
        number held under `memory_budget` (standalone VAEs are not counted)."""
        return (sum(c.nbytes for c in self._checkpoints.values()) + self._merges.nbytes()
                + sum(cache.nbytes() for cache in self._budgeted) + (self.compiler.nbytes if self.compiler else 0))

    def _make_room(self, incoming: int, keep: frozenset[str] = frozenset()) -> None:
        """Evict the least recently used checkpoints, merges, upscalers, ControlNets and compiled graphs, never
        those in `keep`, until `incoming` fits."""
        while self.resident_bytes() + incoming > self.memory_budget:
            # (last use, key, how it leaves): one clock for every kind, so the oldest use goes first
            candidates: list[tuple[int, str, Callable[[str], None]]] = [
                (c.used, name, self._unload) for name, c in self._checkpoints.items() if c.key not in keep]
            candidates += [(used, key, self._drop_merge) for used, key in self._merges.last_used(keep)]
            for cache in self._budgeted:
                candidates += [(used, key, partial(self._drop, cache)) for used, key in cache.last_used(keep)]
            compiler = self.compiler
            if compiler is not None and compiler.nbytes:  # frozen graphs: all go at once (compiled.py)
                candidates.append((self._compiled_used, "compiled UNet graphs", lambda _: compiler.clear()))
            if not candidates:
                return
            _, victim, drop = min(candidates, key=lambda candidate: candidate[:2])
            drop(victim)
            self.stats.evictions += 1

    def _unload(self, name: str) -> None:
        loaded = self._checkpoints.pop(name)
        for listener in self._unload_listeners:
            listener(loaded.key)
        # a merge shares this checkpoint's other components: keeping it would keep them, uncounted
        for key in self._merges.children(loaded.key):
            self._drop_merge(key)
        log.info("unloaded checkpoint %s", name)
        if self.compiler is not None:
            self.compiler.forget(loaded.pipe.unet)
        del loaded
        free_cached_memory(self.device)

    # -- merged models ---------------------------------------------------------------------

    def adopt_merge(self, pipe: DiffusionPipeline, modules: Sequence[torch.nn.Module], parent: LoadedCheckpoint,
                    label: str) -> None:
        """Count a merge's new `modules` (held by `pipe`, which shares `parent`'s other components) in the
        budget, evicting the least recently used other models to fit it."""
        nbytes = sum(_module_bytes(module) for module in modules)
        self._make_room(nbytes, keep=frozenset({parent.key}))
        tick = next(self._clock)
        merge = MergedModel(f"merge:{tick}", label, parent.key, weakref.ref(pipe), nbytes, tick)
        self._merges.add(merge)
        if self.resident_bytes() > self.memory_budget:
            log.warning("%s (%.1f MB) and its checkpoint %s are over the model budget of %.1f MB ([engine] "
                        "model_memory_bytes); kept for this job, evicted by the next load", label, nbytes / 1e6,
                        parent.name, self.memory_budget / 1e6)
        log.info("merged %s: %.1f MB of new weights", label, nbytes / 1e6)

    def merge_labels(self) -> list[str]:
        """The merges whose weights are in memory and counted, least recently used first."""
        return self._merges.labels()

    def keys_held_by(self, values: Iterable[Any]) -> frozenset[str]:
        """The checkpoints and merges that node output `values` keep in memory; a cache drops them with those."""
        keys: set[str] = set()
        for value in values:
            checkpoint = getattr(value, "checkpoint", None)
            if checkpoint is not None:
                keys.add(checkpoint.key)
            if getattr(value, "checkpoint_key", ""):
                keys.add(value.checkpoint_key)
            if isinstance(value, Conditioning):  # conds after ControlNetApply hold their ControlNets
                keys.update(hint.control_net.checkpoint_key for item in value.items for hint in chain_of(item))
            if isinstance(value, UpscaleModel):
                keys.add(value.model_key)
            merge = self._merges.of(getattr(value, "pipe", None))
            if merge is not None:
                keys.add(merge.key)
        return frozenset(keys)

    def _touch(self, checkpoint: LoadedCheckpoint, pipe: DiffusionPipeline) -> None:
        """A model runs: its checkpoint (and merge) become the most recently used."""
        checkpoint.used = next(self._clock)
        merge = self._merges.of(pipe)
        if merge is not None:
            merge.used = next(self._clock)

    def _drop_merge(self, key: str) -> None:
        merge = self._merges.pop(key)
        for listener in self._unload_listeners:  # the node cache lets go of the outputs holding it
            listener(key)
        log.info("dropped merged model %s", merge.label)
        pipe = merge.pipe()
        if self.compiler is not None and pipe is not None:
            self.compiler.forget(pipe.unet)

    # -- VAEs ------------------------------------------------------------------------------

    def vae(self, name: str) -> AutoencoderKL:
        """A standalone VAE file from `vae/`, cached by name and file state."""
        path = self.catalog.resolve("vae", name)
        fingerprint = file_fingerprint(path)
        key = f"{name}:{fingerprint}"
        cached = self._vaes.get(key)
        if cached is None:
            cached = load_vae(path, self.device, self.vae_dtype)
            self._vaes.add(key, cached, name, fingerprint, _module_bytes(cached))
        return cached

    # -- ControlNets -----------------------------------------------------------------------

    def controlnet(self, name: str, base: ModelRef | None = None) -> ControlNetRef:
        """The ControlNet `name` from `controlnet/`, loaded once per file state (and, for a diff ControlNet, per
        base model) and kept in the model budget like a checkpoint."""
        path = self.catalog.resolve("controlnet", name)
        fingerprint = file_fingerprint(path)
        key = f"controlnet:{name}:{fingerprint}"
        pickles = self.catalog.allow_weights_only_pickle
        if base is not None and controlnet_layout(path, name, allow_weights_only_pickle=pickles).diff:
            if base.loras:
                raise UnsupportedModel(f"ControlNet {name!r} is a diff ControlNet and its model carries LoRAs; "
                                       "ComfyUI adds the LoRA'd weights to it and Noodle adds only the checkpoint's: "
                                       "connect DiffControlNetLoader to the model before its LoRA loaders")
            merge = self._merges.of(base.pipe)
            key += f":{merge.key if merge is not None else base.checkpoint.key}"
        cached = self._controlnets.get(key)
        if cached is None:
            unet = base.pipe.unet if base is not None else None
            cached = self._load_resident(self._controlnets, key, name, fingerprint, path, lambda: load_controlnet(
                path, name, key, self.device, self.dtype, unet, allow_weights_only_pickle=pickles))
            log.info("loaded ControlNet %s (%s, %.1f MB) in %.2f s", name, cached.layout.describe(),
                     cached.nbytes / 1e6, cached.load_seconds)
        shuffle = Path(name).stem.endswith(("_shuffle", "_shuffle_fp16"))  # comfy/controlnet.py load_controlnet
        return ControlNetRef(cached.module, name, cached.layout.family, cached.layout.arch.tiny, key, shuffle)

    # -- upscale models --------------------------------------------------------------------

    def upscale_model(self, name: str) -> UpscaleModel:
        """The upscaler `name` from `upscale_models/`, loaded once per file state and kept in the model budget."""
        path = self.catalog.resolve("upscale_models", name)
        fingerprint = file_fingerprint(path)
        key = upscaler_key(name, fingerprint)
        cached = self._upscalers.get(key)
        if cached is not None:
            self.stats.upscale_hits += 1
            return cached
        self.stats.upscale_loads += 1
        loaded = self._load_resident(self._upscalers, key, name, fingerprint, path,
                                     lambda: load_upscaler(path, name, fingerprint, self.device))
        log.info("loaded upscale model %s (%s, %.1f MB) in %.2f s", name, loaded.spec.describe(), loaded.nbytes / 1e6,
                 loaded.load_seconds)
        return loaded

    def use_upscaler(self, model: UpscaleModel) -> torch.nn.Module:
        """The module of `model`, which becomes the most recently used model."""
        self._upscalers.touch(model.model_key)
        return model.module

    def upscaler_names(self) -> list[str]:
        """Upscale models in memory, least recently used first."""
        return self._upscalers.names()

    # -- ControlNets and upscale models alike ----------------------------------------------

    def _load_resident(self, cache: ResidentCache[T], key: str, name: str, fingerprint: str, path: Path,
                       load: Callable[[], T]) -> T:
        """Load a model of `cache`'s kind in the budget: its file's older states dropped, room made first."""
        for stale in cache.stale(name, fingerprint):  # the file changed on disk
            self._drop(cache, stale)
        # the file's size as the estimate first, as for a checkpoint, then what it takes once loaded
        self._make_room(path.stat().st_size)
        loaded = load()
        self._make_room(loaded.nbytes)
        return cache.add(key, loaded, name, fingerprint, loaded.nbytes)

    def _drop(self, cache: ResidentCache[Any], key: str) -> None:
        dropped = cache.pop(key)
        for listener in self._unload_listeners:  # the node cache lets go of the outputs holding it
            listener(key)
        log.info("unloaded %s %s", cache.kind, dropped.name)
        del dropped
        free_cached_memory(self.device)

    # -- LoRAs -----------------------------------------------------------------------------

    def lora_key(self, name: str) -> str:
        """A stable adapter name for a LoRA file in its current state (engine/models/lora_files.py)."""
        return self.lora_files.key(name)

    def lora_state(self, name: str) -> dict[str, torch.Tensor]:
        """A LoRA file's tensors, read once (a broken file fails here, naming it)."""
        return self.lora_files.state(name)

    def use_unet(self, model: ModelRef) -> torch.nn.Module:
        """The UNet of `model` with exactly its LoRAs active (none: adapters off, the bare weights)."""
        wanted = summed(model.loras, self.lora_key)
        self._touch(model.checkpoint, model.pipe)
        self._activate(model, lambda: self.adapters.activate_unet(model.pipe, wanted, self.lora_files.of(model.loras)))
        return model.pipe.unet

    def unet_forward(self, model: ModelRef, unet: torch.nn.Module, *, hooked: bool) -> Callable[..., Any] | None:
        """The forward of `unet` for a run of `model`: compiled ([engine] compile), replayed as CUDA graphs ([engine]
        cuda_graphs), both, or None to call it eager: when both are off, or when the run hooks the UNet (`hooked`:
        UNet patches, CFG hooks) or has LoRAs."""
        if hooked or model.loras:
            return None
        forward = None
        if self.compiler is not None:
            self._compiled_used = next(self._clock)
            forward = self.compiler.forward(unet, partial(self._admit_graph, self._keys_of(model)))
        graphed = None if self.graphs is None else self.graphs.forward(unet, forward)
        return graphed or forward

    def _admit_graph(self, keep: frozenset[str], nbytes: int) -> bool:
        """Whether a frozen graph's copy of `nbytes` fits the model budget, once the least recently used other
        models (older graphs too) are evicted for it."""
        self._make_room(nbytes, keep)
        return self.resident_bytes() + nbytes <= self.memory_budget

    def use_text_encoders(self, clip: ClipRef) -> list[torch.nn.Module]:
        """The text encoders of `clip` with exactly its LoRAs active."""
        wanted = summed(clip.loras, self.lora_key)
        self._touch(clip.checkpoint, clip.pipe)
        self._activate(clip, lambda: self.adapters.activate_text_encoders(clip.pipe, wanted,
                                                                          self.lora_files.of(clip.loras)))
        return [m for m in (clip.pipe.text_encoder, getattr(clip.pipe, "text_encoder_2", None)) if m is not None]

    def _activate(self, value: ModelRef | ClipRef, action: Callable[[], None]) -> None:
        """Switch `value`'s LoRAs with `action`; adapters it loaded count in the budget, so others may go."""
        loads = self.adapters.loads
        self._wrap_lora_errors(value.loras, value.checkpoint.name, action)
        if self.adapters.loads != loads:
            self._make_room(0, keep=self._keys_of(value))

    def _keys_of(self, model: ModelRef | ClipRef) -> frozenset[str]:
        """The checkpoint (and merge) a MODEL or CLIP value runs on: kept while it runs."""
        merge = self._merges.of(model.pipe)
        return frozenset({model.checkpoint.key} | ({merge.key} if merge is not None else set()))

    def _adapters_resized(self, module: torch.nn.Module, nbytes: int) -> None:
        """Count LoRA adapters added to (or removed from) `module` in the bytes of the model that owns it: its
        checkpoint, or the merge that made it (a merge shares its checkpoint's other modules)."""
        owner: LoadedCheckpoint | MergedModel | None = next(
            (c for c in self._checkpoints.values() if _holds(c.pipe, module)), None)
        if owner is None:
            owner = next((merge for merge, pipe in self._merges.live() if _holds(pipe, module)), None)
        if owner is not None:
            owner.nbytes += nbytes

    @staticmethod
    def _wrap_lora_errors(patches: Sequence[LoraPatch], model: str, action: Callable[[], None]) -> None:
        try:
            action()
        except UnsupportedModel as err:
            names = ", ".join(repr(p.name) for p in patches)
            raise UnsupportedModel(f"LoRA {names} does not fit checkpoint {model!r}: {err}") from err


def _holds(pipe: DiffusionPipeline, module: torch.nn.Module) -> bool:
    return any(component is module for component in pipe.components.values())


def _pipeline_bytes(pipe: DiffusionPipeline) -> int:
    return sum(_module_bytes(c) for c in pipe.components.values() if isinstance(c, torch.nn.Module))


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
