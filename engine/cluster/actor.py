"""`EngineWorker`: one engine on one device, as a Ray actor. Exactly the engine that runs in-process: its own
executor, node output cache and model cache, running batches with `engine.queue.worker.run_jobs`.

The bot's dispatcher (dispatcher.py) calls it; nothing here knows the queue:

- `facts()`: where it runs (host, process, device, memory budget) once it is up;
- `manifest(names)`: the short hash of each model file the bot lists, None where it has none (pool.py compares);
- `run(jobs)`: a Ray streaming generator: `StepEvent`s while the batch runs, then one `Finished` with each job's
  `Outcome`, the result files as bytes (files = "bytes") and what it holds now (routing.py's `Holdings`);
- `interrupt(job_ids)`: the jobs stop at their next step (a cancel, the time limit, a stop), from another thread
  of the actor (it runs with max_concurrency > 1, so this is answered while `run` works).

The class has no Ray decorator: pool.py makes it remote with each worker's resources (`ray.remote(...)`), and the
tests can build one in-process.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.cluster.files import WireFile, collect_results, write_inputs
from engine.cluster.routing import Holdings, needs_of
from engine.errors import NoodleError
from engine.executor import create_executor
from engine.models.paths import FOLDERS
from engine.nodes import catalog
from engine.queue.worker import BatchJob, Outcome, run_jobs
from engine.settings import EngineSettings, Limits, ModelsSettings

__all__ = ["EngineWorker", "Finished", "StepEvent", "WireJob", "WorkerBusy", "WorkerFacts", "WorkerSpec"]

log = logging.getLogger(__name__)
RECENT_TEXTS = 128  # (checkpoint, text) pairs remembered: the prompt cache's size (ModelManager.prompt_cache)


class WorkerBusy(RuntimeError):
    """The worker is running a batch already: one a bot that died gave it (`noodle worker` outlives the bot), which
    the new bot cannot see. Its jobs go back to the queue; they are not this worker's to fail."""


@dataclass(frozen=True)
class WorkerSpec:
    """How to build one worker: the settings of the machine it runs on."""

    name: str
    models: ModelsSettings
    engine: EngineSettings
    limits: Limits
    files: Literal["bytes", "shared"] = "bytes"


@dataclass(frozen=True)
class WorkerFacts:
    """Where a worker runs, for /queue and the logs."""

    name: str
    host: str
    pid: int
    node_id: str
    device: str  # "cuda:0 (NVIDIA H200)", "cpu"
    dtype: str
    budget_bytes: int
    prompt_reading: tuple[str, str] = ("comfy", "noodle")  # its [engine] prompt_weighting and prompt_syntax


def prompt_reading(settings: EngineSettings) -> tuple[str, str]:
    """How an engine reads prompt text: [engine] prompt_weighting and prompt_syntax. Workers that read it otherwise
    draw another picture from the same job, so a reroll would change with the machine it lands on."""
    return settings.prompt_weighting, settings.prompt_syntax


@dataclass(frozen=True)
class WireJob:
    """One job of a batch as the dispatcher sends it."""

    job_id: str
    workflow: dict[str, Any]  # API format: validated again against this worker's own models folder
    inputs: tuple[WireFile, ...] = ()  # the input images it reads (files = "bytes")


@dataclass(frozen=True)
class StepEvent:
    """A job's progress on the worker (engine.queue.worker.Report's arguments)."""

    job_id: str
    node: str
    value: int
    max: int
    sampler: bool
    seconds: float | None
    steps: int


