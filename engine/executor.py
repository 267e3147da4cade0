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
from typing import Any

import torch

from engine.cache import CacheEntry, OutputCache, signatures
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
from engine.models.manager import ModelManager
from engine.nodes import catalog
from engine.nodes.base import Node, Output, RunContext, RunMeta
from engine.settings import EngineSettings, Limits
from engine.validate import ValidatedPrompt, validate

log = logging.getLogger(__name__)

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
        self.cache = OutputCache(settings.node_cache_entries)
        models.on_unload(self.cache.drop_holding)

    @property
    def device(self) -> torch.device:
        return self.models.device

    def validate(self, workflow: Any) -> ValidatedPrompt:
        """Validate against the node catalog and the models folder; raises WorkflowInvalid."""
        return validate(workflow, catalog(), self.models.choices, self.limits)

    def run(
        self,
        workflow: Any,
        *,
        prompt_id: str | None = None,
        listener: Listener | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> RunResult:
        """Run a workflow (API JSON or already validated); raises NodeExecutionError or JobCancelled."""
        prompt = workflow if isinstance(workflow, ValidatedPrompt) else self.validate(workflow)
        prompt_id = prompt_id or uuid.uuid4().hex
        emit = listener or (lambda event: None)
        nodes = catalog()
        class_types = {node_id: prompt.workflow.nodes[node_id].class_type for node_id in prompt.order}
        sigs = signatures(prompt.order, class_types, prompt.constants, prompt.links,
                          lambda node_id: self._fingerprint(nodes[class_types[node_id]], prompt, node_id))
        meta = RunMeta()
        api = prompt.workflow.to_api()
        temp_dir = self.settings.output_dir / "temp"
        started = time.perf_counter()
        emit(ExecutionStart(prompt_id))

        # Look every node up first: ComfyUI announces the cached set before running anything.
        values: dict[str, tuple[Any, ...]] = {}
        ui: dict[str, dict[str, Any]] = {}
        for node_id in prompt.order:
            entry = self.cache.get(sigs[node_id])
            if entry is not None:
                values[node_id] = entry.values
                if entry.ui:
                    ui[node_id] = entry.ui
                _replay_meta(meta, node_id, entry.meta)
                meta.cached.append(node_id)
        emit(ExecutionCached(prompt_id, tuple(meta.cached)))

        def report(node: str, value: int, total: int) -> None:
            emit(Progress(prompt_id, node, value, total))

        for node_id in prompt.order:
            if node_id in values:
                if node_id in ui:
                    emit(Executed(prompt_id, node_id, ui[node_id]))
                continue
            cls = nodes[class_types[node_id]]
            emit(Executing(prompt_id, node_id, cls.__name__))
            ctx = RunContext(
                node_id=node_id, prompt_id=prompt_id, prompt=api, models=self.models,
                device=self.models.device, dtype=self.models.dtype, input_dir=self.settings.input_dir,
                output_dir=self.settings.output_dir, meta=meta, limits=self.limits, temp_dir=temp_dir,
                report_progress=report, is_cancelled=is_cancelled, prompt_weighting=self.settings.prompt_weighting,
            )
            node_started = time.perf_counter()
            try:
                ctx.check_cancelled()
                node = cls.model_construct(**self._inputs(prompt, node_id, values))
                produced = node.run(ctx)
            except JobCancelled:
                emit(ExecutionInterrupted(prompt_id, node_id))
                raise
            except Exception as err:  # the edge of one node: name it, keep the cause
                wrapped = NodeExecutionError(node_id, cls.__name__, err)
                emit(ExecutionError(prompt_id, node_id, cls.__name__, type(err).__name__, str(err)))
                if not isinstance(err, NoodleError):
                    log.exception("node %s (%s) failed", node_id, cls.__name__)
                raise wrapped from err
            meta.timings[node_id] = time.perf_counter() - node_started
            out = produced if isinstance(produced, Output) else Output(tuple(produced))
            values[node_id] = out.values
            if out.ui:
                ui[node_id] = out.ui
                emit(Executed(prompt_id, node_id, out.ui))
            self.cache.put(sigs[node_id], CacheEntry(out.values, out.ui, _meta_of(meta, node_id), _holds(out.values)))

        meta.timings["total"] = time.perf_counter() - started
        emit(ExecutionSuccess(prompt_id))
        outputs = {node_id: ui[node_id] for node_id in prompt.outputs if node_id in ui}
        return RunResult(prompt_id, outputs, meta.to_dict())

    def _inputs(self, prompt: ValidatedPrompt, node_id: str, values: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
        inputs = dict(prompt.constants.get(node_id, {}))
        for name, (src, index) in prompt.links.get(node_id, {}).items():
            inputs[name] = values[src][index]
        return inputs

    def _fingerprint(self, cls: type[Node], prompt: ValidatedPrompt, node_id: str) -> str | None:
        try:
            return cls.fingerprint(dict(prompt.constants.get(node_id, {})), self.models.lookup)
        except NoodleError:
            return None  # the node itself will report the missing file when it runs


def _meta_of(meta: RunMeta, node_id: str) -> dict[str, Any]:
    part: dict[str, Any] = {}
    if node_id in meta.seeds:
        part["seeds"] = meta.seeds[node_id]
    if node_id in meta.tokens:
        part["tokens"] = meta.tokens[node_id]
    return part


def _replay_meta(meta: RunMeta, node_id: str, part: dict[str, Any]) -> None:
    if "seeds" in part:
        meta.seeds[node_id] = part["seeds"]
    if "tokens" in part:
        meta.tokens[node_id] = part["tokens"]


def _holds(values: tuple[Any, ...]) -> frozenset[str]:
    keys = set()
    for value in values:
        checkpoint = getattr(value, "checkpoint", None)
        if checkpoint is not None:
            keys.add(checkpoint.key)
        if getattr(value, "checkpoint_key", ""):
            keys.add(value.checkpoint_key)
    return frozenset(keys)
