"""LoRA tags in prompt text: `<lora:name>`, `<lora:name:0.8>`, `<lora:name:0.8:0.5>`.

The tags are taken out of the text (they must never reach the tokenizer) and returned; the
engine looks the names up in `models/loras/` and applies them (`closest_names` gives its
"closest: ..." hint for a name it cannot find).

Weight order: one number sets both; two numbers are `unet:clip`, the order of ComfyUI's
LoraLoader (strength_model, strength_clip) and of ComfyUI's tag-loader nodes. A1111 reads a
second number as the text encoder's and a third as the UNet's (`<lora:name:te:unet>`), so an
A1111 prompt with two different numbers swaps them here: the named forms `unet=`/`model=` and
`clip=`/`te=` (`<lora:name:te=0.5:unet=0.8>`) mean the same thing everywhere.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from .errors import PromptError
from .names import closest_names

__all__ = ["LoraTag", "closest_names", "extract_lora_tags"]

_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
# a decimal number, an exponent allowed as float() (A1111's reading) and the emphasis parser take one
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
MAX_STRENGTH = 100.0  # LoraLoader's strength range in ComfyUI, and the loras: option's
_NAMED = {"unet": "unet", "model": "unet", "clip": "clip", "te": "clip"}


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` tag: the LoRA's name as written and its UNet and CLIP strengths."""

    name: str
    unet_weight: float = 1.0
    clip_weight: float = 1.0

    def to_dict(self) -> dict[str, str | float]:
        """`{"name", "unet_weight", "clip_weight"}`, as stored in run meta."""
        return asdict(self)


def _quoted(text: str, limit: int = 60) -> str:
    """`text` as an error quotes it: cut to `limit` characters (a tag can be as long as the prompt, and the error is
    shown in a status line Discord caps at 2,000)."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _number(value: str, tag: str) -> float:
    value = value.strip()
    if not _NUMBER.fullmatch(value) or not math.isfinite(weight := float(value)):
        raise PromptError(f"LoRA tag {_quoted(tag)}: {_quoted(value)} is not a weight; write <lora:name:0.8> "
                          "or <lora:name:0.8:0.5> (UNet, then CLIP)")
    if abs(weight) > MAX_STRENGTH:  # else the graph's LoraLoader refuses it, naming a node the member never wrote
        raise PromptError(f"LoRA tag {_quoted(tag)}: strength {_quoted(value, 20)} is outside "
                          f"-{MAX_STRENGTH:g} to {MAX_STRENGTH:g}; 0.5 to 1 is usual, e.g. <lora:name:0.8>")
    return weight


def _parse_tag(tag: str, body: str) -> LoraTag:
    name, *params = body.split(":")
    name = name.strip()
    if not name:
        raise PromptError(f"LoRA tag {_quoted(tag)} has no name; write <lora:name:0.8>")
    positional: list[float] = []
    named: dict[str, float] = {}
    for param in params:
        key, equals, value = param.partition("=")
        if equals:
            field = _NAMED.get(key.strip().lower())
            if field is None:
                raise PromptError(f"LoRA tag {_quoted(tag)}: unknown setting {key.strip()!r}; use unet= or clip=")
            named[field] = _number(value, tag)
        else:
            positional.append(_number(param, tag))
    if len(positional) > 2:
        raise PromptError(f"LoRA tag {_quoted(tag)} has {len(positional)} weights; at most two (UNet, then CLIP)")
    unet = named.get("unet", positional[0] if positional else 1.0)
    # one number means both; otherwise the CLIP strength follows the UNet's unless given
    clip = named.get("clip", positional[1] if len(positional) > 1 else unet)
    return LoraTag(name, unet, clip)


def extract_lora_tags(text: str) -> tuple[str, list[LoraTag]]:
    """Remove every `<lora:...>` tag from `text`; return the remaining text and the tags in order.

    Only the tags go: the commas and spaces around them stay, as in A1111. A tag that cannot
    be read (no name, a weight that is not a number) raises `PromptError` saying how to write it.
    """
    tags = [_parse_tag(match.group(0), match.group(1)) for match in _TAG.finditer(text)]
    return (_TAG.sub("", text), tags) if tags else (text, [])
