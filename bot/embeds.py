"""What a result says about itself: the card shown under the PNGs on Discord and printed by `noodle chat`.

One `Card` (title, description, fields, footer) per generation; `card_text` is the console's
rendering and `to_embed` Discord's, so both front ends show the same words. The numbers come
from the run's meta as stored: seeds, token usage per text encode, cached nodes, timings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import discord

from bot.records import Generation

__all__ = ["REACTION_HELP", "Card", "card_text", "failure_text", "result_card", "status_text", "to_embed",
           "token_usage", "truncate"]

REACTION_HELP = "🔁 reroll · 🔀 variation · 🗑️ delete · ℹ️ details"
# Discord's embed limits are 4096 (description), 1024 (field), 256 (title), 6000 (all): we stay well
# inside so a 4000-character prompt and negative still fit; ℹ️ details has the full text.
PROMPT_CHARS = 1800
FIELD_CHARS = 1000
CHUNK = 75
_LABELS = {
    "CheckpointLoaderSimple": "checkpoint", "LoraLoader": "LoRA", "LoraLoaderModelOnly": "LoRA",
    "CLIPSetLastLayer": "clip skip", "VAELoader": "VAE", "EmptyLatentImage": "empty latent",
    "LoadImage": "image", "VAEEncode": "image encode", "RepeatLatentBatch": "batch",
}


@dataclass(frozen=True)
class Card:
    """The text of a result, front-end neutral."""

    title: str
    description: str
    fields: tuple[tuple[str, str], ...]
    footer: str


def truncate(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with an ellipsis when something was cut."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _sampler(workflow: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return next(((node_id, node) for node_id, node in workflow.items()
                 if node.get("class_type") in ("KSampler", "KSamplerAdvanced")), ("", {"inputs": {}}))


def _usage(report: dict[str, Any] | None) -> str | None:
    if not report:
        return None
    report = report.get("text_g", report)  # SDXL's dual encode: the bigger encoder's count
    tokens, chunks = int(report.get("tokens", 0)), max(1, int(report.get("chunks", 1)))
    text = f"{tokens}/{CHUNK * chunks}"
    notes = [f"{chunks} chunks"] if chunks > 1 else []
    if report.get("truncated"):
        notes.append(f"{report['truncated']} cut")
    return f"{text} ({', '.join(notes)})" if notes else text


def token_usage(generation: Generation) -> str:
    """`prompt 42/75 · negative 9/75`, with chunks and cut tokens when a prompt needed more than 75."""
    sampler_id, sampler = _sampler(generation.workflow)
    parts = []
    for label in ("positive", "negative"):
        link = sampler["inputs"].get(label)
        node_id = str(link[0]) if isinstance(link, list) and link else None
        usage = _usage(generation.tokens.get(node_id)) if node_id else None
        if usage:
            parts.append(f"{'prompt' if label == 'positive' else 'negative'} {usage}")
    return " · ".join(parts) or "not reported"


def _cached(generation: Generation) -> str | None:
    if not generation.cached:
        return None
    sampler_id, sampler = _sampler(generation.workflow)
    names = []
    for node_id in generation.cached:
        class_type = generation.workflow.get(node_id, {}).get("class_type", "")
        if class_type == "CLIPTextEncode":
            positive = sampler["inputs"].get("positive", [None])[0]
            names.append("prompt" if node_id == positive else "negative")
        else:
            names.append(_LABELS.get(class_type, class_type or node_id))
    return f"{', '.join(dict.fromkeys(names))} (nodes {', '.join(generation.cached)}): only the sampler and what " \
           "follows ran"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} s"


def _loras(params: dict[str, Any]) -> str:
    entries = []
    for lora in params.get("loras", []):
        name = str(lora["name"]).rsplit("/", 1)[-1].removesuffix(".safetensors")
        model, clip = lora["strength_model"], lora["strength_clip"]
        entries.append(f"{name} {model:g}" if model == clip else f"{name} {model:g}/{clip:g}")
    return ", ".join(entries) or "none"


def _seed(generation: Generation) -> str:
    # one job per image, each with its own seed: any of them alone gives that image again
    seeds = generation.image_seeds or [job.seed for job in generation.jobs] or [generation.seed]
    if len(seeds) == 1:
        return str(seeds[0])
    return " · ".join(f"#{n} {seed}" for n, seed in enumerate(seeds, 1))


def _title(generation: Generation) -> str:
    if generation.kind == "reroll":
        return f"🔁 Reroll of #{generation.parent_id}"
    if generation.kind == "variation":
        index = generation.request.get("variation_of_image", 1)
        return f"🔀 Variation of #{generation.parent_id}, image {index}"
    return "🖼️ /imagine"


def result_card(generation: Generation) -> Card:
    """The card of a finished generation, from its stored row."""
    # /workflow results have a card of their own, built on this module: imported when first needed
    from bot.workflow_card import workflow_card
    from bot.workflow_file import is_workflow

    if is_workflow(generation):
        return workflow_card(generation)
    params = generation.params
    model = generation.model_name.rsplit("/", 1)[-1].removesuffix(".safetensors")
    count = max(1, len(generation.images) or len(generation.jobs))
    size = f"{params.get('width')}×{params.get('height')}" + (f" ×{count}" if count > 1 else "")
    if params.get("init_image"):
        size += f" · img2img, denoise {params.get('denoise'):g}"
    fields = [
        ("Negative", truncate(params.get("negative") or "–", FIELD_CHARS)),
        ("Seed", _seed(generation)),
        ("Steps · CFG · Sampler", f"{params.get('steps')} · {params.get('cfg'):g} · "
                                  f"{params.get('sampler_name')}/{params.get('scheduler')}"),
        ("Model", f"{model} ({generation.model_hash or 'hash pending'})"),
        ("LoRAs", _loras(params)),
        ("Size", size),
        ("Tokens", token_usage(generation)),
        ("Time", f"queue {_seconds(generation.queue_wait_s)} · generation {_seconds(generation.generation_s)}"),
    ]
    if params.get("clip_skip"):
        fields.insert(5, ("Clip skip", str(-int(params["clip_skip"]))))
    if generation.request.get("preset"):
        fields.insert(0, ("Preset", str(generation.request["preset"])))
    if generation.request.get("style"):
        fields.insert(1, ("Style", str(generation.request["style"])))
    cached = _cached(generation)
    if cached:
        fields.append(("Cached", cached))
    more = f" (+{len(generation.jobs) - 1} more)" if len(generation.jobs) > 1 else ""
    footer = f"job {generation.job_id}{more} · #{generation.id} · {REACTION_HELP}"
    if generation.error:  # some images of a batch failed; the others are here
        fields.append(("Missing", truncate(generation.error, FIELD_CHARS)))
    if generation.request.get("notes"):
        fields.append(("⚠️ Note", truncate("; ".join(generation.request["notes"]), FIELD_CHARS)))
    return Card(_title(generation), truncate(params.get("prompt", ""), PROMPT_CHARS), tuple(fields), footer)


def card_text(card: Card) -> str:
    """The card as plain lines: what `noodle chat` prints."""
    lines = [card.title, f"Prompt: {card.description}"]
    for name, value in card.fields:
        value = value.replace("\n", "; ")
        lines.append(f"{name}: {value}")
    lines.append(card.footer)
    return "\n".join(lines)


def to_embed(card: Card) -> discord.Embed:
    """The card as a Discord embed (inline fields for the short values)."""
    embed = discord.Embed(title=truncate(card.title, 256), description=card.description, colour=0xE8A33D)
    for name, value in card.fields:
        embed.add_field(name=name, value=truncate(value, 1024) or "–",
                        inline=name not in ("Negative", "Cached", "Tokens", "Seed"))
    embed.set_footer(text=truncate(card.footer, 2048))
    return embed


def status_text(kind: str, *, position: int | None = None, eta_s: float | None = None, value: int | None = None,
                total: int | None = None, job_id: str = "", images: int = 1, images_done: int = 0) -> str:
    """One line for the status message: the queue position, then the sampler's progress."""
    tail = (f" · {images_done}/{images} images done" if images > 1 else "") + (f" · job {job_id}" if job_id else "")
    eta = f", about {eta_s:.0f} s" if eta_s is not None else ""
    if kind == "position":
        where = "next" if position == 1 else f"#{position} in the queue" if position else "in the queue"
        return f"⏳ Queued: {where}{eta}{tail}"
    if kind == "started":
        return f"🎨 Started{tail}"
    if kind == "progress" and total:
        filled = round(12 * (value or 0) / total)
        return f"🎨 `{'█' * filled}{'░' * (12 - filled)}` step {value}/{total}{tail}"
    return f"🎨 Working{tail}"


