"""What a result says about itself: the card shown under the PNGs on Discord and printed by `noodle chat`.

One `Card` (title, description, fields, footer) per generation; `card_text` is the console's rendering and
bot/discord_app/embeds.py's `to_embed` Discord's, so both front ends show the same words. The numbers come
from the run's meta as stored: seeds, token usage per text encode, cached nodes, timings. `Card` and the
lines every card shares are in bot/core/cards/card.py; a /workflow result's card is bot/core/cards/workflow.py's.
Also here: the status, failure and /history lines, and the label a request is listed by.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from bot.core.cards.card import FIELD_CHARS, PROMPT_CHARS, Card, first_sampler, seconds_text, token_usage, truncate
from bot.core.cards.workflow import workflow_card
from bot.core.requests.workflow_file import is_workflow
from bot.core.storage.records import Generation
from engine.models.paths import display_name

__all__ = ["REACTION_HELP", "card_text", "failure_text", "history_line", "message_link", "request_label", "result_card",
           "status_text"]

REACTION_HELP = "🔁 reroll · 🔀 variation · 🗑️ delete · ℹ️ details"
_LABELS = {
    "CheckpointLoaderSimple": "checkpoint", "LoraLoader": "LoRA", "LoraLoaderModelOnly": "LoRA",
    "CLIPSetLastLayer": "clip skip", "VAELoader": "VAE", "EmptyLatentImage": "empty latent",
    "LoadImage": "image", "VAEEncode": "image encode", "RepeatLatentBatch": "batch",
    "SetLatentNoiseMask": "inpaint mask", "ControlNetLoader": "ControlNet", "Canny": "canny edges",
    "ControlNetApplyAdvanced": "ControlNet apply", "UpscaleModelLoader": "upscale model",
    "ImageUpscaleWithModel": "model upscale", "ImageScale": "resize", "LatentUpscale": "latent upscale",
    "ImagePadForOutpaint": "outpaint pad", "VAEEncodeForInpaint": "inpaint encode",
}


def _cached(generation: Generation) -> str | None:
    if not generation.cached:
        return None
    sampler_id, sampler = first_sampler(generation.workflow)
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


def _loras(params: dict[str, Any]) -> str:
    entries = []
    for lora in params.get("loras", []):
        name = display_name(str(lora["name"]))
        model, clip = lora["strength_model"], lora["strength_clip"]
        entries.append(f"{name} {model:g}" if model == clip else f"{name} {model:g}/{clip:g}")
    return ", ".join(entries) or "none"


def _controlnet(params: dict[str, Any]) -> str:
    hint = "canny edges of the control image" if params.get("control_canny") else "control image as given"
    return f"{display_name(str(params['controlnet']))} · strength {params.get('control_strength', 1.0):g} · {hint}"


def _seed(generation: Generation) -> str:
    # one job per image, each with its own seed: any of them alone gives that image again
    seeds = generation.image_seeds or [job.seed for job in generation.jobs] or [generation.seed]
    if len(seeds) == 1:
        return str(seeds[0])
    return " · ".join(f"#{n} {seed}" for n, seed in enumerate(seeds, 1))


def _title(generation: Generation) -> str:
    request, parent = generation.request, generation.parent_id
    if generation.kind == "reroll":
        return f"🔁 Reroll of #{parent}"
    if generation.kind == "variation":
        index = request.get("variation_of_image", 1)
        strength = f" ({request['vary']})" if request.get("vary") else ""
        return f"🔀 Variation{strength} of #{parent}, image {index}"
    if generation.kind == "upscale":
        return f"🔍 Upscale of #{parent}, image {request.get('upscale_of_image', 1)}"
    if generation.kind == "outpaint":
        what = f"Zoom out {request['zoom']}×" if request.get("zoom") else f"Pan {request.get('pan', '')}".rstrip()
        return f"🔭 {what} of #{parent}, image {request.get('outpaint_of_image', 1)}"
    if generation.kind == "remix":
        return f"✏️ Remix of #{parent}"
    return "🖼️ /imagine"


def _action(generation: Generation) -> tuple[str, str] | None:
    """Which path an upscale, an outpaint or a vary ran, in words (also on a reroll of one: the same graph)."""
    params, request = generation.params, generation.request
    if params.get("init_image") and params.get("outpaint"):
        what = f"Zoomed out {request['zoom']}×" if request.get("zoom") else \
            f"Panned {request['pan']}" if request.get("pan") else "Outpainted"
        left, top, right, bottom = params["outpaint"]
        how = f"inpainting model {display_name(str(params['inpaint_checkpoint']))}" \
            if params.get("inpaint_checkpoint") else f"masked sampling on {display_name(generation.model_name)}"
        return "Outpaint", f"{what}: the canvas grown by {left}/{top}/{right}/{bottom} px (left/top/right/bottom), " \
                           f"filled by {how}"
    if params.get("init_image") and params.get("upscale_by", 1.0) != 1.0:
        factor = f"{params['upscale_by']:g}×"
        path = f"with {display_name(str(params['upscale_model']))}" if params.get("upscale_model") else \
            "in latent space"
        return "Upscale", f"Upscaled {factor} {path}, then hires fix at denoise {params.get('denoise', 1.0):g}"
    if generation.kind == "variation" and request.get("vary"):
        return "Vary", f"Vary ({request['vary']}): img2img of image {request.get('variation_of_image', 1)} of " \
                       f"#{generation.parent_id} at denoise {params.get('denoise', 1.0):g}"
    return None


def result_card(generation: Generation) -> Card:
    """The card of a finished generation, from its stored row."""
    if is_workflow(generation):
        return _with_safety(generation, workflow_card(generation))
    params = generation.params
    model = display_name(generation.model_name)
    count = max(1, len(generation.images) or len(generation.jobs))
    size = f"{params.get('width')}×{params.get('height')}" + (f" ×{count}" if count > 1 else "")
    action = _action(generation)
    if params.get("init_image") and (action is None or action[0] == "Vary"):
        kind = "inpaint (the image's transparent area)" if params.get("inpaint") else "img2img"
        size += f" · {kind}, denoise {params.get('denoise'):g}"
    fields = [
        ("Negative", truncate(params.get("negative") or "–", FIELD_CHARS)),
        ("Seed", _seed(generation)),
        ("Steps · CFG · Sampler", f"{params.get('steps')} · {params.get('cfg'):g} · "
                                  f"{params.get('sampler_name')}/{params.get('scheduler')}"),
        ("Model", f"{model} ({generation.model_hash or 'hash pending'})"),
        ("LoRAs", _loras(params)),
        ("Size", size),
        ("Tokens", token_usage(generation)),
        ("Time", f"queue {seconds_text(generation.queue_wait_s)} · "
                 f"generation {seconds_text(generation.generation_s)}"),
    ]
    if action is not None:
        fields.insert(5, action)
    if params.get("controlnet"):
        fields.insert(5, ("ControlNet", _controlnet(params)))
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
    return _with_safety(generation, Card(_title(generation), truncate(params.get("prompt", ""), PROMPT_CHARS),
                                         tuple(fields), footer))


def _with_safety(generation: Generation, card: Card) -> Card:
    """The card, with a line saying why it is behind a spoiler when the server's rules put it there."""
    if generation.safety != "spoiler":
        return card
    line = ("NSFW", f"classifier score {generation.nsfw_score or 0:.2f}: behind a spoiler by this server's rules")
    return replace(card, fields=(*card.fields, line))


def card_text(card: Card) -> str:
    """The card as plain lines: what `noodle chat` prints."""
    lines = [card.title, f"Prompt: {card.description}"]
    for name, value in card.fields:
        value = value.replace("\n", "; ")
        lines.append(f"{name}: {value}")
    lines.append(card.footer)
    return "\n".join(lines)


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


def message_link(generation: Generation) -> str:
    """The Discord link of the message a result was posted as, or "" when it was posted in no channel."""
    if not (generation.channel_id and generation.message_id):
        return ""
    where = f"{generation.guild_id or '@me'}/{generation.channel_id}/{generation.message_id}"
    return f"https://discord.com/channels/{where}"


def history_line(generation: Generation) -> str:
    """One line of /history: number, kind, state, prompt, model and a link to the posted result."""
    prompt = truncate(request_label(generation), 60)
    model = display_name(generation.model_name)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(generation.created_at))
    link = message_link(generation)
    where = ""
    if generation.private and generation.message_id:
        where = " (sent to your DMs)"
    elif link:
        where = f" {link}"
    elif generation.images and generation.state == "done":
        where = f" {generation.images[0]}"
    return f"#{generation.id} {generation.kind} · {generation.state} · {when} UTC · {model} · {prompt}{where}"
