"""What every result card is made of: the front-end neutral `Card`, the size limits its text keeps to, and the
lines /imagine's card (bot/core/cards/result.py) and /workflow's (bot/core/cards/workflow.py) both show: token
usage, timings.

Both card modules build on this one, so neither imports the other's building blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.core.storage.records import Generation
from engine.recipe import usage_text

__all__ = ["FIELD_CHARS", "PROMPT_CHARS", "Card", "first_sampler", "seconds_text", "token_usage", "truncate"]

# Discord's embed limits are 4096 (description), 1024 (field), 256 (title), 6000 (all): we stay well
# inside so a 4000-character prompt and negative still fit; ℹ️ details has the full text.
PROMPT_CHARS = 1800
FIELD_CHARS = 1000


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


def first_sampler(workflow: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The id and node of the workflow's first KSampler(Advanced), or an empty node when it has none."""
    return next(((node_id, node) for node_id, node in workflow.items()
                 if isinstance(node, dict) and node.get("class_type") in ("KSampler", "KSamplerAdvanced")),
                ("", {"inputs": {}}))


def token_usage(generation: Generation) -> str:
    """`prompt 42/75 · negative 9/75`, with chunks and cut tokens when a prompt needed more than 75."""
    _, sampler = first_sampler(generation.workflow)

    def encoder(label: str) -> str | None:  # the node the sampler's conditioning comes from
        link = sampler["inputs"].get(label)
        return str(link[0]) if isinstance(link, list) and link else None

    return usage_text(generation.tokens, encoder("positive"), encoder("negative")) or "not reported"


def seconds_text(value: float | None) -> str:
    """A duration for a card: `3.2 s`, or `–` when it was not measured."""
    return "–" if value is None else f"{value:.1f} s"
