"""The executor: runs a validated workflow in topological order with cached node outputs.

It knows nothing of transports: a front end passes a listener for the events and a cancel
check. One executor owns one output cache and one model manager; the queue's worker thread
is its only caller.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.cache import CacheEntry, OutputCache, node_cache_budget, signatures
from engine.cost import validate_within_limits
from engine.errors import JobCancelled, NodeExecutionError, NoodleError
from engine.events import (
    Event,
    Executed,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    Executing,
    ExecutionStart,
    ExecutionSuccess,
    Progress,
)
from engine.device import cpu_runs_bf16, memory_budget, pick_device, pick_dtype, pick_vae_dtype
from engine.heap import reuse_freed_memory
from engine.models.compiled import UnetCompiler
from engine.models.cuda_graphs import UnetGraphs
from engine.models.manager import ModelManager
from engine.models.paths import FOLDERS, ModelCatalog
from engine.nodes import catalog
from engine.nodes.base import Node, Output, RunContext, RunMeta
from engine.settings import EngineSettings, Limits, ModelsSettings
from engine.validate import ValidatedPrompt

log = logging.getLogger(__name__)
TEMP_FOLDER = "temp"  # PreviewImage writes under output_dir/temp, as ComfyUI's temp directory


# every `ui` list an output node names its files in: SaveImage's images, SaveLatent's latents, CheckpointSave's
# checkpoints (a failed run removes them all; results are the images)
WRITTEN_LISTS = ("images", "latents", "checkpoints")


def written_paths(output_dir: Path, ui: dict[str, Any], kinds: tuple[str, ...] = ("output", "temp"),
                  lists: tuple[str, ...] = ("images",)) -> list[Path]:
    """The files one output node's `ui` names in `lists` (ComfyUI's `{"filename", "subfolder", "type"}` entries),
    of `kinds`."""
    roots = {"output": output_dir, TEMP_FOLDER: output_dir / TEMP_FOLDER}
    return [roots[kind] / item.get("subfolder", "") / item["filename"]
            for entries in lists for item in ui.get(entries, ()) if isinstance(item, dict)
            and (kind := item.get("type", "output")) in kinds and kind in roots]


def _files_gone(output_dir: Path, ui: dict[str, Any] | None) -> bool:
    """Whether any file an output node's cached `ui` names is no longer there."""
    return bool(ui) and any(not path.is_file() for path in written_paths(output_dir, ui, lists=WRITTEN_LISTS))


Listener = Callable[[Event], None]


@dataclass(frozen=True)
class RunResult:
    """A finished run: ComfyUI's history `outputs` plus our meta."""

    prompt_id: str
    outputs: dict[str, dict[str, Any]]
    meta: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_id": self.prompt_id, "outputs": self.outputs, "meta": self.meta}


