"""Fuzzy name suggestions ("closest: ...") for LoRAs, styles, wildcards and embeddings."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import PurePosixPath

__all__ = ["closest_names"]

_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".txt")


def _stem(name: str) -> str:
    """Compare names without folder case or extension: 'Detail_Tweaker.safetensors' ~ 'detail_tweaker'."""
    lowered = name.strip().lower().replace("\\", "/")
    for extension in _EXTENSIONS:
        if lowered.endswith(extension):
            lowered = lowered[: -len(extension)]
            break
    return lowered


def closest_names(name: str, available: Iterable[str], n: int = 3) -> list[str]:
    """Up to `n` entries of `available` that look like `name`, best first (entries returned unchanged).

    Exact matches up to case and extension come first, then names that contain the wanted one
    or are contained in it, then difflib's similarity ranking.
    """
    candidates = list(dict.fromkeys(available))
    wanted = _stem(name)
    if not wanted or n <= 0:
        return []
    stems = {candidate: _stem(candidate) for candidate in candidates}
    exact = [c for c in candidates if stems[c] == wanted or PurePosixPath(stems[c]).name == wanted]
    # containment both ways ('detail' ~ 'add_detail_v2'); a stem of one or two letters would be
    # "contained" in almost anything, so those only count through similarity
    contains = [
        c for c in candidates
        if c not in exact and min(len(stems[c]), len(wanted)) >= 3 and (wanted in stems[c] or stems[c] in wanted)
    ]
    by_stem: dict[str, list[str]] = {}
    for candidate, stem in stems.items():
        by_stem.setdefault(stem, []).append(candidate)
    similar = [c for stem in difflib.get_close_matches(wanted, list(by_stem), n=n, cutoff=0.6) for c in by_stem[stem]]
    ranked = list(dict.fromkeys(exact + contains + similar))
    return ranked[:n]
