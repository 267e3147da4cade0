"""`noodle bench comfy --comfy URL WF.json ...`: the same API workflows, warm, in Noodle and in a running ComfyUI, side
by side in one run.

For each workflow: one untimed run on each side first (both load the checkpoint and keep it), then `repeats`
timed runs, interleaved (Noodle, ComfyUI, Noodle, ...), each pair with one fresh seed in every sampler, so neither
side's output cache answers and both draw the same picture. Noodle's time is its executor's run of the graph
(validation included), measured around the call; ComfyUI's is its own execution timestamps from `/history`
(`execution_start` to `execution_success`, milliseconds), so its HTTP and queue time are not held against it.
The ratio per workflow is the median Noodle time over the median ComfyUI time; overall, the geometric mean of
those. The last line is JSON with `vs_comfy`: under 1 means Noodle is faster. On a GPU each workflow also gets
each side's peak memory: Noodle's from torch's own counters, ComfyUI's from the torch-reserved memory its
`/system_stats` reports, read every 0.1 s while it runs (so a peak shorter than that can be missed).
"""

from __future__ import annotations

import copy
import json
import math
import secrets
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from engine.settings import EngineSettings, Limits, ModelsSettings

__all__ = ["ComfyClient", "ComfyError", "WorkflowTiming", "bench_comfy", "compare", "report", "time_workflows",
           "with_seed"]

POLL_S = 0.05
MEMORY_POLL_S = 0.1
GIB = 2**30
SEED_NAMES = ("seed", "noise_seed")  # KSampler, KSamplerAdvanced / RandomNoise


class ComfyError(RuntimeError):
    """ComfyUI refused a workflow, failed running it, or could not be reached."""