class Executor:
    """Validates and runs workflows; keeps node outputs between runs."""

    def __init__(self, models: ModelManager, settings: EngineSettings, limits: Limits) -> None:
        self.models = models
        self.settings = settings
        self.limits = limits
        self.cache = OutputCache(settings.node_cache_entries,
                                 node_cache_budget(settings.node_cache_bytes, models.device))
        models.on_unload(self.cache.drop_holding)

    @property
    def device(self) -> torch.device:
        return self.models.device

    def validate(self, workflow: Any) -> ValidatedPrompt:
        """Validate against the node catalog and the models folder, and the whole graph's cost against the
        limits (engine/cost/); raises WorkflowInvalid."""
        return validate_within_limits(workflow, catalog(), self.models, self.limits,
                                      syntax=self.settings.prompt_syntax)

    def run(
        self,
        workflow: Any,
        *,
        prompt_id: str | None = None,
        listener: Listener | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> RunResult:
        """Run a workflow (API JSON or already validated); raises NodeExecutionError or JobCancelled."""
        run = self.begin(workflow, prompt_id=prompt_id, listener=listener, is_cancelled=is_cancelled)
        for node_id in run.prompt.order:
            run.compute(node_id)
        return run.finish()

    def begin(
        self,
        workflow: Any,
        *,
        prompt_id: str | None = None,
        listener: Listener | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> Run:
        """Start a run without computing anything: `run` drives it node by node, the queue's batches by hand."""
        prompt = workflow if isinstance(workflow, ValidatedPrompt) else self.validate(workflow)
        return Run(self, prompt, prompt_id or uuid.uuid4().hex, listener or (lambda event: None), is_cancelled)

    def _fingerprint(self, cls: type[Node], prompt: ValidatedPrompt, node_id: str) -> str | None:
        try:
            return cls.fingerprint(dict(prompt.constants.get(node_id, {})), self.models.lookup)
        except NoodleError:
            return None  # the node itself will report the missing file when it runs


class Run:
    """One workflow run in progress: node values so far, its meta, its events.

    Made by `Executor.begin`. Cached node outputs are looked up (and announced, as ComfyUI does)
    when the run starts; `compute` runs one node unless its value is there already, and
    `provide` sets a value computed elsewhere (the queue's batched sampler).
    """

    def __init__(self, executor: Executor, prompt: ValidatedPrompt, prompt_id: str, emit: Listener,
                 is_cancelled: Callable[[], bool]) -> None:
        self.executor, self.prompt, self.prompt_id, self.emit = executor, prompt, prompt_id, emit
        self.is_cancelled = is_cancelled
        nodes = catalog()
        self._classes = {node_id: nodes[prompt.workflow.nodes[node_id].class_type] for node_id in prompt.order}
        self._sigs = signatures(prompt.order, {n: c.__name__ for n, c in self._classes.items()}, prompt.constants,
                                prompt.links, lambda node_id: executor._fingerprint(self._classes[node_id], prompt,
                                                                                   node_id))
        self.meta = RunMeta()
        # extra top-level meta for this run (the queue notes a batch here)
        self.notes: dict[str, Any] = {}
        substituted = _substitutes(prompt, self._classes, executor.models.catalog)
        if substituted:  # pickle names run on the .safetensors beside them: the result says which file ran
            self.meta.models["substituted"] = substituted
            self.notes["notes"] = [f"{folder}: {requested!r} ran on {used!r} (Noodle loads .safetensors only)"
                                   for folder, names in substituted.items() for requested, used in names.items()]
        self._api = prompt.workflow.to_api()
        # what the model cache did for this job (summed over its own nodes, not whatever ran in between)
        self.model_activity: dict[str, float] = dict.fromkeys(_COUNTERS, 0)
        self._started = time.perf_counter()
        self.values: dict[str, tuple[Any, ...]] = {}
        self._ui: dict[str, dict[str, Any]] = {}
        # files this run's output nodes wrote (not cached ones): a failed run removes them, all or nothing
        self._written: list[tuple[str, Path]] = []
        emit(ExecutionStart(prompt_id))
        # Look every node up first: ComfyUI announces the cached set before running anything.
        for node_id in prompt.order:
            entry = executor.cache.get(self._sigs[node_id])
            if entry is not None and _files_gone(executor.settings.output_dir, entry.ui):
                # an output node whose files were removed since (🗑️, retention, a Ray worker sending them to the
                # bot) runs again: its cached entry would name a file that is not there, or by then another's
                executor.cache.discard(self._sigs[node_id])
                entry = None
            if entry is not None:
                self.values[node_id] = entry.values
                if entry.ui:
                    self._ui[node_id] = entry.ui
                _replay_meta(self.meta, node_id, entry.meta)
                self.meta.cached.append(node_id)
                if "models" in entry.meta and "checkpoints" in entry.meta["models"]:
                    # a cached loader output holds its checkpoint in memory: a model cache hit for this job
                    executor.models.count_hit(len(entry.meta["models"]["checkpoints"]))
                    self.model_activity["hits"] += len(entry.meta["models"]["checkpoints"])
        emit(ExecutionCached(prompt_id, tuple(self.meta.cached)))

    def context(self, node_id: str) -> RunContext:
        """What a node sees while it runs."""
        ex = self.executor
        return RunContext(
            node_id=node_id, prompt_id=self.prompt_id, prompt=self._api, models=ex.models,
            device=ex.models.device, dtype=ex.models.dtype, input_dir=ex.settings.input_dir,
            output_dir=ex.settings.output_dir, meta=self.meta, limits=ex.limits,
            temp_dir=ex.settings.output_dir / TEMP_FOLDER,
            report_progress=lambda node, value, total: self.emit(Progress(self.prompt_id, node, value, total)),
            is_cancelled=self.is_cancelled, prompt_weighting=ex.settings.prompt_weighting,
            prompt_syntax=ex.settings.prompt_syntax,
        )

    def inputs(self, node_id: str) -> dict[str, Any]:
        """A node's input values: its constants and the outputs of the nodes linked to it."""
        inputs = dict(self.prompt.constants.get(node_id, {}))
        for name, (src, index) in self.prompt.links.get(node_id, {}).items():
            inputs[name] = self.values[src][index]
        return inputs

    def announce(self, node_id: str) -> None:
        """Tell the listener a node starts (ComfyUI's `executing`)."""
        self.emit(Executing(self.prompt_id, node_id, self._classes[node_id].__name__))

    def compute(self, node_id: str) -> None:
        """Run one node whose inputs are ready, unless its value is known already."""
        if node_id in self.values:
            if node_id in self.meta.cached and node_id in self._ui:
                self.emit(Executed(self.prompt_id, node_id, self._ui[node_id]))
            return
        cls = self._classes[node_id]
        self.announce(node_id)
        ctx = self.context(node_id)
        node_started = time.perf_counter()
        models_before = _copy_models(self.meta.models)
        stats_before = self.executor.models.stats_snapshot()
        try:
            ctx.check_cancelled()
            inputs = self.inputs(node_id)
            for name in self.prompt.links.get(node_id, {}):  # constants were held to their ranges by validation
                cls.check_linked(name, inputs[name])
            node = cls.model_construct(**inputs)
            produced = node.run(ctx)
        except JobCancelled as err:
            self.fail(node_id, err)
            raise
        except Exception as err:  # the edge of one node: name it, keep the cause
            raise self.fail(node_id, err) from err
        finally:
            self.add_model_activity(stats_before)
        out = produced if isinstance(produced, Output) else Output(tuple(produced))
        self.provide(node_id, out, time.perf_counter() - node_started, models_before)

    def provide(self, node_id: str, out: Output, seconds: float, models_before: dict[str, Any] | None = None) -> None:
        """Set a node's output (computed here or by a batch), report it and keep it in the output cache."""
        self.meta.timings[node_id] = seconds
        self.values[node_id] = out.values
        if out.ui:
            self._ui[node_id] = out.ui
            written = written_paths(self.executor.settings.output_dir, out.ui, lists=WRITTEN_LISTS)
            self._written += [(self._sigs[node_id], path) for path in written]
            self.emit(Executed(self.prompt_id, node_id, out.ui))
        part = _meta_of(self.meta, node_id, models_before)
        holds = self.executor.models.keys_held_by(out.values)
        self.executor.cache.put(self._sigs[node_id], CacheEntry(out.values, out.ui, part, holds))

    def add_model_activity(self, stats_before: dict[str, Any]) -> None:
        """Count what the model manager did since `stats_before` (its `stats_snapshot()`) as this job's."""
        after = self.executor.models.stats_snapshot()
        for key in _COUNTERS:
            self.model_activity[key] += after[key] - stats_before[key]

    def discard_written(self) -> None:
        """Remove what this run's output nodes wrote, and forget their cached outputs that point at those files:
        a job that fails or is cancelled leaves no image behind (an earlier SaveImage's PNGs included)."""
        for signature, path in self._written:
            path.unlink(missing_ok=True)
            self.executor.cache.discard(signature)
        self._written.clear()

    def fail(self, node_id: str, err: BaseException) -> NoodleError:
        """The error to raise for a node that failed: JobCancelled as is, anything else named after the node.
        Files the run wrote so far are removed either way."""
        self.discard_written()
        if isinstance(err, JobCancelled):
            self.emit(ExecutionInterrupted(self.prompt_id, node_id))
            return err
        name = self._classes[node_id].__name__
        self.emit(ExecutionError(self.prompt_id, node_id, name, type(err).__name__, str(err)))
        if isinstance(err, OSError):  # the disk's answer (read-only, not a folder): its message says it all
            log.error("node %s (%s) failed: %s", node_id, name, err)
        elif not isinstance(err, NoodleError):
            log.error("node %s (%s) failed", node_id, name, exc_info=err)
        return NodeExecutionError(node_id, name, err)

    def finish(self) -> RunResult:
        """The result, once every output node has run."""
        self.meta.timings["total"] = time.perf_counter() - self._started
        self.emit(ExecutionSuccess(self.prompt_id))
        meta = self.meta.to_dict()
        # checkpoint cache hits, misses, evictions and load time of this job, LoRA adapter loads and switches
        meta["models"].update({key: round(value, 4) if key == "load_seconds" else int(value)
                               for key, value in self.model_activity.items()})
        meta["models"]["loaded"] = self.executor.models.loaded_names()
        meta.update(self.notes)
        outputs = {node_id: self._ui[node_id] for node_id in self.prompt.outputs if node_id in self._ui}
        return RunResult(self.prompt_id, outputs, meta)


def _substitutes(prompt: ValidatedPrompt, classes: dict[str, type[Node]],
                 catalog: ModelCatalog) -> dict[str, dict[str, str]]:
    """Per models folder, the pickle names this run loads as the .safetensors of the same stem
    (ModelCatalog.safetensors_for): {"checkpoints": {"v1-5-pruned-emaonly.ckpt": "v1-5-pruned-emaonly.safetensors"}}."""
    found: dict[str, dict[str, str]] = {}
    for node_id, cls in classes.items():
        constants = prompt.constants.get(node_id, {})
        for spec in cls.input_specs():
            name = constants.get(spec.name)
            if spec.choices_from not in FOLDERS or not isinstance(name, str):
                continue
            try:
                used = catalog.safetensors_for(spec.choices_from, name)
            except NoodleError:
                continue  # a name that leaves its folder: the node refuses it when it runs
            if used is not None:
                found.setdefault(spec.choices_from, {})[name] = used
    return found


def _copy_models(models: dict[str, Any]) -> dict[str, Any]:
    return {section: dict(entries) if isinstance(entries, dict) else entries for section, entries in models.items()}


def _meta_of(meta: RunMeta, node_id: str, models_before: dict[str, Any] | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {}
    if node_id in meta.seeds:
        part["seeds"] = meta.seeds[node_id]
    if node_id in meta.tokens:
        part["tokens"] = meta.tokens[node_id]
    if models_before is not None:
        # what the node added to meta.models (a loader's checkpoint hash, a LoRA's strengths): a cached
        # output must still put the model hash into the PNG of a reroll
        added = {section: {k: v for k, v in entries.items() if models_before.get(section, {}).get(k) != v}
                 for section, entries in meta.models.items() if isinstance(entries, dict)}
        added = {section: entries for section, entries in added.items() if entries}
        if added:
            part["models"] = added
    return part


def _replay_meta(meta: RunMeta, node_id: str, part: dict[str, Any]) -> None:
    if "seeds" in part:
        meta.seeds[node_id] = part["seeds"]
    if "tokens" in part:
        meta.tokens[node_id] = part["tokens"]
    for section, entries in part.get("models", {}).items():
        meta.models.setdefault(section, {}).update(entries)


_COUNTERS = ("hits", "misses", "evictions", "load_seconds", "lora_loads", "lora_switches")


def create_executor(models: ModelsSettings, engine: EngineSettings, limits: Limits) -> Executor:
    """One executor built from settings: its own catalog of model files, model manager and output cache, on the
    configured device."""
    device = pick_device(engine.device)
    if device.type == "cpu" and engine.reuse_cpu_memory:
        reuse_freed_memory()  # already on when `noodle` started this process (engine/heap.py)
    dtype = pick_dtype(engine.dtype, device)
    # (said where this process samples: with Ray workers this executor only validates)
    if engine.workers == "local" and device.type == "cpu" and dtype == torch.float32 and cpu_runs_bf16():
        log.info('this CPU does bfloat16 in hardware (AMX): [engine] dtype = "bfloat16" samples about twice as fast, '
                 "with pictures a little different from float32's (and from ComfyUI's on a CPU)")
    manager = ModelManager(
        ModelCatalog(models.dir, allow_weights_only_pickle=models.allow_weights_only_pickle,
                     hash_cache=models.hash_cache),
        device=device,
        dtype=dtype,
        vae_dtype=pick_vae_dtype(engine.vae_dtype, device, dtype),
        memory_budget=memory_budget(device, engine.model_memory_bytes),
        input_dir=engine.input_dir,
        # inductor's freezing where it is measured to pay: the CPU (engine/models/compiled.py)
        compiler=UnetCompiler(engine.compile_cache, freeze=device.type == "cpu") if engine.compile else None,
        graphs=UnetGraphs() if engine.cuda_graphs and device.type == "cuda" else None,
    )
    if engine.cuda_graphs and device.type != "cuda":
        log.info("[engine] cuda_graphs is on but the device is %s: the UNet runs as it would without", device.type)
    return Executor(manager, engine, limits)