def failure_text(generation: Generation) -> str:
    """What a failed or cancelled job tells its requester."""
    verb = "was cancelled" if generation.state == "cancelled" else "failed"
    return f"❌ Job {generation.job_id} (#{generation.id}) {verb}: {generation.error or 'no reason given'}"


def request_label(generation: Generation) -> str:
    """What a request is known by in lists: its prompt, or a /workflow's file name."""
    return str(generation.params.get("prompt") or generation.request.get("prompt")
               or generation.params.get("filename") or generation.request.get("filename") or "")


def history_line(generation: Generation) -> str:
    """One line of /history: number, kind, state, prompt, model and a link to the posted result."""
    prompt = truncate(request_label(generation), 60)
    model = generation.model_name.rsplit("/", 1)[-1].removesuffix(".safetensors")
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(generation.created_at))
    where = ""
    if generation.private and generation.message_id:
        where = " (sent to your DMs)"
    elif generation.channel_id and generation.message_id:
        where = f" https://discord.com/channels/{generation.guild_id or '@me'}/{generation.channel_id}/" \
                f"{generation.message_id}"
    elif generation.images and generation.state == "done":
        where = f" {generation.images[0]}"
    return f"#{generation.id} {generation.kind} · {generation.state} · {when} UTC · {model} · {prompt}{where}"
