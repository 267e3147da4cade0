"""`ClusterRunner`: the job table's jobs onto engine workers on Ray, for `EngineService` ([engine] workers = "ray").

The queue stays in the bot's process (the job table and its SQLite store): a job leaves it only when a worker is
free to run it, so there is no second queue to lose. Threads, none of them on the event loop:

- the dispatch thread waits for queued jobs and free workers; `Router` (routing.py) says which free worker
  starts which job, the job table starts that job's batch (`JobTable.start_routed`), and a batch thread runs it;
- a batch thread streams one batch from its worker: progress into the table as it comes, then the files (written
  under the bot's output folder, files.py) and each job's outcome, settled as the local worker does
  (engine.queue.worker.settle). A worker that dies mid-batch (a kill, a lost machine) ends its stream with an
  error: its jobs go back to the front of the queue to run once more elsewhere (`JobTable.lost`), and a worker
  the bot owns is replaced;
- the watch thread tells workers to stop jobs that were cancelled, ran past their time limit, or must stop for
  a shutdown, pings idle workers so a dead one is noticed before it is given a job, and looks for workers that
  `noodle worker` started (pool.py).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from engine.cluster import pool
from engine.cluster.actor import Finished, StepEvent, WireJob, WorkerBusy, prompt_reading
from engine.cluster.files import input_files, place_results, read_inputs
from engine.cluster.pool import RemoteWorker
from engine.cluster.routing import Candidate, Holdings, Needs, Router, needs_of
from engine.executor import Executor
from engine.nodes import catalog
from engine.queue.jobs import JobRecord, JobState, WorkerInfo
from engine.queue.state_table import JobTable
from engine.queue.worker import Outcome, settle
from engine.settings import EngineSettings, ModelsSettings, RaySettings

__all__ = ["ClusterConfig", "ClusterRunner"]

log = logging.getLogger(__name__)
WATCH_SECONDS = 0.05  # how soon a cancel or the time limit reaches a running job on a worker (plus its step)
PING_SECONDS = 2.0  # an idle worker's liveness check
BUSY_POLL_SECONDS = 0.5  # how often a worker busy with an earlier run's batch is asked whether it is free
JOINED_AT_START_SECONDS = 10.0  # how long start waits for the joined workers already up; later ones join meanwhile


@dataclass(frozen=True)
class ClusterConfig:
    """What `EngineService` needs to run its jobs on Ray: the [ray] table, and the [models] and [engine] settings the
    workers it starts get (None: the service's executor's)."""

    ray: RaySettings
    models: ModelsSettings
    engine: EngineSettings | None = None


class ClusterRunner:
    """Runs a job table's jobs on Ray workers; `EngineService` starts and stops it."""

    def __init__(self, table: JobTable, executor: Executor, config: ClusterConfig) -> None:
        self.table, self.executor, self.config = table, executor, config
        self.settings = config.ray
        self.router = Router(self.settings.routing, self.settings.routing_patience)
        self._workers: list[RemoteWorker] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._needs: dict[str, Needs] = {}
        self._avoid: dict[str, set[str]] = {}  # job id -> workers that died running it
        self._manifest: dict[str, str] = {}
        self._reading = prompt_reading(config.engine or executor.settings)  # what every worker's must be
        self._started_ray = False
        self._count = 0
        self._closing = threading.Event()
        self._freed = threading.Event()  # a worker became free or joined: the dispatch thread looks again
        self._joining: threading.Thread | None = None  # the look for joined workers under way, if any

    # -- life ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to Ray, start the bot's workers and wait until they are up (or refused); then dispatch."""
        # before connecting: a local cluster gets a CPU slot for each of them (one per GPU of this machine when
        # [ray] workers = 0); after: "auto" or a remote cluster counts its own GPUs
        self._started_ray = pool.connect(self.settings, pool.owned_count(self.settings))
        count = pool.owned_count(self.settings)
        self._manifest = pool.local_manifest(self.executor.models)
        workers = [self._new_worker() for _ in range(count)]
        pool.wait_up(workers, self._manifest, self._reading)
        with self._lock:
            self._workers.extend(workers)
        # in the join thread, as later looks are: bringing a joined worker up waits until it starts (up to
        # pool.READY_TIMEOUT_S for one Ray cannot place yet), and the bot must not wait that long to start serving;
        # joined workers that are up answer within this wait and take jobs from the first one
        self._joining = threading.Thread(target=self._find_joined, name="noodle-join", daemon=True)
        self._joining.start()
        self._joining.join(JOINED_AT_START_SECONDS)
        self._lanes()
        if not self._up() and not self._joining.is_alive():
            log.error("no engine worker is up: jobs wait in the queue until one is (%s)",
                      "; ".join(f"{w.name}: {w.note}" for w in workers))
        elif not self._up():
            log.warning("no engine worker is up yet: jobs wait in the queue while the joined workers start")
        for target, name in ((self._dispatch, "noodle-dispatch"), (self._watch, "noodle-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float) -> None:
        """After the table stopped: wait for the running batches (they stop at their next step and go back to the
        queue), then end the bot's own workers, and Ray if this runner started it."""
        import ray

        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._closing.set()
        with self._lock:
            owned = [w for w in self._workers if w.spec is not None and w.state == "up"]
        for worker in owned:
            try:
                ray.kill(worker.handle)
            except Exception:  # gone already
                pass
        if self._started_ray:
            ray.shutdown()

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    # -- what /queue shows ---------------------------------------------------------------------------

    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            workers = list(self._workers)
        return [WorkerInfo(w.name, w.facts.host if w.facts else "", w.facts.device if w.facts else "",
                           "running" if w.running else "idle" if w.state == "up" else w.state,
                           w.holdings.checkpoints, tuple(job.job_id for job in w.running), w.jobs_done, w.loads,
                           w.note, joined=w.spec is None) for w in workers]

    # -- dispatching -----------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self.table.stopping:
            if not self._free():
                self._freed.wait(0.5)  # a batch thread sets it when its worker is free, as does a new worker
                self._freed.clear()
                continue
            if not self.table.wait_for_jobs(0.5):
                continue
            try:
                started = self.table.start_routed(self._assign)
            except Exception:  # the store could not be written: those jobs stay queued in it
                log.exception("could not start the next jobs")
                time.sleep(0.5)
                continue
            if not started:  # every queued job waits for a busy worker holding its models
                self._freed.wait(0.1)
                self._freed.clear()
            for worker, batch in started:
                thread = threading.Thread(target=self._run_batch, args=(worker, batch), daemon=True,
                                          name=f"noodle-batch-{worker.name}")
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
                thread.start()

    def _assign(self, queued: list[JobRecord]) -> list[tuple[RemoteWorker, JobRecord]]:
        """Inside the table's lock: the router's picks, each worker marked busy with its job."""
        with self._lock:
            up = [w for w in self._workers if w.state == "up"]
            candidates = [Candidate(w.name, w.holdings, not w.running, w.idle_since) for w in up]
            picks = self.router.assign([(job.job_id, self._needs_of(job)) for job in queued], candidates,
                                       self._avoid)
            by_name = {w.name: w for w in up}
            by_id = {job.job_id: job for job in queued}
            chosen = []
            for pick in picks:
                worker = by_name[pick.worker]
                worker.running = [by_id[pick.job_id]]  # busy from now; the batch's mates join in _run_batch
                worker.reasons = {pick.job_id: pick.reason}
                worker.holdings = self._expected(worker, self._needs_of(by_id[pick.job_id]))
                chosen.append((worker, by_id[pick.job_id]))
            return chosen

    def _expected(self, worker: RemoteWorker, needs: Needs) -> Holdings:
        """What `worker` will hold once a job needing `needs` ran: its checkpoints last, the least recently used
        ones out where they would not fit its memory (file sizes as the estimate), so the next picks route to it
        what it will hold, and not what it will have evicted. It reports the truth after the batch."""
        held = [c for c in worker.holdings.checkpoints if c not in needs.checkpoints] + list(needs.checkpoints)
        budget = worker.facts.budget_bytes if worker.facts else 0
        while len(held) > len(needs.checkpoints) and sum(map(self._size, held)) > budget:
            held.pop(0)
        return replace(worker.holdings, checkpoints=tuple(held),
                       free_bytes=max(0, budget - sum(map(self._size, held))))

    def _size(self, checkpoint: str) -> int:
        try:
            return self.executor.models.resolve("checkpoints", checkpoint).stat().st_size
        except Exception:  # a name the worker reports on
            return 0

    def _needs_of(self, job: JobRecord) -> Needs:
        if job.job_id not in self._needs:
            self._needs[job.job_id] = needs_of(job.workflow, catalog(), self._size)
        return self._needs[job.job_id]

    def _free(self) -> bool:
        with self._lock:
            return any(w.state == "up" and not w.running for w in self._workers)

    # -- one batch on one worker ------------------------------------------------------------------------

    def _run_batch(self, worker: RemoteWorker, batch: list[JobRecord]) -> None:
        import ray

        head = worker.reasons.get(batch[0].job_id, "")
        with self._lock:
            worker.running = list(batch)
            worker.reasons = {job.job_id: head if job is batch[0] else f"{head} (batched with {batch[0].job_id[:8]})"
                              for job in batch}
            worker.interrupted = set()
        for job in batch:
            job.worker = worker.name
        self.router.forget(job.job_id for job in batch)
        by_id = {job.job_id: job for job in batch}
        finished: Finished | None = None
        try:
            wire = [self._wire(job) for job in batch]
            for ref in worker.handle.run.options(num_returns="streaming").remote(wire):
                message = ray.get(ref)
                if isinstance(message, StepEvent):
                    self.table.progress([by_id[message.job_id]], message.node, message.value, message.max,
                                        sampler=message.sampler, seconds=message.seconds, steps=message.steps)
                elif isinstance(message, Finished):
                    finished = message
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
            self._worker_died(worker, batch, err)
            return
        except WorkerBusy:  # (Ray raises the worker's error as an instance of its class)
            self._busy_elsewhere(worker, batch)
            return
        except Exception as err:  # reading an input, a message that would not unpickle: this batch fails
            log.exception("engine worker %s could not run %s", worker.name, list(by_id))
            finished = Finished(tuple(Outcome(error=f"could not run on engine worker {worker.name}: {err}")
                                      for _ in batch), (), worker.holdings, worker.loads, 0.0)
        if finished is None:
            self._worker_died(worker, batch, RuntimeError("its stream ended without a result"))
            return
        outcomes = [self._placed(worker, job, outcome, finished) for job, outcome in zip(batch, finished.outcomes)]
        with self._lock:  # free before its jobs are told they ended: /queue never shows an ended job running
            worker.holdings, worker.loads = finished.holdings, finished.loads
            worker.jobs_done += sum(outcome.result is not None for outcome in outcomes)
            worker.running, worker.reasons, worker.idle_since = [], {}, time.monotonic()
        try:
            settle(self.table, batch, outcomes)
        finally:
            self._forget(batch)
            self._freed.set()
            self.table.wake()

    def _wire(self, job: JobRecord) -> WireJob:
        inputs = ()
        if self.settings.files == "bytes":
            inputs = read_inputs(self.executor.settings.input_dir, input_files(job.workflow, catalog()))
        return WireJob(job.job_id, job.workflow, inputs)

    def _placed(self, worker: RemoteWorker, job: JobRecord, outcome: Outcome, finished: Finished) -> Outcome:
        """A done job's files under the bot's output folder, and where and why it ran in its meta."""
        if outcome.result is None:
            return outcome
        result = outcome.result
        try:
            if self.settings.files == "bytes":
                result = place_results(self.executor.settings.output_dir, result, finished.files,
                                       self.executor.limits.min_free_disk_mb)
        except Exception as err:  # a full disk here: the job fails with why, the others go on
            return Outcome(error=f"its images could not be written on the bot's machine: {err}")
        facts = worker.facts
        result.setdefault("meta", {})["worker"] = {
            "name": worker.name, "host": facts.host if facts else "", "device": facts.device if facts else "",
            "reason": worker.reasons.get(job.job_id, "")}
        return Outcome(result=result)

    def _worker_died(self, worker: RemoteWorker, batch: list[JobRecord], err: BaseException) -> None:
        where = f"engine worker {worker.name}" + (f" on {worker.facts.host}" if worker.facts else "")
        log.error("%s died: %s", where, err)
        with self._lock:
            worker.state, worker.note, worker.running = "dead", f"died: {type(err).__name__}", []
            for job in batch:
                self._avoid.setdefault(job.job_id, set()).add(worker.name)
            self._lanes()
        self.table.lost(batch, where)
        self._forget(batch)  # those that failed; the retried keep their needs and what to avoid
        if worker.spec is not None and not self.table.stopping:
            threading.Thread(target=self._replace, args=(worker,), daemon=True, name="noodle-replace").start()
        self.table.wake()

    def _busy_elsewhere(self, worker: RemoteWorker, batch: list[JobRecord]) -> None:
        """`worker` is running a batch this bot did not give it (a `noodle worker` outlives a bot that died, and
        runs on with that bot's batch): the jobs go back to the front of the queue, for another worker or for
        this one once it is free. Each was failed at once before, and the next one routed there too."""
        log.warning("engine worker %s is still running a batch of an earlier run of the bot; it takes jobs again "
                    "when that ends", worker.name)
        with self._lock:
            worker.state, worker.note, worker.running, worker.reasons = "busy", "finishing an earlier batch", [], {}
            self._lanes()
        self.table.requeue(batch)
        threading.Thread(target=self._wait_free, args=(worker,), daemon=True, name="noodle-busy").start()
        self.table.wake()

    def _wait_free(self, worker: RemoteWorker) -> None:
        """Ask a busy worker how it is until it is free (then it takes jobs) or gone (then it is dead)."""
        import ray

        while not self._closing.is_set():
            time.sleep(BUSY_POLL_SECONDS)
            try:
                busy = ray.get(worker.handle.status.remote(), timeout=PING_SECONDS)["busy"]
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                self._worker_died(worker, [], err)
                return
            except ray.exceptions.GetTimeoutError:
                continue
            if not busy:
                with self._lock:
                    if worker.state == "busy":
                        worker.state, worker.note, worker.idle_since = "up", "", time.monotonic()
                        self._lanes()
                self.table.wake()
                return

    def _replace(self, dead: RemoteWorker) -> None:
        """A new worker for one of the bot's own that died."""
        replacement = self._new_worker()
        pool.wait_up([replacement], self._manifest, self._reading)
        with self._lock:
            if self._closing.is_set():
                return
            self._workers = [w for w in self._workers if w is not dead] + [replacement]
            self._lanes()
        log.warning("engine worker %s replaces %s: %s", replacement.name, dead.name, replacement.state)
        self.table.wake()

    def _new_worker(self) -> RemoteWorker:
        self._count += 1
        name = f"{socket.gethostname().split('.')[0]}-{self._count}"
        spec = pool.owned_specs([name], self.config.models, self.config.engine or self.executor.settings,
                                self.executor.limits, self.settings)[0]
        return RemoteWorker(name, pool.start_actor(spec, self.settings), spec, idle_since=time.monotonic())

    def _forget(self, jobs: list[JobRecord]) -> None:
        for job in jobs:
            if job.state is not JobState.QUEUED:
                self._needs.pop(job.job_id, None)
                self._avoid.pop(job.job_id, None)

    def _up(self) -> list[RemoteWorker]:
        return [w for w in self._workers if w.state == "up"]

    def _lanes(self) -> None:
        self.table.lanes = max(1, len(self._up()))
        self._freed.set()

    # -- watching ---------------------------------------------------------------------------------------

    def _watch(self) -> None:
        pings: dict[Any, RemoteWorker] = {}
        next_ping = next_join = time.monotonic()
        while not self._closing.is_set():
            with self._lock:
                workers = [w for w in self._workers if w.state == "up"]
            for worker in workers:
                stop = [job.job_id for job in worker.running
                        if job.job_id not in worker.interrupted and self.table.interrupted(job)]
                if stop:
                    worker.interrupted.update(stop)
                    worker.handle.interrupt.remote(stop)
            now = time.monotonic()
            if now >= next_ping:
                next_ping = now + PING_SECONDS
                self._check_pings(pings)
                for worker in workers:
                    if not worker.running and worker not in pings.values():
                        pings[worker.handle.ping.remote()] = worker
            if now >= next_join and not self.table.stopping and not (self._joining and self._joining.is_alive()):
                next_join = now + self.settings.join_poll_seconds
                # in a thread of its own: bringing a joined worker up waits until it starts (a machine still
                # importing torch, or one Ray cannot place yet: up to pool.READY_TIMEOUT_S), and meanwhile this
                # loop must go on passing cancels and time limits to the workers and pinging them
                self._joining = threading.Thread(target=self._find_joined, name="noodle-join", daemon=True)
                self._joining.start()
            if self.table.stopping and not any(w.running for w in workers):
                if not any(t.is_alive() for t in self._threads if t.name.startswith("noodle-batch")):
                    return
            time.sleep(WATCH_SECONDS)

    def _check_pings(self, pings: dict[Any, RemoteWorker]) -> None:
        import ray

        if not pings:
            return
        done, _ = ray.wait(list(pings), num_returns=len(pings), timeout=0)
        for ref in done:
            worker = pings.pop(ref)
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                if not worker.running and worker.state == "up":
                    self._worker_died(worker, [], err)

    def _find_joined(self) -> None:
        """Workers `noodle worker` started since the last look: checked, then given jobs."""
        with self._lock:
            known = [pool.actor_id(w.handle) for w in self._workers]
        try:
            found = pool.find_joined(known)
        except Exception:  # Ray's listing failed this once: look again later
            log.debug("could not list the joined workers", exc_info=True)
            return
        if not found:
            return
        for worker in found:
            worker.idle_since = time.monotonic()
        pool.wait_up(found, self._manifest, self._reading)
        for worker in found:
            if worker.state == "refused":
                worker.handle.refused.remote(worker.note)
        with self._lock:  # a command run again under a name replaces its ended or refused run in the list
            names = {w.name for w in found}
            self._workers = [w for w in self._workers if w.name not in names or w.state == "up"] + found
            self._lanes()
        self.table.wake()

