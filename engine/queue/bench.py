"""`noodle bench queue`: what the queue buys, measured side by side in one run on the tiny model.

- 8 compatible jobs as one sampler batch against the same 8 run one by one (throughput ratio);
- switching the LoRA set of a loaded checkpoint against loading a checkpoint from disk (time ratio);
- a job whose checkpoint is cached against the same job from a cold start (time ratio), and the checkpoint loader
  step alone in each (the node's own time in the run: with the checkpoint cached it only hands out references);
- the service's own cost per job: its wall time for a run of jobs less the executor's time inside them
  (validation, SQLite writes, the hand-off to the worker thread, events).

Interleaved repeats, medians; the last line is a JSON object for scripts. Ratios carry to other machines.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import torch

from engine.bench import timed
from engine.executor import Executor
from engine.queue.batching import BatchMember, run_batch
from engine.queue.jobs import Owner
from engine.queue.service import EngineService
from engine.executor import create_executor
from engine.settings import EngineSettings, Limits, ModelsSettings, QueueSettings
from engine.templates import WorkflowParams, build_workflow
from engine.tiny import write_tiny_models
from engine.values import ClipRef, LoraPatch, ModelRef

CHECKPOINT, LORAS = "tiny-sd15.safetensors", ("tiny-lora-a.safetensors", "tiny-lora-b.safetensors")
SIZE, STEPS, CFG, BATCH = 64, 8, 7.0, 8
PROMPTS = ("a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen", "an old map of the sea",
           "a cat asleep on a piano", "a city street in the rain", "a mountain lake at dawn", "a robot reading")


def _workflows(seeds: Iterator[int], n: int = BATCH) -> list[dict[str, Any]]:
    return [build_workflow(WorkflowParams(checkpoint=CHECKPOINT, prompt=PROMPTS[i % len(PROMPTS)], seed=next(seeds),
                                          steps=STEPS, cfg=CFG, width=SIZE, height=SIZE, negative="blurry",
                                          filename_prefix=f"bench/{i}")) for i in range(n)]


def _fresh(executor: Executor) -> None:
    """Models stay loaded; node outputs and text encodings are computed again."""
    executor.cache.clear()
    executor.models.prompt_cache.clear()


def _solo(executor: Executor, workflows: list[dict[str, Any]]) -> None:
    _fresh(executor)
    for workflow in workflows:
        executor.run(workflow)


def _batched(executor: Executor, workflows: list[dict[str, Any]]) -> None:
    _fresh(executor)
    members = [BatchMember(executor.validate(w), f"bench-{i}", lambda event: None, lambda: False)
               for i, w in enumerate(workflows)]
    outcomes = run_batch(executor, members)
    failed = [o for o in outcomes if isinstance(o, Exception)]
    if failed:
        raise failed[0]


def _lora_refs(executor: Executor, name: str) -> tuple[ModelRef, ClipRef]:
    loaded = executor.models.checkpoint(CHECKPOINT)
    patch = (LoraPatch(name, 1.0),)
    return ModelRef(loaded, loaded.pipe, patch, CHECKPOINT), ClipRef(loaded, loaded.pipe, patch)


def _switch_to(executor: Executor, name: str) -> Callable[[], None]:
    model, clip = _lora_refs(executor, name)

    def switch() -> None:
        executor.models.use_unet(model)
        executor.models.use_text_encoders(clip)

    return switch


def _cold_load(executor: Executor) -> Callable[[], None]:
    executor.models.unload_all()
    return lambda: executor.models.checkpoint(CHECKPOINT)


async def _through_service(service: EngineService, workflows: list[dict[str, Any]]) -> tuple[float, float]:
    """Wall time from the first submit to the last result, and the executor's own time in those jobs."""
    started = time.perf_counter()
    handles = [await service.submit(w, Owner(f"bench-{i % 3}")) for i, w in enumerate(workflows)]
    results = [await handle.result(timeout=600) for handle in handles]
    return time.perf_counter() - started, sum(r["meta"]["timings"]["total"] for r in results)


