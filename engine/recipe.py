"""What made an image, read off the workflow: the A1111 `parameters` text written into each PNG.

From the saving node the graph is walked upstream to the sampler, its prompts, its checkpoint
and LoRAs; values a run decided (model hashes, token usage) come from the run's meta. A custom-sampling
sampler (SamplerCustom, SamplerCustomAdvanced) is read through the nodes it takes: its SAMPLER node's sampler
name, its SIGMAS scheduler's steps, schedule and denoise, and for the advanced one its NOISE node's seed and its
GUIDER's cfg, prompts and model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.graph import is_link, walk
from engine.models.paths import display_name
from engine.pngmeta import A1111_SAMPLER_NAMES, A1111_SCHEDULE_NAMES, parameters_text
from prompts.chunks import CHUNK_TOKENS

if TYPE_CHECKING:
    from engine.nodes.base import RunContext

__all__ = ["describe", "image_parameters", "upstream", "usage_text"]

SAMPLERS = ("KSampler", "KSamplerAdvanced")
CUSTOM_SAMPLERS = ("SamplerCustom", "SamplerCustomAdvanced")
ENCODERS = ("CLIPTextEncode", "CLIPTextEncodeSDXL")
# The sampler a Sampler* options node stands for (comfy_extras/nodes_custom_sampler.py); KSamplerSelect names its own.
_OPTION_SAMPLERS = {
    "SamplerEulerAncestral": "euler_ancestral", "SamplerEulerAncestralCFGPP": "euler_ancestral_cfg_pp",
    "SamplerLMS": "lms", "SamplerDPMPP_3M_SDE": "dpmpp_3m_sde", "SamplerDPMPP_2M_SDE": "dpmpp_2m_sde",
    "SamplerDPMPP_SDE": "dpmpp_sde", "SamplerDPMPP_2S_Ancestral": "dpmpp_2s_ancestral",
    "SamplerDPMAdaptative": "dpm_adaptive", "SamplerER_SDE": "er_sde", "SamplerSASolver": "sa_solver",
}
# A SIGMAS scheduler node's schedule: one of KSampler's under its ComfyUI name, or A1111's name for it (A1111 has
# Align Your Steps, its GITS variant and Polyexponential too); other nodes go by their own name.
_NODE_SCHEDULES = {"KarrasScheduler": "karras", "ExponentialScheduler": "exponential", "BetaSamplingScheduler": "beta",
                   "AlignYourStepsScheduler": "Align Your Steps", "GITSScheduler": "Align Your Steps GITS",
                   "PolyexponentialScheduler": "Polyexponential"}


def upstream(prompt: dict[str, Any], start: str, input_name: str | None = None) -> Iterator[tuple[str, dict]]:
    """Nodes above `start` (through one input only, if named), nearest first."""
    def sources(node_id: str, only: str | None = None) -> list[str]:
        inputs = prompt.get(node_id, {}).get("inputs", {})
        return [v[0] for k, v in inputs.items() if is_link(v) and (only is None or k == only) and v[0] in prompt]

    for node_id in walk(sources(start, input_name), sources):
        yield node_id, prompt[node_id]


def _first(prompt: dict[str, Any], start: str, input_name: str | None,
           class_types: tuple[str, ...]) -> tuple[str, dict] | None:
    return next(((i, n) for i, n in upstream(prompt, start, input_name) if n.get("class_type") in class_types), None)


def _text_of(node: dict[str, Any]) -> str:
    inputs = node.get("inputs", {})
    text = inputs.get("text", inputs.get("text_g", ""))
    return text if isinstance(text, str) else ""


def usage_text(tokens: Mapping[str, Any], positive: str | None, negative: str | None, *, separator: str = " · ",
               notes: bool = True) -> str | None:
    """`prompt 42/75 · negative 9/75` from a run's token reports by encode node; None when neither reported.

    `notes` adds the chunks and the tokens a cap cut (`50/150 (2 chunks, 3 cut)`) when a prompt needed more.
    """
    parts = [f"{label} {usage}" for label, node_id in (("prompt", positive), ("negative", negative))
             if node_id and (usage := _usage(tokens.get(node_id), notes))]
    return separator.join(parts) or None


def _usage(report: Mapping[str, Any] | None, notes: bool) -> str | None:
    if not report:
        return None
    report = report.get("text_g", report)  # SDXL's dual encode: the bigger encoder's count
    total, chunks = int(report.get("tokens", 0)), max(1, int(report.get("chunks", 1)))
    text = f"{total}/{CHUNK_TOKENS * chunks}"
    shown = [f"{chunks} chunks"] if chunks > 1 else []
    if report.get("truncated"):
        shown.append(f"{report['truncated']} cut")
    return f"{text} ({', '.join(shown)})" if notes and shown else text


@dataclass(frozen=True)
class _Sampling:
    """What A1111's fields say of one sampler node, and where its model and prompts come in."""

    steps: Any
    sampler_name: Any
    schedule: Any  # A1111's "Schedule type"
    cfg: Any
    seed: Any
    denoise: Any
    model: tuple[str, str]  # (node id, input name) the MODEL comes in through
    positive: tuple[str, str]
    negative: tuple[str, str]


