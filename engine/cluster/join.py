"""`noodle worker --address HOST:6379`: this machine adds its own devices to a running Noodle cluster.

The command joins the Ray cluster as a node (`ray start --address ...`, unless this machine is one already),
starts one engine worker per device here, pinned to this node and built from this machine's own config.toml
(its models folder, device, dtype, memory), and registers each under a name the bot looks for ([ray]
namespace, every join_poll_seconds). The bot checks each worker's models against its own before it sends a
job (same names, same hashes) and refuses one that differs, saying which file; this command then prints that
and exits. The workers live as long as the command runs: Ctrl-C ends them, and the bot sends their running
jobs elsewhere.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engine.cluster import pool
from engine.cluster.pool import JOINED_PREFIX

__all__ = ["run_worker"]

log = logging.getLogger(__name__)


def run_worker(address: str, settings: Any, *, name: str | None = None, count: int = 0,
               poll_seconds: float = 2.0, stop_after: float | None = None) -> int:
    """Join `address` with this machine's workers and serve until Ctrl-C (or `stop_after` seconds); the exit
    status."""
    import ray

    if address.startswith("ray://"):
        print(f"noodle worker: {address} is a Ray client address; a worker joins the cluster as a node, so give "
              "the head's GCS address instead (host:6379, what `ray start --head` printed)", file=sys.stderr)
        return 2
    ray_settings = settings.ray
    try:
        _join(address, ray_settings.namespace)
    except Exception as err:  # no cluster there, a version mismatch, a firewall
        print(f"noodle worker: could not join the Ray cluster at {address}: {err}", file=sys.stderr)
        return 1
    node = ray.get_runtime_context().get_node_id()
    gpus = _gpus_here()
    count = count or max(1, gpus)
    base = name or socket.gethostname().split(".")[0]
    names = [base if count == 1 else f"{base}-{index}" for index in range(1, count + 1)]
    taken = [n for n in names if _registered(JOINED_PREFIX + n)]
    if taken:
        print(f"noodle worker: a worker named {', '.join(taken)} is in the cluster already; give --name",
              file=sys.stderr)
        return 2
    per_gpu = ray_settings.gpus_per_worker if gpus else 0
    specs = pool.owned_specs(names, settings.models, settings.engine, settings.limits, ray_settings)
    handles = [pool.start_actor(spec, ray_settings, name=JOINED_PREFIX + spec.name, node_id=node, gpus=per_gpu)
               for spec in specs]
    try:
        facts = ray.get([handle.facts.remote() for handle in handles], timeout=pool.READY_TIMEOUT_S)
    except Exception as err:
        print(f"noodle worker: the workers did not start: {err}", file=sys.stderr)
        return 1
    for fact in facts:
        print(f"engine worker {fact.name} up on {fact.host} ({fact.device}, {fact.dtype}); the bot takes it into "
              f"use within [ray] join_poll_seconds = {ray_settings.join_poll_seconds:g} s", flush=True)
    return _serve(handles, names, poll_seconds, stop_after)


def _serve(handles: list[Any], names: list[str], poll_seconds: float, stop_after: float | None) -> int:
    import ray

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    shown: dict[str, Any] = {}
    deadline = None if stop_after is None else time.monotonic() + stop_after
    status = 0
    while not stopping and (deadline is None or time.monotonic() < deadline):
        try:
            states = ray.get([handle.status.remote() for handle in handles], timeout=30)
        except Exception as err:  # a worker died (out of memory, killed): the bot runs its job elsewhere
            print(f"noodle worker: a worker stopped: {type(err).__name__}: {err}", file=sys.stderr)
            status = 1
            break
        refused = [(n, s["refused"]) for n, s in zip(names, states) if s["refused"]]
        if refused:
            for worker, note in refused:
                print(f"noodle worker: the bot refused {worker}: {note}", file=sys.stderr)
            status = 1
            break
        for worker, state in zip(names, states):
            line = (f"{worker}: {'running' if state['busy'] else 'idle'}, holds "
                    f"{', '.join(state['loaded']) or 'nothing'}, {state['loads']} loads")
            if shown.get(worker) != line:
                print(line, flush=True)
                shown[worker] = line
        time.sleep(poll_seconds)
    for handle in handles:
        try:
            ray.kill(handle)
        except Exception:  # gone already
            pass
    return status


def _join(address: str, namespace: str) -> None:
    """Connect to the cluster at `address`, starting a Ray node on this machine first when it has none."""
    import ray

    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
        return
    except (ConnectionError, RuntimeError) as err:  # this machine is no node of it yet
        log.info("no Ray node here (%s); starting one that joins %s", err, address)
    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_cli, "start", f"--address={address}"], check=True)
    ray.init(address=address, namespace=namespace, log_to_driver=False)


def _registered(name: str) -> bool:
    import ray

    try:
        ray.get_actor(name)
        return True
    except ValueError:
        return False


def _gpus_here() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
