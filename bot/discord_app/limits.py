"""Discord's limits on one message, checked before sending, so a result is never refused for its size.

A message carries at most 10 files and, in all, the bytes of its guild's boost tier (`Guild.filesize_limit`:
10 MiB, 50 MiB at tier 2, 100 MiB at tier 3; DMs 10 MiB); an embed has 256 characters of title, 4096 of
description, 25 fields of 256 + 1024, 2048 of footer, 256 of author and 6000 in all. `plan_message` picks what a
result message attaches: the grid of a batch (bot/core/results/grid.py) and the PNGs as SaveImage wrote them
while they fit, else smaller previews (WebP, else JPEG) downscaled until they do, with a card line saying so;
`details_messages` is what ℹ️ sends: the details and the full PNGs the result message did not carry, split over
as many messages as the limit needs. `fit_embed` cuts an embed into its limits with an ellipsis.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import discord
from PIL import Image, features

from bot.core.cards.card import truncate
from bot.core.front_end import Details
from bot.core.results.grid import grid_png, has_grid
from bot.core.storage.records import Generation

__all__ = ["DM_FILESIZE_LIMIT", "MAX_FILES", "GridFiles", "Outgoing", "details_messages", "filesize_limit",
           "fit_embed", "limit_text", "plan_message"]

GridFiles = Literal["attach", "details"]
MAX_FILES = 10  # attachments on one message
DM_FILESIZE_LIMIT = discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES  # 10 MiB: DMs, and guilds below boost tier 2
MAX_CONTENT = 2000  # characters of a message's text
EMBED_TOTAL = 6000
# what Discord counts toward EMBED_TOTAL, each with its own limit
EMBED_FIELDS, FIELD_NAME, FIELD_VALUE = 25, 256, 1024
_TEXT_LIMITS = {"title": 256, "description": 4096}
_NESTED_LIMITS = (("footer", "text", 2048), ("author", "name", 256))
PREVIEW_QUALITY = 85
PREVIEW_MIN_SIDE = 32  # past this a preview shows nothing: the card says the images are on ℹ️
PREVIEW_FORMAT = "WEBP" if features.check("webp") else "JPEG"


@dataclass(frozen=True)
class Outgoing:
    """What one result message attaches, in order, as (filename, bytes): the grid or previews, and the PNGs as
    SaveImage wrote them while they fit; `notes` are card fields saying what is not here and where it is."""

    files: tuple[tuple[str, bytes], ...]
    notes: tuple[tuple[str, str], ...] = ()


def filesize_limit(where: Any) -> int:
    """The attachment bytes one message may carry in `where` (a channel, a guild, an interaction, a user): the
    guild's boost tier's limit, or Discord's default in DMs."""
    for candidate in (where, getattr(where, "guild", None)):
        limit = getattr(candidate, "filesize_limit", None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return DM_FILESIZE_LIMIT


def limit_text(limit: int, *, private: bool) -> str:
    """`this server's 10 MB limit` / `Discord's 10 MB limit for direct messages` (Discord's own MB are MiB)."""
    size = f"{limit / 2**20:g} MB" if limit >= 2**20 else f"{limit / 1024:.0f} KB"
    return f"Discord's {size} limit for direct messages" if private else f"this server's {size} limit"


def fit_embed(embed: discord.Embed) -> discord.Embed:
    """`embed` within Discord's limits: each text cut to its own limit, at most 25 fields, then the longest
    texts cut (with an ellipsis) until all of them together are within 6000 characters."""
    data = embed.to_dict()
    for key, limit in _TEXT_LIMITS.items():
        if data.get(key):
            data[key] = truncate(str(data[key]), limit)
    fields = list(data.get("fields", []))
    if len(fields) > EMBED_FIELDS:
        extra = len(fields) - EMBED_FIELDS + 1
        fields = fields[: EMBED_FIELDS - 1] + [{"name": "…", "value": f"{extra} more: ℹ️ details has them",
                                                "inline": False}]
    for item in fields:
        item["name"] = truncate(str(item.get("name") or "–"), FIELD_NAME)
        item["value"] = truncate(str(item.get("value") or "–"), FIELD_VALUE)
    if fields:
        data["fields"] = fields
    for key, name, limit in _NESTED_LIMITS:
        if data.get(key, {}).get(name):
            data[key][name] = truncate(str(data[key][name]), limit)
    _cut_to_total(data)
    return discord.Embed.from_dict(data)


def _cut_to_total(data: dict[str, Any]) -> None:
    """Cut the longest of the embed's texts until they sum to EMBED_TOTAL: the prompt and negative first, as the
    long ones (ℹ️ details has them whole)."""
    slots: list[tuple[dict[str, Any], str]] = [(data, key) for key in ("title", "description") if data.get(key)]
    slots += [(item, part) for item in data.get("fields", []) for part in ("name", "value")]
    slots += [(data[key], name) for key, name, _ in _NESTED_LIMITS if data.get(key, {}).get(name)]
    while (excess := sum(len(holder[key]) for holder, key in slots) - EMBED_TOTAL) > 0:
        holder, key = max(slots, key=lambda slot: len(slot[0][slot[1]]))
        text = holder[key]
        if len(text) <= 1:
            break  # cannot happen within Discord's own counts (25 * 2 + 4 texts of one character)
        holder[key] = truncate(text, max(1, len(text) - excess, len(text) // 2))


def plan_message(images: Sequence[tuple[str, bytes]], *, limit: int, grid_files: GridFiles, private: bool,
                 grid_name: str = "grid.png") -> Outgoing:
    """What a result message attaches within `limit` bytes and 10 files (Pillow work: call it in a thread).

    A batch of 2-4: its grid first, with the PNGs beside it (`grid_files="attach"`) or on ℹ️ (`"details"`); past
    the limit the grid goes as a preview and, if still too big, alone. Else up to 10 PNGs, or their previews.
    """
    over = ("Full PNGs", f"too big for {limit_text(limit, private=private)}: previews shown here; ℹ️ sends them")
    if has_grid(len(images)):
        return _plan_grid(images, limit=limit, grid_files=grid_files, grid_name=grid_name, private=private,
                          over=over)
    shown = list(images[:MAX_FILES])
    notes: list[tuple[str, str]] = []
    if len(images) > len(shown):
        notes.append(("Not attached", f"{len(images) - len(shown)} more image(s): Discord takes {MAX_FILES} files "
                                      "a message"))
    if sum(len(data) for _, data in shown) <= limit:
        return Outgoing(tuple(shown), tuple(notes))
    previews = _previews([data for _, data in shown], limit)
    if previews is None:
        return Outgoing((), (*notes, _nothing_fits(limit, private)))
    named = tuple((_preview_name(name), data) for (name, _), data in zip(shown, previews, strict=True))
    return Outgoing(named, (over, *notes))


def _plan_grid(images: Sequence[tuple[str, bytes]], *, limit: int, grid_files: GridFiles, grid_name: str,
               private: bool, over: tuple[str, str]) -> Outgoing:
    grid = grid_png([data for _, data in images])
    if grid_files == "details":  # the grid alone, as PNG or preview: the PNGs are on ℹ️ either way
        notes = (("Full PNGs", "ℹ️ sends each image's PNG, with its recipe"),)
        if len(grid) <= limit:
            return Outgoing(((grid_name, grid),), notes)
        preview = _previews([grid], limit)
        if preview is None:
            return Outgoing((), (_nothing_fits(limit, private),))
        return Outgoing(((_preview_name(grid_name), preview[0]),), notes)
    pngs = tuple(images)
    png_bytes = sum(len(data) for _, data in pngs)
    if len(grid) + png_bytes <= limit:
        return Outgoing(((grid_name, grid), *pngs))
    if png_bytes < limit:  # the PNGs fit beside a smaller grid: keep them, their recipes are the point
        preview = _previews([grid], limit - png_bytes)
        if preview is not None:
            return Outgoing(((_preview_name(grid_name), preview[0]), *pngs))
    preview = _previews([grid], limit)
    if preview is None:
        return Outgoing((), (_nothing_fits(limit, private),))
    return Outgoing(((_preview_name(grid_name), preview[0]),), (over,))


def _nothing_fits(limit: int, private: bool) -> tuple[str, str]:
    return "Images", f"not even a preview fits {limit_text(limit, private=private)}; ℹ️ sends the PNGs"


def _preview_name(name: str) -> str:
    return f"{Path(name).stem}-preview.{'webp' if PREVIEW_FORMAT == 'WEBP' else 'jpg'}"


def _previews(blobs: Sequence[bytes], budget: int) -> list[bytes] | None:
    """The images re-encoded as WebP (else JPEG), all downscaled by one factor until together within `budget`
    bytes; None when even PREVIEW_MIN_SIDE previews do not fit."""
    images = []
    for data in blobs:
        with Image.open(io.BytesIO(data)) as image:
            images.append(image.convert("RGB"))
    scale = 1.0
    for _ in range(12):
        encoded = [_encode(image, scale) for image in images]
        total = sum(len(data) for data in encoded)
        if total <= budget:
            return encoded
        if min(min(image.size) for image in images) * scale <= PREVIEW_MIN_SIDE:
            return None
        # bytes go roughly with the area: aim a little under, and always shrink by a fifth at least
        scale *= min(0.8, math.sqrt(budget / total) * 0.9)
        scale = max(scale, PREVIEW_MIN_SIDE / min(min(image.size) for image in images))
    return None


def _encode(image: Image.Image, scale: float) -> bytes:
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format=PREVIEW_FORMAT, quality=PREVIEW_QUALITY)
    return out.getvalue()


async def details_messages(generation: Generation, details: Details, limit: int, *,
                           attached: Collection[str] = ()) -> list[tuple[str, list[discord.File]]]:
    """What ℹ️ sends, as (text, files) messages each within `limit` bytes and 10 files: the details text and the
    workflow JSON first, then every full PNG whose name is not in `attached` (the files on the result message:
    a grid's PNGs kept for ℹ️, previews sent for PNGs too big, images past the 10th); a PNG over `limit` alone is
    named with its path on the bot's disk instead."""
    text = details.text if len(details.text) <= MAX_CONTENT else truncate(details.text, MAX_CONTENT - 10)
    first: list[tuple[str, bytes]] = [(details.filename, details.workflow_json.encode())]
    if len(details.text) > MAX_CONTENT:  # the full text as a file too: prompts may be 4000 characters
        first.append((f"noodle-{generation.id}.txt", details.text.encode()))
    wanted = [path for path in generation.images if Path(path).name not in set(attached)]
    blobs = await asyncio.to_thread(_read_all, wanted)
    messages: list[tuple[str, list[tuple[str, bytes]]]] = [(text, first)]
    too_big: list[str] = []
    for path, data in zip(wanted, blobs, strict=True):
        name = Path(path).name
        if data is None:
            too_big.append(f"{name} is gone from the bot's disk")
            continue
        if len(data) > limit:
            too_big.append(f"{name} ({len(data) / 2**20:.1f} MB) is over Discord's {limit / 2**20:g} MB limit here;"
                           f" it is on the bot's disk at {path}")
            continue
        _, files = messages[-1]
        if len(files) >= MAX_FILES or sum(len(blob) for _, blob in files) + len(data) > limit:
            messages.append(("", []))
        messages[-1][1].append((name, data))
    parts = len(messages) - 1
    labelled = [messages[0]] + [(f"🖼️ Full PNGs of #{generation.id}, with their recipes"
                                 + (f" ({n}/{parts})" if parts > 1 else ""), files)
                                for n, (_, files) in enumerate(messages[1:], 1)]
    if too_big:
        labelled.append((truncate("\n".join(too_big), MAX_CONTENT), []))
    return [(content, [discord.File(io.BytesIO(data), filename=name) for name, data in files])
            for content, files in labelled]


def _read_all(paths: Sequence[str]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for path in paths:
        try:
            out.append(Path(path).read_bytes())
        except FileNotFoundError:
            out.append(None)
    return out
