"""`noodle bench engine`: our graph against diffusers' own pipeline, and a cached reroll against a cold run.

Measured side by side in one run, interleaved, medians of several repeats; the last line is a
JSON object for scripts. Ratios, not seconds, are what carry to another machine.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler

from engine.runtime import create_executor
from engine.settings import EngineSettings, Limits, ModelsSettings
from engine.templates import WorkflowParams, build_workflow
from engine.tiny import write_tiny_models

SIZE, STEPS, CFG = 64, 8, 7.0


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def bench_engine(models_dir: Path, repeats: int = 5) -> int:
    """Print the timings and ratios; return the exit code."""
    write_tiny_models(models_dir)
    out = Path(tempfile.mkdtemp(prefix="noodle-bench-"))
    executor = create_executor(ModelsSettings(dir=models_dir), EngineSettings(output_dir=out), Limits())
    params = WorkflowParams(checkpoint="tiny-sd15.safetensors", prompt="a red fox in the snow", negative="blurry",
                            seed=1, steps=STEPS, cfg=CFG, width=SIZE, height=SIZE)
    workflow = build_workflow(params)
    executor.run(workflow)  # load the checkpoint once: loading is not what is compared
    pipe = executor.models.checkpoint(params.checkpoint).pipe
    # diffusers' pipeline with ComfyUI's euler/normal: the same scheduler our graph steps with
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace", steps_offset=0)
    pipe.scheduler = euler

    def graph_uncached() -> None:
        # models stay loaded; every node and text encoding is computed again
        executor.cache.clear()
        executor.models.prompt_cache.clear()
        executor.run(workflow)

    def cold() -> None:
        # what a first request costs: the checkpoint read from disk, nothing cached
        executor.models.unload_all()
        executor.models.prompt_cache.clear()
        executor.cache.clear()
        executor.run(workflow)

    def pipeline() -> None:
        image = executor.models.checkpoint(params.checkpoint).pipe(params.prompt, negative_prompt=params.negative, num_inference_steps=STEPS, guidance_scale=CFG,
                     width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(1)).images[0]
        image.save(out / "pipeline.png")  # our graph writes a PNG too

    seeds = iter(range(1000, 1000 + 10 * repeats))

    def reroll() -> None:
        executor.run(build_workflow(WorkflowParams(**{**params.__dict__, "seed": next(seeds)})))

    pipe.set_progress_bar_config(disable=True)
    times: dict[str, list[float]] = {"graph": [], "pipeline": [], "cold": [], "reroll": []}
    for _ in range(repeats):
        times["graph"].append(_timed(graph_uncached))
        times["pipeline"].append(_timed(pipeline))
        times["cold"].append(_timed(cold))
        pipe = executor.models.checkpoint(params.checkpoint).pipe  # reloaded by the cold run
        pipe.scheduler = euler
        pipe.set_progress_bar_config(disable=True)
        times["reroll"].append(_timed(reroll))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tiny SD1.5, {SIZE}x{SIZE}, {STEPS} steps, cfg {CFG}, median of {repeats} ({torch.get_num_threads()} threads)")
    print(f"  our graph, nothing cached    {med['graph'] * 1000:8.1f} ms   (checkpoint in memory)")
    print(f"  diffusers pipeline           {med['pipeline'] * 1000:8.1f} ms   (same components, euler/normal)")
    print(f"  cold run                     {med['cold'] * 1000:8.1f} ms   (checkpoint read from disk)")
    print(f"  reroll, new seed             {med['reroll'] * 1000:8.1f} ms   (loader and encodes from cache)")
    summary = {
        "graph_vs_pipeline": round(med["graph"] / med["pipeline"], 3),
        "reroll_vs_cold": round(med["reroll"] / med["cold"], 3),
        "reroll_vs_uncached_graph": round(med["reroll"] / med["graph"], 3),
        "graph_ms": round(med["graph"] * 1000, 2),
        "pipeline_ms": round(med["pipeline"] * 1000, 2),
        "cold_ms": round(med["cold"] * 1000, 2),
        "reroll_ms": round(med["reroll"] * 1000, 2),
        "repeats": repeats,
        "device": str(executor.models.device),
    }
    print(json.dumps(summary))
    return 0