@dataclass(frozen=True)
class Finished:
    """The batch ended: each job's outcome, its files, and what the worker holds now."""

    outcomes: tuple[Outcome, ...]
    files: tuple[WireFile, ...]
    holdings: Holdings
    loads: int  # checkpoint loads so far (its model cache's misses)
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class EngineWorker:
    """An executor on this process's device, driven by the bot's dispatcher."""

    def __init__(self, spec: WorkerSpec) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.spec = spec
        self._scratch: Path | None = None
        engine = spec.engine
        if spec.files == "bytes":  # its files are sent back; the bot's folders may not exist here
            self._scratch = Path(tempfile.mkdtemp(prefix=f"noodle-worker-{spec.name}-"))
            weakref.finalize(self, shutil.rmtree, self._scratch, True)  # and at the process's exit
            engine = engine.model_copy(update={"output_dir": self._scratch / "output",
                                               "input_dir": self._scratch / "input"})
        self.executor = create_executor(spec.models, engine, spec.limits)
        self._interrupts: set[str] = set()
        self._lock = threading.Lock()
        self._busy = threading.Lock()
        self._texts: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._loras: OrderedDict[str, str] = OrderedDict()  # LoRA -> the checkpoint it was last used with
        self.refusal: str | None = None
        # One thread runs every batch, as the local worker thread does: a thread per batch would pay for a new
        # OpenMP thread team inside torch each time (measured: a 1-step tiny job 68 ms instead of 24 ms).
        self._tasks: queue.Queue[tuple[list[WireJob], queue.Queue[StepEvent | None], list[Outcome]]] = queue.Queue()
        threading.Thread(target=self._device_loop, daemon=True, name=f"noodle-{spec.name}").start()
        log.info("engine worker %s up on %s", spec.name, self.executor.device)

    def facts(self) -> WorkerFacts:
        import ray
        import torch

        device = self.executor.device
        shown = str(device)
        if device.type == "cuda":
            shown = f"{device} ({torch.cuda.get_device_name(device)})"
        return WorkerFacts(self.spec.name, socket.gethostname(), os.getpid(), ray.get_runtime_context().get_node_id(),
                           shown, str(self.executor.models.dtype).removeprefix("torch."),
                           self.executor.models.memory_budget, prompt_reading(self.executor.settings))

    def manifest(self, names: dict[str, list[str]]) -> dict[str, str | None]:
        """"folder/name" -> the short hash of this worker's file of that name, None where it has none."""
        models = self.executor.models
        found: dict[str, str | None] = {}
        for folder, listed in names.items():
            if folder not in FOLDERS:
                continue
            have = set(models.choices(folder))
            for name in listed:
                key = f"{folder}/{name}"
                try:
                    found[key] = models.catalog.short_hash(models.resolve(folder, name)) if name in have else None
                except (NoodleError, OSError):
                    found[key] = None
        return found

    def holdings(self) -> Holdings:
        models = self.executor.models
        loaded = tuple(models.loaded_names())
        with self._lock:
            texts = frozenset(pair for pair in self._texts if pair[0] in loaded)
            loras = frozenset(name for name, ckpt in self._loras.items() if ckpt in loaded)
        return Holdings(loaded, loras, texts, max(0, models.memory_budget - models.resident_bytes()))

    def interrupt(self, job_ids: list[str]) -> None:
        with self._lock:
            self._interrupts.update(job_ids)

    def ping(self) -> str:
        return self.spec.name

    def refused(self, note: str) -> None:
        """The bot will not use this worker, and why (its models differ): `noodle worker` prints it and exits."""
        self.refusal = note
        log.error("the bot refused engine worker %s: %s", self.spec.name, note)

    def status(self) -> dict[str, Any]:
        """What `noodle worker` shows while it runs."""
        stats = self.executor.models.stats
        return {"refused": self.refusal, "busy": self._busy.locked(), "loaded": self.executor.models.loaded_names(),
                "loads": stats.misses}

    def run(self, jobs: list[WireJob]) -> Iterator[StepEvent | Finished]:
        """Run one batch; yields its progress, then `Finished`. One batch at a time."""
        if not self._busy.acquire(blocking=False):
            raise WorkerBusy(f"worker {self.spec.name} is running a batch already")
        started = time.perf_counter()
        try:
            events: queue.Queue[StepEvent | None] = queue.Queue()
            outcomes: list[Outcome] = []
            self._tasks.put((jobs, events, outcomes))
            while (event := events.get()) is not None:
                yield event
            files: tuple[WireFile, ...] = ()
            if self._scratch is not None:
                files = collect_results(self.executor.settings.output_dir, [o.result for o in outcomes])
            yield Finished(tuple(outcomes), files, self.holdings(), self.executor.models.stats.misses,
                           time.perf_counter() - started)
        finally:
            with self._lock:
                self._interrupts.difference_update(job.job_id for job in jobs)
            self._busy.release()

    def _device_loop(self) -> None:
        while True:
            self._work(*self._tasks.get())

    def _work(self, jobs: list[WireJob], events: queue.Queue[StepEvent | None], outcomes: list[Outcome]) -> None:
        try:
            outcomes.extend(self._run_batch(jobs, events))
        except Exception as err:  # a bug of ours: every job of the batch fails with it, the worker lives on
            log.exception("worker %s failed running %s", self.spec.name, [job.job_id for job in jobs])
            outcomes[:] = [Outcome(error=f"the engine worker {self.spec.name} failed unexpectedly "
                                         f"({type(err).__name__}: {err})")] * len(jobs)
        finally:
            events.put(None)

    def _run_batch(self, jobs: list[WireJob], events: queue.Queue[StepEvent | None]) -> list[Outcome]:
        ex = self.executor
        if self._scratch is not None:
            write_inputs(ex.settings.input_dir, [f for job in jobs for f in job.inputs], ex.limits.min_free_disk_mb)
        ready: list[tuple[int, BatchJob]] = []
        outcomes: list[Outcome | None] = [None] * len(jobs)
        for index, job in enumerate(jobs):
            try:
                prompt = ex.validate(job.workflow)
            except NoodleError as err:  # its models folder lacks a file the bot's has, say
                outcomes[index] = Outcome(error=f"on engine worker {self.spec.name}: {err}")
                continue
            ready.append((index, BatchJob(job.job_id, prompt, self._reporter(job.job_id, events),
                                          self._interrupted(job.job_id))))
        for (index, _), outcome in zip(ready, run_jobs(ex, [batch_job for _, batch_job in ready]) if ready else ()):
            outcomes[index] = outcome
        self._remember([job.workflow for job in jobs])
        return [outcome or Outcome(error="not run") for outcome in outcomes]

    def _reporter(self, job_id: str, events: queue.Queue[StepEvent | None]) -> Any:
        def report(node: str, value: int, maximum: int, sampler: bool, seconds: float | None, steps: int) -> None:
            events.put(StepEvent(job_id, node, value, maximum, sampler, seconds, steps))
        return report

    def _interrupted(self, job_id: str) -> Any:
        return lambda: job_id in self._interrupts

    def _remember(self, workflows: list[dict[str, Any]]) -> None:
        """The texts and LoRAs these jobs used, with their checkpoint: what its caches hold now, for routing."""
        nodes = catalog()
        with self._lock:
            for workflow in workflows:
                needs = needs_of(workflow, nodes)
                if not needs.checkpoints:
                    continue
                checkpoint = needs.checkpoints[0]
                for text in needs.texts:
                    self._texts[(checkpoint, text)] = None
                    self._texts.move_to_end((checkpoint, text))
                for lora in needs.loras:
                    self._loras[lora] = checkpoint
                    self._loras.move_to_end(lora)
            while len(self._texts) > RECENT_TEXTS:
                self._texts.popitem(last=False)
            while len(self._loras) > 32:
                self._loras.popitem(last=False)

