"""Ray and the workers on it: connecting, starting the bot's own workers, finding the ones `noodle worker` started,
and checking each worker's models folder against the bot's before it gets a job.

Workers the bot starts (`start`) are Ray actors it owns: they go when the bot goes, and the dispatcher starts a
new one when one dies. Workers `noodle worker --address ...` started on another machine (join.py) are named
actors under [ray] namespace, owned by that command: the bot finds them every [ray] join_poll_seconds
(`joined`), and when one dies its machine's owner runs the command again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.cluster.actor import EngineWorker, WorkerFacts, WorkerSpec
from engine.cluster.routing import Holdings
from engine.errors import ClusterUnavailable
from engine.models.paths import FOLDERS
from engine.queue.jobs import JobRecord
from engine.settings import EngineSettings, Limits, ModelsSettings, RaySettings

__all__ = ["JOINED_PREFIX", "RemoteWorker", "actor_id", "check_models", "connect", "find_joined", "local_manifest",
           "owned_specs", "start_actor", "wait_up"]

log = logging.getLogger(__name__)
JOINED_PREFIX = "noodle-worker:"  # the Ray actor names `noodle worker` registers
READY_TIMEOUT_S = 600.0  # a worker's start: imports, CUDA, the first cuBLAS handle; not model loads


@dataclass(eq=False)
class RemoteWorker:
    """One worker as the dispatcher keeps it."""

    name: str
    handle: Any  # ray.actor.ActorHandle
    spec: WorkerSpec | None  # how to start it again; None: joined (its own machine's `noodle worker`)
    facts: WorkerFacts | None = None
    holdings: Holdings = Holdings()
    running: list[JobRecord] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # job id -> why it runs here
    interrupted: set[str] = field(default_factory=set)  # job ids told to stop
    idle_since: float = 0.0
    jobs_done: int = 0
    loads: int = 0
    state: str = "starting"  # starting, up, refused, dead
    note: str = ""  # why refused or dead


def connect(settings: RaySettings, workers: int) -> bool:
    """Join or start Ray unless this process is connected already; whether this call started it."""
    try:
        import ray
    except ImportError as err:  # a pip install without the extra
        raise ClusterUnavailable("[engine] workers = \"ray\" needs Ray: pip install 'noodle-bot[ray]' (`make install` "
                           "installs it), or set [engine] workers = \"local\"") from err

    if ray.is_initialized():
        return False
    if settings.address == "local":
        # one CPU slot per worker: Ray also tells torch in each actor to use that many threads
        ray.init(num_cpus=max(1, round(workers * settings.cpus_per_worker)), namespace=settings.namespace,
                 include_dashboard=False, runtime_env=_runtime_env())
    else:
        try:
            ray.init(address=settings.address, namespace=settings.namespace, runtime_env=_runtime_env())
        except (ConnectionError, ValueError) as err:
            raise ClusterUnavailable(f"could not reach the Ray cluster at [ray] address = {settings.address!r}: {err}; "
                               "start it (`ray start --head` on its head machine), or set address = \"local\" "
                               "for a cluster on this machine") from err
    log.info("connected to Ray (%s): %s", settings.address, ray.cluster_resources())
    return True


def _runtime_env() -> dict[str, Any]:
    """The offline switches the engine relies on (no model hub at run time), for every worker process."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")
    return {"env_vars": {name: os.environ[name] for name in names if name in os.environ}}


