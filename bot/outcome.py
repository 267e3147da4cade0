"""What a finished run becomes: the stored outcome of a RunResult, file names for results, a one-line
summary, and the ℹ️ details text.

`outcome_of` runs in a worker thread (it may hash a checkpoint file); the rest is plain string work.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from typing import Any

from bot.embeds import card_text, result_card
from bot.records import Generation, Outcome
from bot.tickets import Details
from bot.workflow_file import is_workflow
from engine.executor import Executor, written_paths
from engine.models.paths import display_name, short_hash
from engine.templates import WorkflowParams

__all__ = ["details_of", "outcome_of", "prefix_for", "summary_of"]


def outcome_of(executor: Executor, generation: Generation) -> Outcome:
    """A request's verdict once all its jobs ended: image paths, token usage, what every image took from the
    cache, timings, the model hash (a cached loader replays no model meta: then the file is hashed).

    Every PNG a job's output nodes wrote is kept, in output order: an /imagine job writes one, a
    /workflow job as many as its SaveImage nodes and batches make."""
    output_dir = executor.settings.output_dir
    images: dict[int, str] = {}
    all_images: dict[int, list[str]] = {}
    problems: list[str] = []
    cached_sets: list[list[str]] = []
    totals: list[float] = []
    tokens: dict[str, Any] = {}
    model_hash: str | None = None
    for job in generation.jobs:
        result = job.result or {}
        paths = [str(path.resolve()) for output in result.get("outputs", {}).values()
                 for path in written_paths(output_dir, output, kinds=("output",))]
        if job.state != "done" or not paths:
            problems.append(f"image {job.idx} {job.state if job.state != 'done' else 'came out empty'}: "
                            f"{job.error or 'no reason given'}")
            continue
        meta = result.get("meta", {})
        images[job.idx] = paths[0]
        all_images[job.idx] = paths
        tokens = tokens or dict(meta.get("tokens", {}))
        cached_sets.append(list(meta.get("cached", [])))
        totals.append(float(meta.get("timings", {}).get("total", 0.0)))
        known = meta.get("models", {}).get("checkpoints", {}).get(generation.model_name, {})
        model_hash = model_hash or known.get("hash")
    if images and model_hash is None and generation.model_name:  # a workflow may load no checkpoint at all
        model_hash = short_hash(executor.models.resolve("checkpoints", generation.model_name))
    # a node counts as cached when every image got it from the cache (a reroll: loader and encodes)
    cached = [node for node in (cached_sets[0] if cached_sets else []) if all(node in c for c in cached_sets)]
    if images:
        state = "done"
    else:
        state = "cancelled" if all(job.state == "cancelled" for job in generation.jobs) else "failed"
    timings = {"total": max(totals), "sum": sum(totals)} if totals else {}
    return Outcome(state=state, images=images, tokens=tokens, cached=cached, timings=timings, model_hash=model_hash,
                   finished_at=time.time(), error="; ".join(problems) or None, all_images=all_images)


def prefix_for(folder: str, prompt: str) -> str:
    """SaveImage's filename_prefix: `<folder>/<date>/<first words of the prompt>` (ASCII, no path tricks)."""
    words = re.sub(r"<[^>]*>", " ", prompt.lower())
    slug = "-".join(re.findall(r"[a-z0-9]+", words))[:40].strip("-") or "image"
    return f"{folder}/{datetime.now(timezone.utc):%Y-%m-%d}/{slug}"


def summary_of(params: WorkflowParams, count: int = 1) -> str:
    """`tiny-sd15 · 64×64 ×2 · seeds 42-43`: what a queued ticket says."""
    model = display_name(params.checkpoint)
    batch = f" ×{count}" if count > 1 else ""
    kind = " · img2img" if params.init_image else ""
    seeds = f"seeds {params.seed}-{params.seed + count - 1}" if count > 1 else f"seed {params.seed}"
    return f"{model} · {params.width}×{params.height}{batch}{kind} · {seeds}"


def details_of(generation: Generation, parameters: str | None) -> Details:
    """The ℹ️ answer: the card, A1111's parameters text and the API workflow to load in ComfyUI."""
    text = card_text(result_card(generation))
    if parameters:
        text += f"\n\nA1111 parameters (PNG Info):\n{parameters}"
    if is_workflow(generation):
        text += ("\n\nThe workflow JSON is the graph as it ran (SaveImage names under the results folder, PreviewImage "
                 "saved like SaveImage): load it in ComfyUI, or run it again with /workflow.")
    else:
        text += "\n\nThe workflow JSON (image 1) is ComfyUI's API format: load it there, or run it with `noodle run`."
    if len(generation.jobs) > 1:
        seeds = ", ".join(f"#{job.idx} {job.seed}" for job in generation.jobs)
        text += f" Each image is its own job; only the KSampler seed differs: {seeds}."
    return Details(text, json.dumps(generation.workflow, indent=2), f"noodle-{generation.id}-workflow.json")