def _sampling(prompt: dict[str, Any], sampler_id: str, sampler: dict[str, Any]) -> _Sampling:
    inputs = sampler.get("inputs", {})
    if sampler.get("class_type") in SAMPLERS:
        scheduler = inputs.get("scheduler")
        return _Sampling(inputs.get("steps"), inputs.get("sampler_name"), A1111_SCHEDULE_NAMES.get(str(scheduler),
                         scheduler), inputs.get("cfg"), inputs.get("seed", inputs.get("noise_seed")),
                         inputs.get("denoise"), (sampler_id, "model"), (sampler_id, "positive"),
                         (sampler_id, "negative"))
    chosen = _first(prompt, sampler_id, "sampler", ("KSamplerSelect", *_OPTION_SAMPLERS))
    name = None
    if chosen is not None:
        name = _OPTION_SAMPLERS.get(str(chosen[1].get("class_type")), chosen[1].get("inputs", {}).get("sampler_name"))
    schedule = steps = denoise = None
    # the first scheduler node up the SIGMAS input (SplitSigmas, ExtendIntermediateSigmas ... pass on its schedule)
    scheduler = next(((i, n) for i, n in upstream(prompt, sampler_id, "sigmas")
                      if str(n.get("class_type")).endswith("Scheduler") and isinstance(n.get("inputs"), dict)), None)
    if scheduler is not None:
        kind, given = str(scheduler[1].get("class_type")), scheduler[1]["inputs"]
        steps, denoise = given.get("steps"), given.get("denoise")
        named = given.get("scheduler") if kind == "BasicScheduler" else _NODE_SCHEDULES.get(kind)
        schedule = A1111_SCHEDULE_NAMES.get(str(named), named) if named else kind.removesuffix("Scheduler")
    if sampler.get("class_type") == "SamplerCustom":
        return _Sampling(steps, name, schedule, inputs.get("cfg"), inputs.get("noise_seed"), denoise,
                         (sampler_id, "model"), (sampler_id, "positive"), (sampler_id, "negative"))
    noise = _first(prompt, sampler_id, "noise", ("RandomNoise",))
    guider = _first(prompt, sampler_id, "guider", ("CFGGuider", "BasicGuider", "DualCFGGuider"))
    guider_id, guided = guider if guider is not None else ("", {})
    given = guided.get("inputs", {})
    positive = {"BasicGuider": "conditioning", "DualCFGGuider": "cond1"}.get(str(guided.get("class_type")), "positive")
    cfg = 1.0 if guided.get("class_type") == "BasicGuider" else given.get("cfg", given.get("cfg_conds"))
    return _Sampling(steps, name, schedule, cfg, noise[1]["inputs"].get("noise_seed") if noise else None, denoise,
                     (guider_id, "model"), (guider_id, positive), (guider_id, "negative"))


def describe(prompt: dict[str, Any], save_node: str, meta: Any) -> dict[str, Any] | None:
    """The recipe of the images a node saved: prompt, negative and A1111's key/value fields."""
    found = _first(prompt, save_node, None, SAMPLERS + CUSTOM_SAMPLERS)
    if found is None:
        return None
    run = _sampling(prompt, *found)
    positive = _first(prompt, *run.positive, ENCODERS)
    negative = _first(prompt, *run.negative, ENCODERS)
    checkpoint = _first(prompt, *run.model, ("CheckpointLoaderSimple",))
    loras = [n["inputs"] for _, n in upstream(prompt, *run.model)
             if n.get("class_type") in ("LoraLoader", "LoraLoaderModelOnly")]
    encoder = positive[0] if positive else ""
    clip_skip = next((n["inputs"].get("stop_at_clip_layer") for _, n in upstream(prompt, encoder)
                      if n.get("class_type") == "CLIPSetLastLayer"), None)
    ckpt_name = checkpoint[1]["inputs"].get("ckpt_name") if checkpoint else None
    hashes = meta.models.get("checkpoints", {}) if meta is not None else {}
    tokens = meta.tokens if meta is not None else {}
    fields: dict[str, Any] = {
        "Steps": run.steps,
        "Sampler": A1111_SAMPLER_NAMES.get(str(run.sampler_name), run.sampler_name),
        "Schedule type": run.schedule,
        "CFG scale": run.cfg,
        "Seed": run.seed,
        "Size": None,
        "Model hash": hashes.get(ckpt_name, {}).get("hash") if ckpt_name else None,
        "Model": display_name(ckpt_name) if isinstance(ckpt_name, str) else None,
        "Denoising strength": run.denoise if run.denoise not in (None, 1.0) else None,
        "Clip skip": -clip_skip if isinstance(clip_skip, int) and clip_skip < -1 else None,
        "Lora": ", ".join(f"{l.get('lora_name')}: {l.get('strength_model')}" for l in loras) or None,
        "Token usage": usage_text(tokens, positive[0] if positive else None, negative[0] if negative else None,
                                  separator=", ", notes=False),
        "Version": "Noodle",
    }
    return {"prompt": _text_of(positive[1]) if positive else "",
            "negative": _text_of(negative[1]) if negative else "", "fields": fields}


def image_parameters(ctx: RunContext, width: int, height: int) -> str | None:
    """A1111's `parameters` text for the images the current node saves, or None without a sampler."""
    recipe = describe(ctx.prompt, ctx.node_id, ctx.meta)
    if recipe is None:
        return None
    recipe["fields"]["Size"] = f"{width}x{height}"
    return parameters_text(recipe["prompt"], recipe["negative"], recipe["fields"])
