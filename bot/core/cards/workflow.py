"""The card of a /workflow result (and of its rerolls): the file, the checkpoints it loaded, every sampler's
seed, token usage, timings; shown by both front ends like /imagine's card (bot/core/cards/result.py's
`result_card` hands workflow results here).

A workflow has no /imagine options to show: what it did is read back from its stored graph and run meta.
"""

from __future__ import annotations

from typing import Any

from bot.core.cards.card import FIELD_CHARS, PROMPT_CHARS, Card, first_sampler, seconds_text, token_usage, truncate
from bot.core.requests.workflow_file import checkpoints_of, seeds_of
from bot.core.storage.records import Generation
from engine.models.paths import display_name

__all__ = ["WORKFLOW_REACTION_HELP", "workflow_card"]

WORKFLOW_REACTION_HELP = "🔁 rerun with new seeds · 🗑️ delete · ℹ️ details"


def workflow_card(generation: Generation) -> Card:
    """The card of a finished workflow generation, from its stored row."""
    workflow = generation.workflow
    filename = str(generation.params.get("filename", "workflow.json"))
    count = len(generation.images)
    fields = [
        ("Workflow", f"{filename} · {len(workflow)} nodes · {count} image{'s' if count != 1 else ''}"),
        ("Checkpoints", _checkpoints(generation)),
        ("Seed", _seeds(seeds_of(workflow))),
    ]
    tokens = token_usage(generation)
    if tokens != "not reported":
        fields.append(("Tokens", tokens))
    fields.append(("Time", f"queue {seconds_text(generation.queue_wait_s)} · generation "
                           f"{seconds_text(generation.generation_s)}"))
    if generation.cached:
        fields.append(("Cached", f"nodes {', '.join(generation.cached)} came from the cache"))
    if generation.error:
        fields.append(("Missing", truncate(generation.error, FIELD_CHARS)))
    title = f"🔁 Reroll of #{generation.parent_id} · /workflow" if generation.kind == "reroll" else "🧩 /workflow"
    footer = f"job {generation.job_id} · #{generation.id} · {WORKFLOW_REACTION_HELP}"
    return Card(title, truncate(_prompt(workflow), PROMPT_CHARS), tuple(fields), footer)


def _checkpoints(generation: Generation) -> str:
    names = []
    for name in checkpoints_of(generation.workflow):
        short = display_name(name)
        # the hash is known for the first checkpoint (the one a result's model is)
        names.append(f"{short} ({generation.model_hash})" if name == generation.model_name and generation.model_hash
                     else short)
    return ", ".join(names) or "none loaded"


def _seeds(seeds: dict[str, int]) -> str:
    if not seeds:
        return "no sampler seed"
    if len(seeds) == 1:
        return str(next(iter(seeds.values())))
    return " · ".join(f"node {node_id}: {seed}" for node_id, seed in seeds.items())


def _prompt(workflow: dict[str, Any]) -> str:
    """The positive text of the first sampler, when it is a CLIPTextEncode with a constant text."""
    _, sampler = first_sampler(workflow)
    link = sampler.get("inputs", {}).get("positive")
    source = workflow.get(str(link[0])) if isinstance(link, list) and link else None
    text = source.get("inputs", {}).get("text") if isinstance(source, dict) else None
    return text if isinstance(text, str) else ""
