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
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler

from engine.executor import create_executor
from engine.settings import EngineSettings, Limits, ModelsSettings
from engine.templates import WorkflowParams, build_workflow
from engine.tiny import write_random_checkpoint, write_tiny_models

CFG = 7.0


@dataclass(frozen=True)
class BenchCase:
    """What is measured: a checkpoint file in `models_dir/checkpoints`, an image size and a step count."""

    label: str
    checkpoint: str
    size: int
    steps: int


TINY = BenchCase("tiny SD1.5", "tiny-sd15.safetensors", 64, 8)
# Real architectures with random weights: what a GPU box runs, at the sizes people ask for.
REAL = {
    "sd15": BenchCase("full-size SD1.5 (random weights)", "random-sd15.safetensors", 512, 20),
    "sdxl": BenchCase("full-size SDXL (random weights)", "random-sdxl.safetensors", 1024, 20),
}


def prepare(models_dir: Path, real_size: str | None) -> BenchCase:
    """Write the models the case needs (kept between runs) and return it."""
    write_tiny_models(models_dir)
    if real_size is None:
        return TINY
    case = REAL[real_size]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write_random_checkpoint(models_dir / "checkpoints" / case.checkpoint, real_size, device=device)  # type: ignore[arg-type]
    return case


def timed(action: Callable[[], object]) -> float:
    """Seconds `action` takes; on a GPU from an idle device to the end of the work it queued (synchronized
    before and after), since a call returns while its kernels still run."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    started = time.perf_counter()
    action()
    sync()
    return time.perf_counter() - started


def bench_engine(models_dir: Path, repeats: int = 5, real_size: str | None = None) -> int:
    """Print the timings and ratios, the last line as JSON; return the exit code."""
    print(json.dumps(measure_engine(models_dir, repeats, real_size)))
    return 0


def measure_engine(models_dir: Path, repeats: int = 5, real_size: str | None = None) -> dict[str, object]:
    """Print the timings and ratios; return them as a dict."""
    case = prepare(models_dir, real_size)
    SIZE, STEPS = case.size, case.steps
    out = Path(tempfile.mkdtemp(prefix="noodle-bench-"))
    executor = create_executor(ModelsSettings(dir=models_dir), EngineSettings(output_dir=out), Limits())
    params = WorkflowParams(checkpoint=case.checkpoint, prompt="a red fox in the snow", negative="blurry",
                            seed=1, steps=STEPS, cfg=CFG, width=SIZE, height=SIZE)
    workflow = build_workflow(params)
    executor.run(workflow)  # load the checkpoint once: loading is not what is compared
    pipe = executor.models.checkpoint(params.checkpoint).pipe
    # diffusers' pipeline with ComfyUI's euler/normal: the same scheduler our graph steps with
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace", steps_offset=0)
    pipe.scheduler = euler

    node_seconds: dict[str, list[float]] = {}

    def graph_uncached() -> None:
        # models stay loaded; every node and text encoding is computed again
        executor.cache.clear()
        executor.models.prompt_cache.clear()
        timings = executor.run(workflow).meta["timings"]
        for node_id, seconds in timings.items():
            node_seconds.setdefault(f"{node_id} {workflow.get(node_id, {}).get('class_type', '')}".strip(), []).append(seconds)

    def cold() -> None:
        # what a first request costs: the checkpoint read from disk, nothing cached
        executor.models.unload_all()
        executor.models.prompt_cache.clear()
        executor.cache.clear()
        executor.run(workflow)

    def pipeline() -> None:
        pipe = executor.models.checkpoint(params.checkpoint).pipe
        latents = pipe(params.prompt, negative_prompt=params.negative, num_inference_steps=STEPS, guidance_scale=CFG,
                       width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(1), output_type="latent").images
        # Decoded as our VAEDecode does, in the VAE's own dtype ([engine] vae_dtype: bfloat16 on most GPUs, as
        # ComfyUI), where diffusers' pipelines would decode in the UNet's fp16, or fp32 for SDXL's force_upcast.
        vae = pipe.vae
        with torch.inference_mode():
            pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        pipe.image_processor.postprocess(pixels, output_type="pil")[0].save(out / "pipeline.png")  # ours writes a PNG too

    seeds = iter(range(1000, 1000 + 10 * repeats))

    def reroll() -> None:
        executor.run(build_workflow(WorkflowParams(**{**params.__dict__, "seed": next(seeds)})))

    pipe.set_progress_bar_config(disable=True)
    times: dict[str, list[float]] = {"graph": [], "pipeline": [], "cold": [], "reroll": []}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        times["graph"].append(timed(graph_uncached))
        times["pipeline"].append(timed(pipeline))
        times["cold"].append(timed(cold))
        pipe = executor.models.checkpoint(params.checkpoint).pipe  # reloaded by the cold run
        pipe.scheduler = euler
        pipe.set_progress_bar_config(disable=True)
        times["reroll"].append(timed(reroll))
    med = {k: statistics.median(v) for k, v in times.items()}
    models = executor.models
    where = torch.cuda.get_device_name() if models.device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{case.label}, {SIZE}x{SIZE}, {STEPS} steps, cfg {CFG}, median of {repeats} ({where}, {models.dtype})")
    print(f"  our graph, nothing cached    {med['graph'] * 1000:8.1f} ms   (checkpoint in memory)")
    print(f"  diffusers pipeline           {med['pipeline'] * 1000:8.1f} ms   (same components, euler/normal)")
    print(f"  cold run                     {med['cold'] * 1000:8.1f} ms   (checkpoint read from disk)")
    print(f"  reroll, new seed             {med['reroll'] * 1000:8.1f} ms   (loader and encodes from cache)")
    node_ms = {node: round(statistics.median(values) * 1000, 1) for node, values in node_seconds.items()}
    print("  where our graph's time goes:  " + ", ".join(f"{node} {ms} ms" for node, ms in node_ms.items()))
    summary = {
        "graph_vs_pipeline": round(med["graph"] / med["pipeline"], 3),
        "reroll_vs_cold": round(med["reroll"] / med["cold"], 3),
        "reroll_vs_uncached_graph": round(med["reroll"] / med["graph"], 3),
        "graph_ms": round(med["graph"] * 1000, 2),
        "pipeline_ms": round(med["pipeline"] * 1000, 2),
        "cold_ms": round(med["cold"] * 1000, 2),
        "reroll_ms": round(med["reroll"] * 1000, 2),
        "repeats": repeats,
        "device": where,
        "dtype": str(models.dtype).removeprefix("torch."),
        "image": image_check(out),
        "node_ms": node_ms,
    }
    if models.device.type == "cuda":
        summary["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return summary


def image_check(out: Path) -> dict[str, float]:
    """The last PNG our graph wrote: its pixel spread, which is 0 for a black (NaN-decoded) image."""
    import numpy as np
    from PIL import Image

    newest = max((path for path in out.glob("*.png") if path.name != "pipeline.png"), key=lambda path: path.stat().st_mtime_ns)
    pixels = np.asarray(Image.open(newest).convert("RGB"), dtype=np.float32)
    return {"mean": round(float(pixels.mean()), 2), "std": round(float(pixels.std()), 2)}