class ComfyClient:
    """The two routes of ComfyUI's HTTP API this needs: POST /prompt, GET /history/{id}."""

    def __init__(self, url: str, *, timeout_s: float = 3600.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.client_id = secrets.token_hex(8)

    def _call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as err:  # a refused workflow: ComfyUI's validation body says why
            raise ComfyError(f"ComfyUI answered {err.code} to {path}: {err.read()[:500].decode(errors='replace')}") \
                from None
        except (urllib.error.URLError, OSError) as err:
            raise ComfyError(f"ComfyUI at {self.url} cannot be reached ({err}); start it (../shared/tools/comfyui/"
                             "comfy_server.sh) or pass its address with --comfy") from None

    def run(self, workflow: dict[str, Any]) -> float:
        """Queue `workflow`, wait for it, return its execution seconds by ComfyUI's own timestamps."""
        prompt_id = self._call("/prompt", {"prompt": workflow, "client_id": self.client_id})["prompt_id"]
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            entry = self._call(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return _execution_seconds(entry["status"])
            time.sleep(POLL_S)
        raise ComfyError(f"ComfyUI did not finish prompt {prompt_id} within {self.timeout_s:.0f} s")

    def reserved_bytes(self) -> int | None:
        """The memory ComfyUI's torch holds on its first device now (`torch_vram_total`: torch's reserved bytes
        on a GPU), or None when that device is the CPU."""
        device = (self._call("/system_stats").get("devices") or [{}])[0]
        return None if device.get("type") in (None, "cpu", "mps") else int(device["torch_vram_total"])


class ReservedPeak:
    """The most memory ComfyUI's torch held while this was open: `reserved_bytes` read every MEMORY_POLL_S in a
    thread (none when not `reading`). `peak` is None on a CPU ComfyUI."""

    def __init__(self, client: ComfyClient, *, reading: bool = True) -> None:
        self.client, self.reading, self.peak = client, reading, None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while True:
            try:
                now = self.client.reserved_bytes()
            except ComfyError:  # a busy server answering late: the next read counts
                now = None
            if now is not None:
                self.peak = max(self.peak or 0, now)
            if self._done.wait(MEMORY_POLL_S):
                return

    def __enter__(self) -> "ReservedPeak":
        if self.reading:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self.reading:
            self._thread.join()


def _execution_seconds(status: dict[str, Any]) -> float:
    stamps = {event: data.get("timestamp") for event, data in status.get("messages", [])}
    if status.get("status_str") != "success" or "execution_success" not in stamps:
        errors = [data.get("exception_message", "") for event, data in status.get("messages", [])
                  if event == "execution_error"]
        raise ComfyError(f"ComfyUI failed the workflow: {'; '.join(errors)[:500] or status.get('status_str')}")
    return (float(stamps["execution_success"]) - float(stamps["execution_start"])) / 1000.0


def with_seed(workflow: dict[str, Any], seed: int) -> dict[str, Any]:
    """A copy with `seed` in every sampler whose seed is a constant (a linked one is its node's to give)."""
    fresh = copy.deepcopy(workflow)
    for node in fresh.values():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        for name in SEED_NAMES:
            if isinstance(inputs.get(name), int) and not isinstance(inputs.get(name), bool):
                inputs[name] = seed
    return fresh


@dataclass(frozen=True)
class WorkflowTiming:
    """One workflow's medians on each side, and their ratio."""

    name: str
    noodle_s: float
    comfy_s: float
    runs: int
    # peak memory on a GPU: Noodle's allocated and reserved bytes (torch's counters), ComfyUI's reserved (polled)
    noodle_peak_gib: float | None = None
    noodle_reserved_gib: float | None = None
    comfy_reserved_gib: float | None = None

    @property
    def ratio(self) -> float:
        return self.noodle_s / self.comfy_s


def compare(name: str, workflow: dict[str, Any], noodle: Callable[[dict[str, Any]], float],
            comfy: Callable[[dict[str, Any]], float], repeats: int) -> WorkflowTiming:
    """Warm both sides, then `repeats` interleaved timed runs with the same fresh seed on each side."""
    warm = with_seed(workflow, secrets.randbelow(2**31))
    noodle(warm)
    comfy(warm)
    ours, theirs = [], []
    for _ in range(repeats):
        seeded = with_seed(workflow, secrets.randbelow(2**31))
        ours.append(noodle(seeded))
        theirs.append(comfy(seeded))
    return WorkflowTiming(name, statistics.median(ours), statistics.median(theirs), repeats)


def overall(timings: Sequence[WorkflowTiming]) -> float:
    """The geometric mean of the per-workflow ratios: each workflow counts once, however long it takes."""
    return math.exp(sum(math.log(t.ratio) for t in timings) / len(timings))


def time_workflows(client: ComfyClient, executor: Any, workflows: Sequence[tuple[str, dict[str, Any]]],
                   repeats: int) -> list[WorkflowTiming]:
    """`compare` each named workflow in `executor` and ComfyUI, printing a line each; with the peak memory of
    each side when Noodle runs on a GPU."""
    import torch

    on_gpu = executor.device.type == "cuda"

    def noodle(workflow: dict[str, Any]) -> float:
        started = time.perf_counter()
        executor.run(workflow)  # its images are read back and written: the device is done when this returns
        return time.perf_counter() - started

    timings = []
    for name, workflow in workflows:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(executor.device)
        with ReservedPeak(client, reading=on_gpu) as theirs:
            timing = compare(name, workflow, noodle, client.run, repeats)
        if on_gpu:
            timing = replace(timing, noodle_peak_gib=round(torch.cuda.max_memory_allocated(executor.device) / GIB, 2),
                             noodle_reserved_gib=round(torch.cuda.max_memory_reserved(executor.device) / GIB, 2),
                             comfy_reserved_gib=None if theirs.peak is None else round(theirs.peak / GIB, 2))
        timings.append(timing)
        memory = "" if timing.noodle_peak_gib is None else (
            f"; peak memory: Noodle {timing.noodle_peak_gib} GiB allocated, {timing.noodle_reserved_gib} GiB "
            f"reserved, ComfyUI {timing.comfy_reserved_gib} GiB reserved")
        print(f"{timing.name}: Noodle {timing.noodle_s:.3f} s, ComfyUI {timing.comfy_s:.3f} s (medians of "
              f"{repeats}, warm): Noodle / ComfyUI = {timing.ratio:.3f}{memory}", flush=True)
    return timings


def report(executor: Any, timings: Sequence[WorkflowTiming]) -> dict[str, Any]:
    """The overall line, and the JSON summary (`vs_comfy`) the last line prints."""
    from engine.heap import reusing

    ratio = overall(timings)
    print(f"overall (geometric mean of {len(timings)} workflow(s)): Noodle / ComfyUI = {ratio:.3f}")
    return {"device": str(executor.device), "dtype": str(executor.models.dtype).removeprefix("torch."),
            "compile": executor.settings.compile, "cuda_graphs": executor.models.graphs is not None,
            "reuse_cpu_memory": reusing(),
            "workflows": [{**asdict(t), "ratio": round(t.ratio, 4)} for t in timings], "vs_comfy": round(ratio, 4)}


def bench_comfy(url: str, files: Sequence[Path], models_dir: Path, repeats: int = 3, *,
                engine: EngineSettings | None = None, limits: Limits | None = None) -> int:
    """Time each workflow file in Noodle (this process's executor on `models_dir`, config.toml's [engine] and
    [limits]) and in ComfyUI at `url`."""
    from engine.executor import create_executor

    executor = create_executor(ModelsSettings(dir=models_dir), engine or EngineSettings(), limits or Limits())
    workflows = []
    for path in files:
        workflow = json.loads(Path(path).read_text(encoding="utf-8"))
        workflows.append((Path(path).name, workflow.get("prompt", workflow)))  # a /prompt body, or the bare graph
    timings = time_workflows(ComfyClient(url), executor, workflows, repeats)
    print(json.dumps(report(executor, timings)))
    return 0
