"""Option strings as people type them: `loras: detail:0.8, style:0.5`, model names without `.safetensors`,
and the console's `/imagine prompt: a red fox seed: 42` lines.

Parsers only: they return plain values or raise `RequestInvalid` saying how to write the option.
bot/core/requests/imagine.py checks the values against config and the models folder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from bot.core.errors import RequestInvalid

__all__ = ["IMAGINE_OPTIONS", "LoraSpec", "parse_loras", "parse_options"]

# The /imagine options in Discord's order; the console accepts the same names.
IMAGINE_OPTIONS: tuple[str, ...] = (
    "prompt", "negative", "model", "loras", "steps", "cfg", "sampler", "scheduler", "seed", "width", "height",
    "batch", "image", "denoise", "control_image", "controlnet", "control_strength", "control_canny", "clip_skip",
    "private",
)
LORA_WEIGHT_LIMIT = 100.0  # LoraLoader's strength range in ComfyUI: -100..100
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


@dataclass(frozen=True)
class LoraSpec:
    """One entry of the `loras` option: a name as typed and its UNet and CLIP strengths."""

    name: str
    strength_model: float = 1.0
    strength_clip: float = 1.0


def _weight(text: str, entry: str) -> float:
    text = text.strip()
    if not _NUMBER.fullmatch(text) or not math.isfinite(value := float(text)):
        raise RequestInvalid(f"loras: {text!r} in {entry!r} is not a strength; write name:0.8 "
                             "(or name:0.8:0.5 for UNet, then CLIP), entries separated by commas")
    if abs(value) > LORA_WEIGHT_LIMIT:
        raise RequestInvalid(f"loras: strength {value:g} in {entry!r} is outside -100..100 (ComfyUI's LoraLoader "
                             "range); most LoRAs work between 0.3 and 1.2")
    return value


def parse_loras(text: str | None) -> tuple[LoraSpec, ...]:
    """`"detail:0.8, style:0.5:0.3, plain"` -> LoraSpecs; one number sets both strengths, as a `<lora:..>` tag."""
    if text is None or not text.strip():
        return ()
    specs = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, *weights = entry.split(":")
        name = name.strip()
        if not name:
            raise RequestInvalid(f"loras: {entry!r} has no name; write name:0.8, other:0.5")
        if len(weights) > 2:
            raise RequestInvalid(f"loras: {entry!r} has {len(weights)} strengths; at most two (UNet, then CLIP)")
        unet = _weight(weights[0], entry) if weights else 1.0
        clip = _weight(weights[1], entry) if len(weights) > 1 else unet
        specs.append(LoraSpec(name, unet, clip))
    return tuple(specs)


def parse_options(text: str, names: Sequence[str] = IMAGINE_OPTIONS, first: str = "prompt") -> dict[str, str]:
    """`prompt: a red fox seed: 42 steps: 8` -> {"prompt": "a red fox", "seed": "42", "steps": "8"}.

    Discord's own notation: an option's value runs to the next `name:` (after a space) of a known option. Text
    before any option name belongs to `first`, so `/imagine a red fox` works too. A known name
    twice is refused rather than one silently winning.
    """
    pattern = re.compile(r"(?:(?<=\s)|^)(" + "|".join(re.escape(n) for n in names) + r"):")
    found: dict[str, str] = {}
    matches = list(pattern.finditer(text))
    lead = text[: matches[0].start() if matches else len(text)].strip()
    if lead:
        found[first] = lead
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        name, value = match.group(1), text[match.end():end].strip()
        if name in found:
            raise RequestInvalid(f"option {name}: is given twice; give each option once")
        found[name] = value
    return found
