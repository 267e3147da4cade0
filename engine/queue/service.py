"""`EngineService`: the queue's front door, what a front end (the Discord bot, the console) calls on its loop.

    service = EngineService(executor, settings.bot.database, settings.queue)
    await service.start()                        # resumes the stored queue, starts the worker
    handle = await service.submit(workflow, Owner(user_id, guild_id), extra={"channel_id": ...})
    async for event in handle.events(): ...      # queued, position, started, progress, then done/failed/cancelled
    result = await handle.result(timeout=600)    # RunResult.to_dict(); raises JobFailed or JobCancelled
    await service.stop()

A job is validated, then stored (job_store.py) before `submit` returns; the job table (state_table.py)
keeps every job's state in the fair order (fairness.py) and the worker thread (worker.py) runs them,
compatible ones in one sampler batch (batching.py). Nothing torch-, disk- or PIL-heavy runs on the loop:
validation and database writes go through `asyncio.to_thread`, and events come back with
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import JobCancelled, JobFailed
from engine.executor import Executor
from engine.idle import idle_wait
from engine.models.controlnet.load import controlnet_layout
from engine.models.detect import Arch, detect_checkpoint
from engine.models.paths import file_fingerprint
from engine.queue.batching import batch_key, sampler_steps
from engine.queue.engine_lock import hold_engine_lock, release_engine_lock
from engine.queue.job_store import JobStore
from engine.queue.jobs import JobEvent, JobInfo, JobState, Owner, WorkerInfo
from engine.queue.state_table import KEEP_FINISHED, JobTable
from engine.queue.worker import Worker
from engine.settings import QueueSettings
from engine.validate import ValidatedPrompt

if TYPE_CHECKING:
    from engine.cluster.dispatcher import ClusterConfig, ClusterRunner

__all__ = ["EngineService", "JobHandle"]

log = logging.getLogger(__name__)


class _Stream:
    """Events of one follower: registered when made, so nothing sent after that is missed."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[JobEvent | None] = asyncio.Queue()

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> JobEvent:
        event = await idle_wait(self._queue.get())  # the worker's next event: engine/idle.py
        if event is None:
            self._queue.put_nowait(None)  # stays ended
            raise StopAsyncIteration
        return event

    def put(self, event: JobEvent) -> None:
        self._queue.put_nowait(event)

    def end(self) -> None:
        self._queue.put_nowait(None)


class JobHandle:
    """One job as a front end follows it; also for jobs resumed after a restart (`EngineService.handle`)."""

    def __init__(self, job_id: str, owner: Owner, service: EngineService) -> None:
        self.job_id, self.owner = job_id, owner
        self._service = service
        self._latest: list[JobEvent] = []  # what a new follower is told first: the job's state now
        self._final: JobEvent | None = None
        self._finished = asyncio.Event()
        # a follower that stops iterating is dropped with its stream
        self._streams: weakref.WeakSet[_Stream] = weakref.WeakSet()

    def events(self) -> AsyncIterator[JobEvent]:
        """The job's events, starting with its latest state; ends after done, failed or cancelled."""
        stream = _Stream()
        for event in self._latest:
            stream.put(event)
        if self._final is None:
            self._streams.add(stream)
        else:
            stream.end()
        return stream

    async def result(self, timeout: float | None = None) -> dict[str, Any]:
        """RunResult.to_dict() once done; raises JobFailed, JobCancelled, or TimeoutError after `timeout` s."""
        await asyncio.wait_for(idle_wait(self._finished.wait()), timeout)
        final = self._final
        assert final is not None
        if final.kind == "done":
            return dict(final.result or {})
        if final.kind == "cancelled":
            raise JobCancelled(final.error or "cancelled")
        raise JobFailed(final.error or "failed", self.job_id)

    def position(self) -> int | None:
        """1 when it runs next; None once it runs or ended."""
        return self._service._require().position(self.job_id)

    def _push(self, event: JobEvent) -> None:
        if event.kind == "progress":
            self._latest = [e for e in self._latest if e.kind == "started"] + [event]
        else:
            self._latest = [event]
        if event.final:
            self._final = event
            self._finished.set()
        for stream in list(self._streams):
            stream.put(event)
            if event.final:
                stream.end()
        if event.final:
            self._streams.clear()


