"""What made an image, read off the workflow: the A1111 `parameters` text written into each PNG.

From the saving node the graph is walked upstream to the sampler, its prompts, its checkpoint
and LoRAs; values a run decided (model hashes, token usage) come from the run's meta.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from engine.graph import is_link, walk
from engine.models.paths import display_name
from engine.pngmeta import A1111_SAMPLER_NAMES, A1111_SCHEDULE_NAMES, parameters_text
from prompts.chunks import CHUNK_TOKENS

if TYPE_CHECKING:
    from engine.nodes.base import RunContext

__all__ = ["describe", "image_parameters", "upstream", "usage_text"]

SAMPLERS = ("KSampler", "KSamplerAdvanced")
ENCODERS = ("CLIPTextEncode", "CLIPTextEncodeSDXL")


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


def describe(prompt: dict[str, Any], save_node: str, meta: Any) -> dict[str, Any] | None:
    """The recipe of the images a node saved: prompt, negative and A1111's key/value fields."""
    found = _first(prompt, save_node, None, SAMPLERS)
    if found is None:
        return None
    sampler_id, sampler = found
    inputs = sampler.get("inputs", {})
    positive = _first(prompt, sampler_id, "positive", ENCODERS)
    negative = _first(prompt, sampler_id, "negative", ENCODERS)
    checkpoint = _first(prompt, sampler_id, "model", ("CheckpointLoaderSimple",))
    loras = [n["inputs"] for _, n in upstream(prompt, sampler_id, "model")
             if n.get("class_type") in ("LoraLoader", "LoraLoaderModelOnly")]
    clip_skip = next((n["inputs"].get("stop_at_clip_layer") for _, n in upstream(prompt, positive[0] if positive else "")
                      if n.get("class_type") == "CLIPSetLastLayer"), None)
    ckpt_name = checkpoint[1]["inputs"].get("ckpt_name") if checkpoint else None
    hashes = meta.models.get("checkpoints", {}) if meta is not None else {}
    tokens = meta.tokens if meta is not None else {}
    scheduler = inputs.get("scheduler")
    fields: dict[str, Any] = {
        "Steps": inputs.get("steps"),
        "Sampler": A1111_SAMPLER_NAMES.get(str(inputs.get("sampler_name")), inputs.get("sampler_name")),
        "Schedule type": A1111_SCHEDULE_NAMES.get(str(scheduler), scheduler),
        "CFG scale": inputs.get("cfg"),
        "Seed": inputs.get("seed", inputs.get("noise_seed")),
        "Size": None,
        "Model hash": hashes.get(ckpt_name, {}).get("hash") if ckpt_name else None,
        "Model": display_name(ckpt_name) if isinstance(ckpt_name, str) else None,
        "Denoising strength": inputs.get("denoise") if inputs.get("denoise", 1.0) != 1.0 else None,
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
