"""ℹ️ details: everything that reproduces a result, the card, A1111's parameters text and the workflow JSON."""

from __future__ import annotations

import json

from bot.core.cards.result import card_text, result_card
from bot.core.front_end import Details
from bot.core.requests.workflow_file import is_workflow
from bot.core.storage.records import Generation

__all__ = ["details_of"]


def details_of(generation: Generation, parameters: str | None) -> Details:
    """The ℹ️ answer: the card, A1111's parameters text and the API workflow to load in ComfyUI."""
    text = card_text(result_card(generation))
    if parameters:
        text += f"\n\nA1111 parameters (PNG Info):\n{parameters}"
    if is_workflow(generation):
        text += ("\n\nThe workflow JSON is the graph as it ran (SaveImage names under the results folder, PreviewImage "
                 "saved like SaveImage): load it in ComfyUI, or run it again with /workflow.")
    else:
        text += "\n\nThe workflow JSON (image 1) is ComfyUI's API format: load it there, or run it with `noodle run`."
    if len(generation.jobs) > 1:
        seeds = ", ".join(f"#{job.idx} {job.seed}" for job in generation.jobs)
        text += f" Each image is its own job; only the KSampler seed differs: {seeds}."
    return Details(text, json.dumps(generation.workflow, indent=2), f"noodle-{generation.id}-workflow.json")
