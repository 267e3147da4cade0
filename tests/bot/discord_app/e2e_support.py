"""What the SimCord end-to-end tests read back from the virtual Discord: the status edits of an interaction, the
PNG chunks of a posted file, an embed's fields, the reactions on a message. Tiny jobs: 64 px, 2 steps."""

from __future__ import annotations

import io
import json
from typing import Any

import discord
from PIL import Image

SMALL = {"steps": 2, "width": 64, "height": 64}


def status_edits(env: Any, result: Any) -> list[str]:
    """Every text the bot put in an interaction's own (deferred) response, in order."""
    token = f"simcord_interaction_{result._interaction.id}/"
    return [entry.json["content"] for entry in env.http_requests
            if entry.method == "PATCH" and token in entry.path and entry.path.endswith("@original")
            and entry.json and "content" in entry.json]


def posts(env: Any, channel_id: int) -> list[Any]:
    """The bot's POSTs of messages to a channel (tries included), as logged by SimCord."""
    return [entry for entry in env.http_requests
            if entry.method == "POST" and entry.path == f"/channels/{channel_id}/messages"]


def png_texts(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG (`prompt`, `parameters`, `workflow`)."""
    return dict(Image.open(io.BytesIO(data)).text)


def field(embed: discord.Embed, name: str) -> str:
    return next(f.value for f in embed.fields if f.name == name)


def emojis(message: discord.Message) -> list[str]:
    return [str(reaction.emoji) for reaction in message.reactions]


def workflow_file(workflow: dict[str, Any]) -> tuple[str, bytes]:
    """An attachment for /workflow: a ComfyUI API-format JSON."""
    return "fox.json", json.dumps(workflow).encode()


def png_file(size: tuple[int, int] = (72, 64), mode: str = "RGB", color: Any = (30, 120, 200)) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return "wall.png", buffer.getvalue()


def mark_nsfw(bot: Any, channel: Any) -> None:
    """Mark `channel` age-restricted as the bot sees it. SimCord 3.2.1 keeps no NSFW flag on channels (its channel
    payloads carry none), so the bot's cached channel gets the flag a CHANNEL_UPDATE from Discord would set."""
    bot.get_channel(channel.id).nsfw = True
