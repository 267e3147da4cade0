"""Model names as people type them -> the files of a models folder: one resolver, one case rule, for every path
(`model:`, `loras:`, `vae:`, `<lora:...>` tags in a prompt, presets), and the autocomplete suggestions.

A name matches exactly, then with `.safetensors`, then by its stem in any case (`Detail`, `detail` and
`detail.safetensors` all name `detail.safetensors`); two files whose stems differ only in case are
ambiguous by stem and must be named exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from engine.errors import ModelNotFound
from engine.models.paths import SAFE_SUFFIX, display_name
from prompts.names import closest_names

__all__ = ["lora_suggestions", "name_suggestions", "resolve_name"]


def resolve_name(kind: str, name: str, available: Sequence[str], folder: str) -> str:
    """The file of `available` that `name` means: exact, then with `.safetensors`, then by stem, any case.

    Raises ModelNotFound naming the closest files (or listing the folder) when none matches.
    """
    wanted = name.strip()
    for candidate in (wanted, f"{wanted}{SAFE_SUFFIX}"):
        if candidate in available:
            return candidate
    folded = wanted.lower().removesuffix(SAFE_SUFFIX)
    by_stem = [n for n in available if display_name(n.lower()) == folded]
    if len(by_stem) == 1:
        return by_stem[0]
    raise ModelNotFound(kind, wanted, folder, closest_names(wanted, available) or available)


def name_suggestions(current: str, available: Iterable[str], limit: int = 25) -> list[str]:
    """Autocomplete: names containing what was typed (case-insensitive), prefix matches first."""
    typed = current.strip().lower()
    names = list(available)
    starts = [n for n in names if n.lower().startswith(typed)]
    contains = [n for n in names if typed in n.lower() and n not in starts]
    return (starts + contains)[:limit]


def lora_suggestions(current: str, available: Iterable[str], limit: int = 25) -> list[str]:
    """Autocomplete for `loras`: keep what is typed before the last comma, complete the last entry's name."""
    head, comma, last = current.rpartition(",")
    prefix = f"{head}{comma} " if comma else ""
    name, colon, weight = last.strip().partition(":")
    suffix = f":{weight}" if colon else ":1.0"
    out = []
    for found in name_suggestions(name, available, limit):
        value = f"{prefix}{found.removesuffix(SAFE_SUFFIX)}{suffix}".strip()
        if len(value) <= 100:  # Discord's limit on a choice's name and value
            out.append(value)
    return out
