"""A member's prompt -> the text that is encoded, stored and shown, and the LoRAs its tags name: one place, one order.

1. the style (prompts/styles.toml) wraps the prompt and adds its negative, so a style's own wildcards and
   `<lora:>` tags expand like the member's;
2. wildcards (`{red|green}`, `__colour__`) resolve with the image's seed, so a seed gives the same text again;
3. `<lora:name:w>` tags leave the text and join the `loras:` option's choices (after them), resolved by the
   same rule as every other name (bot/core/requests/names.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bot.core.requests.names import resolve_name
from engine.templates import LoraChoice
from prompts.loras import extract_lora_tags
from prompts.styles import apply_style
from prompts.wildcards import resolve_wildcards

__all__ = ["ExpandedPrompt", "expand_prompt"]


@dataclass(frozen=True)
class ExpandedPrompt:
    """A prompt after style, wildcards and `<lora:...>` tags: what is encoded, stored and shown."""

    prompt: str
    negative: str
    loras: tuple[LoraChoice, ...]


def expand_prompt(prompt: str, negative: str, *, seed: int, available_loras: Sequence[str], style: str | None = None,
                  loras: tuple[LoraChoice, ...] = ()) -> ExpandedPrompt:
    """Style, then wildcards with `seed`, then `<lora:>` tags (after the chosen `loras`).

    An unknown style or a broken wildcard raises PromptError; a tag naming no file of the loras folder
    raises ModelNotFound with the closest names.
    """
    if style:
        prompt, negative = apply_style(style, prompt, negative)
    text, tags = extract_lora_tags(resolve_wildcards(prompt, seed))
    negative = resolve_wildcards(negative, seed)
    chosen = [*loras, *(LoraChoice(resolve_name("LoRA", tag.name, available_loras, "models/loras"),
                                   tag.unet_weight, tag.clip_weight) for tag in tags)]
    return ExpandedPrompt(" ".join(text.split()) if tags else text, negative, tuple(chosen))
