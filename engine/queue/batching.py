"""Dynamic batching: which queued jobs can share one sampler call, and running them as one batch.

Jobs are compatible when their graphs differ only in seeds, prompt texts and file name prefixes: the
same checkpoint, LoRAs, size, steps, sampler, scheduler, cfg and denoise give the same `batch_key`.
A batch runs each job's own graph up to the sampler (the loader's and LoRAs' outputs come from the
node cache once the first job made them; each job encodes its own texts), stacks the latents with
each job's own seed's noise (`prepare_noise`, as its solo KSampler would), samples them in one call
with per-item conds, then decodes and saves each job's images with its own PNG metadata and meta.

Only samplers without step noise are batched (`samplers.DETERMINISTIC_SAMPLERS`): ancestral and SDE
samplers draw fresh noise for the whole batch at every step, so an item would not get its solo picture.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from engine import samplers
from engine.cost import check_cost
from engine.events import Progress
from engine.executor import Executor, Listener, Run, RunResult
from engine.nodes import catalog, sampling
from engine.nodes.base import Output
from engine.validate import ValidatedPrompt
from engine.values import Latent

__all__ = ["BatchMember", "batch_key", "run_batch", "sampler_steps"]

# The graphs the queue batches: txt2img as the templates (and most ComfyUI users) build it.
BATCHABLE_NODES = frozenset({"CheckpointLoaderSimple", "LoraLoader", "LoraLoaderModelOnly", "CLIPSetLastLayer",
                             "VAELoader", "CLIPTextEncode", "CLIPTextEncodeSDXL", "EmptyLatentImage", "KSampler",
                             "VAEDecode", "SaveImage", "PreviewImage"})
# Inputs that may differ between the jobs of one batch.
VARYING_INPUTS = {"KSampler": {"seed"}, "CLIPTextEncode": {"text"}, "CLIPTextEncodeSDXL": {"text_g", "text_l"},
                  "SaveImage": {"filename_prefix"}}
AFTER_SAMPLER = frozenset({"VAEDecode", "SaveImage", "PreviewImage"})
SAMPLER_NODES = frozenset({"KSampler", "KSamplerAdvanced"})


@dataclass(frozen=True)
class BatchMember:
    """One job of a batch: its graph and how its run reports and stops."""

    prompt: ValidatedPrompt
    prompt_id: str
    listener: Listener
    is_cancelled: Callable[[], bool]


def _class_types(prompt: ValidatedPrompt) -> dict[str, str]:
    return {node_id: str(prompt.workflow.nodes[node_id].class_type) for node_id in prompt.order}


def downstream(prompt: ValidatedPrompt, start: str) -> list[str]:
    """The nodes fed by `start`, directly or not, in run order."""
    fed = {start}
    for node_id in prompt.order:  # topological: a node's sources come before it
        if any(src in fed for src, _ in prompt.links.get(node_id, {}).values()):
            fed.add(node_id)
    return [node_id for node_id in prompt.order if node_id in fed and node_id != start]


def batch_key(prompt: ValidatedPrompt) -> str | None:
    """What a job must share with others to be sampled in one batch with them; None: it runs alone."""
    types = _class_types(prompt)
    found = [node_id for node_id, class_type in types.items() if class_type == "KSampler"]
    if set(types.values()) - BATCHABLE_NODES or len(found) != 1:
        return None
    sampler = found[0]
    if prompt.constants.get(sampler, {}).get("sampler_name") not in samplers.DETERMINISTIC_SAMPLERS:
        return None
    latent = prompt.links.get(sampler, {}).get("latent_image")
    if latent is None or types[latent[0]] != "EmptyLatentImage":
        return None
    if any(types[node_id] not in AFTER_SAMPLER for node_id in downstream(prompt, sampler)):
        return None
    shape = [(node_id, types[node_id],
              sorted((name, repr(value)) for name, value in prompt.constants.get(node_id, {}).items()
                     if name not in VARYING_INPUTS.get(types[node_id], ())),
              sorted((name, src, index) for name, (src, index) in prompt.links.get(node_id, {}).items()))
             for node_id in prompt.order]
    return hashlib.sha256(json.dumps(shape).encode()).hexdigest()


def sampler_steps(prompt: ValidatedPrompt, executor: Executor) -> int:
    """The sampler steps a job runs, for queue ETAs: the cost check's count, which follows every sampler node
    (KSampler's schedule, SamplerCustom's SIGMAS through schedulers, splits and flips)."""
    return check_cost(prompt, executor.limits, executor.models, catalog(),
                      syntax=executor.settings.prompt_syntax).steps


def run_batch(executor: Executor, members: Sequence[BatchMember]) -> list[RunResult | Exception]:
    """Run compatible jobs (same `batch_key`) with one sampler call; each gets its result or its error."""
    types = _class_types(members[0].prompt)
    sampler = next(node_id for node_id, class_type in types.items() if class_type == "KSampler")
    after = downstream(members[0].prompt, sampler)
    before = [node_id for node_id in members[0].prompt.order if node_id != sampler and node_id not in after]
    outcomes: list[RunResult | Exception | None] = [None] * len(members)

    # 1. Each job's graph up to the sampler. A run starts (and looks the cache up) only after the job
    # before it ran: the loader's and LoRAs' outputs are then cached, shared, and count as model cache hits.
    runs: list[Run] = []
    for index, member in enumerate(members):
        run = executor.begin(member.prompt, prompt_id=member.prompt_id, listener=member.listener,
                             is_cancelled=member.is_cancelled)
        runs.append(run)
        try:
            for node_id in before:
                run.compute(node_id)
        except Exception as err:  # NodeExecutionError or JobCancelled: this job only
            outcomes[index] = err

    # 2. One sampler call over every job that still needs it.
    waiting = [i for i, run in enumerate(runs) if outcomes[i] is None and sampler not in run.values]
    if len(waiting) == 1:
        try:
            runs[waiting[0]].compute(sampler)
        except Exception as err:
            outcomes[waiting[0]] = err
    elif waiting:
        for index, error in zip(waiting, _sample_together([runs[i] for i in waiting], sampler)):
            outcomes[index] = error

    # 3. Each job decodes and saves its own images, with its own metadata.
    for index, run in enumerate(runs):
        if outcomes[index] is not None:
            continue
        try:
            for node_id in after:
                run.compute(node_id)
            outcomes[index] = run.finish()
        except Exception as err:
            outcomes[index] = err
    return [outcome for outcome in outcomes if outcome is not None]


def _sample_together(runs: list[Run], sampler: str) -> list[Exception | None]:
    """KSampler for several runs at once; returns each run's error, None where it got its latent."""
    inputs = [run.inputs(sampler) for run in runs]
    first = inputs[0]
    latents: list[Latent] = [values["latent_image"] for values in inputs]
    for run, values in zip(runs, inputs):
        run.announce(sampler)
        run.meta.seeds[sampler] = values["seed"]
        run.notes["batch"] = {"size": len(runs), "jobs": [r.prompt_id for r in runs]}
    # each job's own seed's noise, exactly what its solo KSampler would draw
    noise = torch.cat([sampling.prepare_noise(latent.samples, values["seed"], latent.batch_index)
                       for latent, values in zip(latents, inputs)])
    sigmas = samplers.ksampler_sigmas(first["scheduler"], first["steps"], first["denoise"],
                                      first["model"].model_sampling, sampler_name=first["sampler_name"])

    def report(node: str, value: int, total: int) -> None:
        for run in runs:
            run.emit(Progress(run.prompt_id, node, value, total))

    # a batch-mate's cancel (or a stop) interrupts the batch; the queue puts the others back
    ctx = replace(runs[0].context(sampler), report_progress=report,
                  is_cancelled=lambda: any(run.is_cancelled() for run in runs))
    started = time.perf_counter()
    stats_before = runs[0].executor.models.stats_snapshot()
    try:
        out = sampling.run_sampler(ctx, first["model"], Latent(torch.cat([latent.samples for latent in latents])),
                                   noise, sigmas, first["sampler_name"], first["scheduler"], first["seed"],
                                   first["cfg"], [values["positive"] for values in inputs],
                                   [values["negative"] for values in inputs],
                                   sizes=[len(latent.samples) for latent in latents])
    except Exception as err:
        return [run.fail(sampler, err) for run in runs]
    finally:
        for run in runs:  # LoRA switches for the shared UNet: every job of the batch needed them
            run.add_model_activity(stats_before)
    seconds = time.perf_counter() - started
    chunks = out.samples.split([len(latent.samples) for latent in latents])
    for run, chunk, latent in zip(runs, chunks, latents):
        run.provide(sampler, Output((Latent(chunk, latent.batch_index),)), seconds)
    return [None] * len(runs)