async def _measure(executor: Executor, db: Path, repeats: int) -> dict[str, list[float]]:
    seeds = count(1000)
    times: dict[str, list[float]] = {k: [] for k in ("solo", "batch", "switch", "load", "cached_job", "cold_job",
                                                     "loader_cached", "loader_cold", "service", "in_executor")}
    executor.run(_workflows(seeds, 1)[0])  # load once: the first run pays for lazy imports and allocations
    service = EngineService(executor, db, QueueSettings(batch_max=1, per_user_max=BATCH, global_max=4 * BATCH))
    await service.start()
    try:
        for repeat in range(repeats):
            workflows = _workflows(seeds)
            times["solo"].append(timed(lambda: _solo(executor, workflows)))
            times["batch"].append(timed(lambda: _batched(executor, workflows)))
            switches = [_switch_to(executor, name) for name in LORAS]
            for switch in switches:  # each LoRA's adapter loaded into this pipeline: the timed calls only switch
                switch()
            times["switch"].extend(timed(switches[(repeat + n) % 2]) for n in range(2))
            times["load"].append(timed(_cold_load(executor)))
            job = _workflows(seeds, 1)[0]
            loader = next(node_id for node_id, node in job.items() if node["class_type"] == "CheckpointLoaderSimple")
            for state in ("cached", "cold"):
                if state == "cold":
                    executor.models.unload_all()
                _fresh(executor)
                runs: list[Any] = []
                times[f"{state}_job"].append(timed(lambda: runs.append(executor.run(job))))
                times[f"loader_{state}"].append(runs[0].meta["timings"][loader])
            wall, inside = await _through_service(service, _workflows(seeds))
            times["service"].append(wall)
            times["in_executor"].append(inside)
    finally:
        await service.stop()
    return times


def bench_queue(models_dir: Path, repeats: int = 5) -> int:
    """Print the timings and ratios; return the exit code."""
    write_tiny_models(models_dir)
    root = Path(tempfile.mkdtemp(prefix="noodle-bench-queue-"))
    executor = create_executor(ModelsSettings(dir=models_dir), EngineSettings(output_dir=root / "output"), Limits())
    with warnings.catch_warnings():  # peft notes each second adapter on a module: expected here, not news
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        times = asyncio.run(_measure(executor, root / "noodle.sqlite3", repeats))
    med = {k: statistics.median(v) for k, v in times.items()}
    overheads = [(wall - inside) / BATCH * 1000 for wall, inside in zip(times["service"], times["in_executor"])]
    overhead_ms = statistics.median(overheads)
    print(f"tiny SD1.5, {SIZE}x{SIZE}, {STEPS} steps, cfg {CFG}, median of {repeats} "
          f"({torch.get_num_threads()} threads, {executor.models.device})")
    print(f"  {BATCH} jobs one by one          {med['solo'] * 1000:8.1f} ms")
    print(f"  {BATCH} jobs as one batch        {med['batch'] * 1000:8.1f} ms   "
          f"({med['solo'] / med['batch']:.2f}x the throughput)")
    print(f"  LoRA set switch               {med['switch'] * 1000:8.2f} ms   (adapters resident, UNet + CLIP)")
    print(f"  checkpoint load from disk     {med['load'] * 1000:8.1f} ms")
    print(f"  job, checkpoint cached        {med['cached_job'] * 1000:8.1f} ms")
    print(f"  job, cold (load from disk)    {med['cold_job'] * 1000:8.1f} ms   "
          f"(cached / cold: {med['cached_job'] / med['cold_job']:.3f})")
    print(f"  loader step, cached           {med['loader_cached'] * 1000:8.3f} ms   "
          f"(cold: {med['loader_cold'] * 1000:.1f} ms; cached / cold: {med['loader_cached'] / med['loader_cold']:.4f},"
          " aim <= 0.01)")
    print(f"  {BATCH} jobs through the service  {med['service'] * 1000:8.1f} ms   "
          f"of which the executor ran {med['in_executor'] * 1000:.1f} ms: {overhead_ms:.2f} ms a job of scheduling")
    summary = {
        "batch_speedup": round(med["solo"] / med["batch"], 3),
        "lora_switch_vs_load": round(med["switch"] / med["load"], 4),
        "cached_vs_cold_load": round(med["cached_job"] / med["cold_job"], 3),
        "loader_cached_vs_cold": round(med["loader_cached"] / med["loader_cold"], 5),
        "loader_cached_ms": round(med["loader_cached"] * 1000, 3),
        "loader_cold_ms": round(med["loader_cold"] * 1000, 1),
        "overhead_ms_per_job": round(overhead_ms, 2),
        "solo_ms": round(med["solo"] * 1000, 1),
        "batch_ms": round(med["batch"] * 1000, 1),
        "switch_ms": round(med["switch"] * 1000, 3),
        "load_ms": round(med["load"] * 1000, 1),
        "cached_job_ms": round(med["cached_job"] * 1000, 1),
        "cold_job_ms": round(med["cold_job"] * 1000, 1),
        "batch_size": BATCH,
        "repeats": repeats,
        "device": str(executor.models.device),
    }
    print(json.dumps(summary))
    return 0
