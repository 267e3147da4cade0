"""What made an image, read off the workflow: the A1111 `parameters` text written into each PNG.

From the saving node the graph is walked upstream to the sampler, its prompts, its checkpoint
and LoRAs; values a run decided (model hashes, token usage) come from the run's meta.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from engine.graph import is_link
from engine.pngmeta import A1111_SAMPLER_NAMES, A1111_SCHEDULE_NAMES, parameters_text

if TYPE_CHECKING:
    from engine.nodes.base import RunContext

SAMPLERS = ("KSampler", "KSamplerAdvanced")
ENCODERS = ("CLIPTextEncode", "CLIPTextEncodeSDXL")


def upstream(prompt: dict[str, Any], start: str, input_name: str | None = None) -> Iterator[tuple[str, dict]]:
    """Nodes above `start` (through one input only, if named), nearest first."""
    node = prompt.get(start, {})
    inputs = node.get("inputs", {})
    queue = deque(str(v[0]) for k, v in inputs.items() if is_link(v) and (input_name is None or k == input_name))
    seen: set[str] = set()
    while queue:
        node_id = queue.popleft()
        if node_id in seen or node_id not in prompt:
            continue
        seen.add(node_id)
        yield node_id, prompt[node_id]
        queue.extend(str(v[0]) for v in prompt[node_id].get("inputs", {}).values() if is_link(v))


def _first(prompt: dict[str, Any], start: str, input_name: str, class_types: tuple[str, ...]) -> tuple[str, dict] | None:
    return next(((i, n) for i, n in upstream(prompt, start, input_name) if n.get("class_type") in class_types), None)


def _text_of(node: dict[str, Any]) -> str:
    inputs = node.get("inputs", {})
    text = inputs.get("text", inputs.get("text_g", ""))
    return text if isinstance(text, str) else ""


def _usage(tokens: dict[str, Any] | None) -> str | None:
    if not tokens:
        return None
    report = tokens.get("text_g", tokens)
    total, chunks = report.get("tokens", 0), max(1, report.get("chunks", 1))
    return f"{total}/{75 * chunks}"


def describe(prompt: dict[str, Any], save_node: str, meta: Any) -> dict[str, Any] | None:
    """The recipe of the images a node saved: prompt, negative and A1111's key/value fields."""
    found = next(((i, n) for i, n in upstream(prompt, save_node) if n.get("class_type") in SAMPLERS), None)
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
    usage = [f"{label} {u}" for label, node in (("prompt", positive), ("negative", negative))
             if node and (u := _usage(tokens.get(node[0])))]
    fields: dict[str, Any] = {
        "Steps": inputs.get("steps"),
        "Sampler": A1111_SAMPLER_NAMES.get(str(inputs.get("sampler_name")), inputs.get("sampler_name")),
        "Schedule type": A1111_SCHEDULE_NAMES.get(str(scheduler), scheduler),
        "CFG scale": inputs.get("cfg"),
        "Seed": inputs.get("seed", inputs.get("noise_seed")),
        "Size": None,
        "Model hash": hashes.get(ckpt_name, {}).get("hash") if ckpt_name else None,
        "Model": ckpt_name.rsplit("/", 1)[-1].removesuffix(".safetensors") if isinstance(ckpt_name, str) else None,
        "Denoising strength": inputs.get("denoise") if inputs.get("denoise", 1.0) != 1.0 else None,
        "Clip skip": -clip_skip if isinstance(clip_skip, int) and clip_skip < -1 else None,
        "Lora": ", ".join(f"{l.get('lora_name')}: {l.get('strength_model')}" for l in loras) or None,
        "Token usage": ", ".join(usage) or None,
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