def owned_count(settings: RaySettings) -> int:
    """The workers the bot starts: [ray] workers, or one per GPU of the cluster (one CPU worker without any)."""
    if settings.workers:
        return settings.workers
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else _local_gpus()
    per = settings.gpus_per_worker or 1
    return max(1, int(gpus // per))


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def owned_specs(names: Iterable[str], models: ModelsSettings, engine: EngineSettings, limits: Limits,
                settings: RaySettings) -> list[WorkerSpec]:
    """Specs of the bot's own workers: its settings, with paths made absolute (a worker's working folder is Ray's)."""
    models = models.model_copy(update={"dir": Path(models.dir).resolve(), "hash_cache":
                                       None if models.hash_cache is None else Path(models.hash_cache).resolve()})
    engine = engine.model_copy(update={"output_dir": Path(engine.output_dir).resolve(), "workers": "local",
                                       "input_dir": Path(engine.input_dir).resolve()})
    return [WorkerSpec(name, models, engine, limits, settings.files) for name in names]


def start_actor(spec: WorkerSpec, settings: RaySettings, *, name: str | None = None, node_id: str | None = None,
                gpus: float | None = None) -> Any:
    """A new worker actor for `spec` (not waited for). `name`: register it for the bot to find (join.py);
    `node_id`: start it on that Ray node (the machine `noodle worker` runs on); `gpus`: its share of a GPU
    (default: [ray] gpus_per_worker where the cluster has GPUs, else none)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if gpus is None:
        gpus = settings.gpus_per_worker if ray.cluster_resources().get("GPU", 0) else 0
    options: dict[str, Any] = {"num_cpus": settings.cpus_per_worker, "num_gpus": gpus,
                               "max_concurrency": 4, "max_restarts": 0}
    if name is not None:
        options["name"] = name
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.remote(EngineWorker).options(**options).remote(spec)


def wait_up(workers: list[RemoteWorker], manifest: dict[str, str], reading: tuple[str, str],
            timeout: float = READY_TIMEOUT_S) -> None:
    """Wait for each worker's facts and check its models and how it reads prompts (`reading`, the bot's
    actor.prompt_reading); marks each up, refused or dead (with its note)."""
    if not workers:
        return
    with ThreadPoolExecutor(max_workers=len(workers)) as pool:
        list(pool.map(lambda worker: _bring_up(worker, manifest, reading, timeout), workers))


def _bring_up(worker: RemoteWorker, manifest: dict[str, str], reading: tuple[str, str], timeout: float) -> None:
    import ray

    try:
        worker.facts = ray.get(worker.handle.facts.remote(), timeout=timeout)
        names: dict[str, list[str]] = {}
        for key in manifest:
            folder, _, name = key.partition("/")
            names.setdefault(folder, []).append(name)
        theirs = ray.get(worker.handle.manifest.remote(names), timeout=timeout)
        worker.holdings = ray.get(worker.handle.holdings.remote(), timeout=timeout)
    except BaseException as err:  # its start failed (CUDA, an import), it died meanwhile, or Ray shut down
        # (ray.get raises SystemExit in a thread when this process disconnects)
        worker.state, worker.note = "dead", f"did not start: {type(err).__name__}: {err}"
        log.error("engine worker %s %s", worker.name, worker.note)
        return
    refusal = check_reading(reading, worker.facts.prompt_reading) or check_models(manifest, theirs)
    if refusal:
        worker.state, worker.note = "refused", refusal
        log.error("engine worker %s on %s refused: %s", worker.name, worker.facts.host, refusal)
        if worker.spec is not None:  # the bot's own: it would sit idle; a joined one its command ends
            ray.kill(worker.handle)
        return
    worker.state = "up"
    log.info("engine worker %s up on %s (%s, pid %d)", worker.name, worker.facts.host, worker.facts.device,
             worker.facts.pid)


def local_manifest(models: Any) -> dict[str, str]:
    """"folder/name" -> short hash of every file of the bot's models folders (the hash book remembers them)."""
    found: dict[str, str] = {}
    for folder in FOLDERS:
        for name in models.choices(folder):
            found[f"{folder}/{name}"] = models.catalog.short_hash(models.resolve(folder, name))
    return found


def check_models(ours: dict[str, str], theirs: dict[str, str | None]) -> str | None:
    """Why a worker's models folder cannot serve the bot's jobs: the first files it lacks or has otherwise."""
    missing = [key for key in ours if theirs.get(key) is None]
    differ = [key for key in ours if theirs.get(key) is not None and theirs[key] != ours[key]]
    if not missing and not differ:
        return None
    parts = []
    if differ:
        shown = ", ".join(f"{key} (hash {theirs[key]} there, {ours[key]} here)" for key in differ[:3])
        parts.append(f"its {shown} differ{'s' if len(differ) == 1 else ''}")
    if missing:
        parts.append(f"it lacks {', '.join(missing[:3])}{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}")
    return ("the models folder must hold the same files under the same names on every worker: "
            + "; ".join(parts) + "; copy them from the bot's machine and start the worker again")


def check_reading(ours: tuple[str, str], theirs: tuple[str, str]) -> str | None:
    """Why a worker that reads prompt text otherwise than the bot cannot serve its jobs: the same job would draw
    another picture there."""
    if theirs == ours:
        return None
    differ = [f"{name} = {their!r} (the bot's is {our!r})" for name, our, their
              in zip(("prompt_weighting", "prompt_syntax"), ours, theirs) if our != their]
    return (f"its [engine] {' and '.join(differ)}: the same prompt would draw another picture there; set the bot's "
            "in that machine's config.toml and start the worker again")


def find_joined(known: Iterable[str]) -> list[RemoteWorker]:
    """Workers `noodle worker` registered that the bot has not seen yet (`known`: Ray actor ids, so a command run
    again under the same name is seen anew)."""
    import ray

    seen = set(known)
    found = []
    for entry in ray.util.list_named_actors(all_namespaces=False):
        name = entry if isinstance(entry, str) else entry.get("name", "")
        if not name.startswith(JOINED_PREFIX):
            continue
        try:
            handle = ray.get_actor(name)
        except ValueError:  # it went between the listing and now
            continue
        if actor_id(handle) not in seen:
            found.append(RemoteWorker(name[len(JOINED_PREFIX):], handle, None))
    return found


def actor_id(handle: Any) -> str:
    """A worker's Ray actor id: one per start of it."""
    return handle._actor_id.hex()  # Ray's handles expose no public accessor for it