class EngineService:
    """The queue a front end submits workflows to; one per process, around one executor.

    `cluster` runs the jobs on engine workers on Ray ([engine] workers = "ray", engine/cluster/); the executor
    here then validates, lists models and names files, and never runs a job."""

    def __init__(self, executor: Executor, db_path: Path, settings: QueueSettings,
                 cluster: ClusterConfig | None = None) -> None:
        self._executor, self._db_path, self.settings = executor, Path(db_path), settings
        self._lock: Any = None  # the database's engine lock while started (engine/queue/engine_lock.py)
        self._cluster = cluster
        self._loop: asyncio.AbstractEventLoop | None = None
        self._table: JobTable | None = None
        self._worker: Worker | None = None
        self._runner: ClusterRunner | None = None
        self._handles: dict[str, JobHandle] = {}
        self._finished: deque[str] = deque()
        self._subscribers: weakref.WeakSet[_Stream] = weakref.WeakSet()
        self._arch: dict[tuple[str, str], Arch] = {}  # ("folder/name", fingerprint) -> family

    @property
    def executor(self) -> Executor:
        """The engine's own executor, for its benches and tests; front ends use the methods below instead, and only
        the worker thread runs it."""
        return self._executor

    # -- what a front end may ask about models and files (it never reaches into the executor) ------------

    @property
    def input_dir(self) -> Path:
        """The folder LoadImage reads (uploads are saved under it)."""
        return self._executor.settings.input_dir

    @property
    def output_dir(self) -> Path:
        """The folder SaveImage writes under."""
        return self._executor.settings.output_dir

    def choices(self, folder: str) -> list[str]:
        """The file names of a models folder (`checkpoints`, `loras`, `vae`, `embeddings`) as workflows name them;
        reads the disk, so call it off the loop."""
        return self._executor.models.choices(folder)

    def model_path(self, folder: str, name: str) -> Path:
        """Where the file `name` of `folder` is (ModelNotFound, or PathRefused for a path that climbs out)."""
        return self._executor.models.resolve(folder, name)

    def short_hash(self, folder: str, name: str) -> str:
        """A1111's "Model hash" of a models file (remembered by the catalog; hashing a new file reads all of it)."""
        return self._executor.models.catalog.short_hash(self.model_path(folder, name))

    def architecture(self, checkpoint: str) -> Arch:
        """The family of a checkpoint from its safetensors header (never its weights), remembered per file version."""
        return self._remembered_arch("checkpoints", checkpoint, lambda path, pickles: detect_checkpoint(
            path, allow_weights_only_pickle=pickles))

    def controlnet_architecture(self, name: str) -> Arch:
        """The family a ControlNet file is for, from its header (a pickle is read whole, where the owner allows it),
        remembered per file version; a file that is no ControlNet raises the loader's own refusal."""
        return self._remembered_arch("controlnet", name, lambda path, pickles: controlnet_layout(
            path, name, allow_weights_only_pickle=pickles).arch)

    def _remembered_arch(self, folder: str, name: str, read: Callable[[Path, bool], Arch]) -> Arch:
        """`read(path, pickles allowed)` once per file version of `folder`/`name`."""
        models = self._executor.models
        path = models.resolve(folder, name)
        key = (f"{folder}/{name}", file_fingerprint(path))
        if key not in self._arch:
            self._arch[key] = read(path, models.catalog.allow_weights_only_pickle)
        return self._arch[key]

    def validate(self, workflow: dict[str, Any]) -> ValidatedPrompt:
        """ComfyUI's validation plus the whole graph's cost (WorkflowInvalid says why not); submit runs it again."""
        return self._executor.validate(workflow)

    async def __aenter__(self) -> EngineService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the database, resume its queued jobs (running ones are retried once), start the worker."""
        if self._table is not None:
            raise RuntimeError("this EngineService is started already")
        self._loop = asyncio.get_running_loop()
        self._lock = hold_engine_lock(self._db_path)  # before anything is read: another engine's jobs are its own
        try:
            store = await asyncio.to_thread(JobStore, self._db_path)
        except BaseException:
            release_engine_lock(self._lock)
            raise
        table = self._table = JobTable(store, self.settings, self._prepare, self._post)
        try:
            resumed = await asyncio.to_thread(table.resume)
        except BaseException:
            self._table = None
            await asyncio.to_thread(store.close)
            release_engine_lock(self._lock)
            raise
        for job in resumed:
            self._handle_for(job.job_id, job.owner)
        if self._cluster is not None:
            from engine.cluster.dispatcher import ClusterRunner  # here: Ray is imported only when configured

            runner = ClusterRunner(table, self._executor, self._cluster)
            try:
                await asyncio.to_thread(runner.start)
            except BaseException:
                table.stop()
                await asyncio.to_thread(runner.stop, 5.0)
                await asyncio.to_thread(store.close)
                release_engine_lock(self._lock)
                self._table = None
                raise
            self._runner = runner
        else:
            self._worker = Worker(self._executor, table)
            self._worker.start()
        log.info("engine service started: %d jobs resumed from %s", len(resumed), self._db_path)

    async def stop(self, timeout: float = 30.0) -> None:
        """Start nothing new; the running job stops at its next step and stays queued for the next start."""
        table, worker = self._table, self._worker
        if table is None:
            return
        table.stop()
        if self._runner is not None:
            await asyncio.to_thread(self._runner.stop, timeout)
            if self._runner.alive():
                log.warning("the engine workers did not stop within %.0f s; leaving them to the process exit",
                            timeout)
                return
        if worker is not None:
            await asyncio.to_thread(worker.join, timeout)
            if worker.is_alive():
                log.warning("the engine worker did not stop within %.0f s; leaving it to the process exit", timeout)
                return
        await asyncio.to_thread(table.store.close)
        release_engine_lock(self._lock)
        # after every event the worker sent: the loop runs callbacks in order
        asyncio.get_running_loop().call_soon(self._end_subscribers)

    async def submit(self, workflow: dict[str, Any], owner: Owner, *, extra: dict[str, Any] | None = None
                     ) -> JobHandle:
        """Validate (WorkflowInvalid, nothing stored), check the caps (QueueFull), store, queue; its handle."""
        table = self._require()
        job = await asyncio.to_thread(table.submit, workflow, owner, dict(extra or {}))
        return self._handle_for(job.job_id, owner)

    def handle(self, job_id: str) -> JobHandle | None:
        """The handle of a job this service knows: submitted here, resumed at start, or recently finished."""
        if job_id in self._handles:
            return self._handles[job_id]
        job = self._table.get(job_id) if self._table is not None else None
        return None if job is None else self._handle_for(job_id, job.owner)

    async def cancel(self, job_id: str, by: Owner | None = None) -> bool:
        """A queued job is removed; a running one stops at its next sampler step. False: unknown, ended, or
        `by` is not its owner (moderators cancel with by=None)."""
        return await asyncio.to_thread(self._require().cancel, job_id, by)

    def jobs(self, owner: Owner | None = None,
             states: Iterable[JobState] = (JobState.QUEUED, JobState.RUNNING)) -> list[JobInfo]:
        """Jobs in `states` (of one user if `owner`): running first, then queued in order, then newest first."""
        return self._require().infos(owner, states)

    def workers(self) -> list[WorkerInfo]:
        """The engine workers: each one's device, what it holds and what it runs (one, in-process, when local)."""
        table = self._require()
        if self._runner is not None:
            return self._runner.workers()
        running = tuple(job.job_id for job in table.infos(None, (JobState.RUNNING,)))
        models = self._executor.models
        return [WorkerInfo("local", "this machine", str(self._executor.device), "running" if running else "idle",
                           tuple(models.loaded_names()), running, 0, models.stats.misses)]

    async def info(self, job_id: str) -> JobInfo | None:
        """Any job this database ever held, in the job table or only on disk (finished before a restart)."""
        table = self._require()
        job = table.get(job_id) or await asyncio.to_thread(table.store.get, job_id)
        return None if job is None else job.info()

    def subscribe(self) -> AsyncIterator[JobEvent]:
        """Every job's events from now on (resumed jobs' results included); ends when the service stops."""
        stream = _Stream()
        self._subscribers.add(stream)
        return stream

    # -- internals -----------------------------------------------------------------------------------

    def _require(self) -> JobTable:
        if self._table is None:
            raise RuntimeError("the engine service is not started: await service.start() first")
        return self._table

    def _prepare(self, workflow: dict[str, Any]) -> tuple[ValidatedPrompt, str | None, int]:
        prompt = self._executor.validate(workflow)
        return prompt, batch_key(prompt), sampler_steps(prompt, self._executor)

    def _post(self, event: JobEvent) -> None:
        """From any thread: deliver on the loop, in order."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            log.debug("event for %s after the loop closed: %s", event.job_id, event.kind)

    def _deliver(self, event: JobEvent) -> None:
        handle = self.handle(event.job_id)
        if handle is not None:
            handle._push(event)
        for stream in list(self._subscribers):
            stream.put(event)
        if event.final:
            self._finished.append(event.job_id)
            while len(self._finished) > KEEP_FINISHED:
                self._handles.pop(self._finished.popleft(), None)

    def _handle_for(self, job_id: str, owner: Owner) -> JobHandle:
        if job_id not in self._handles:
            self._handles[job_id] = JobHandle(job_id, owner, self)
        return self._handles[job_id]

    def _end_subscribers(self) -> None:
        for stream in list(self._subscribers):
            stream.end()
