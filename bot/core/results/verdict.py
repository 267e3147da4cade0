"""A request's verdict once all its images' jobs ended: the stored `Outcome` (paths, tokens, cache, timings, hash).

`outcome_of` runs in a worker thread: it may hash a checkpoint file.
"""

from __future__ import annotations

import time
from typing import Any

from bot.core.storage.records import Generation, Outcome
from engine.executor import written_paths
from engine.queue import EngineService

__all__ = ["outcome_of"]


def outcome_of(engine: EngineService, generation: Generation) -> Outcome:
    """A request's verdict once all its jobs ended: image paths, token usage, what every image took from the
    cache, timings, the model hash (a cached loader replays no model meta: then the file is hashed).

    Every PNG a job's output nodes wrote is kept, in output order: an /imagine job writes one, a
    /workflow job as many as its SaveImage nodes and batches make."""
    output_dir = engine.output_dir
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
        model_hash = engine.short_hash("checkpoints", generation.model_name)
    # a node counts as cached when every image got it from the cache (a reroll: loader and encodes)
    cached = [node for node in (cached_sets[0] if cached_sets else []) if all(node in c for c in cached_sets)]
    if images:
        state = "done"
    else:
        state = "cancelled" if all(job.state == "cancelled" for job in generation.jobs) else "failed"
    timings = {"total": max(totals), "sum": sum(totals)} if totals else {}
    return Outcome(state=state, images=images, tokens=tokens, cached=cached, timings=timings, model_hash=model_hash,
                   finished_at=time.time(), error="; ".join(problems) or None, all_images=all_images)
