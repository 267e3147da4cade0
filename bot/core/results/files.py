"""The files a result is: where its PNGs are named (`filename_prefix`), removing them, reading their recipe back.

Disk work: the services call `remove_files` and `read_parameters` through `asyncio.to_thread`.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.executor import written_paths
from engine.pngmeta import read_png_texts

__all__ = ["prefix_for", "read_parameters", "remove_files", "touch_inputs", "written_files"]


def prefix_for(folder: str, prompt: str) -> str:
    """SaveImage's filename_prefix: `<folder>/<date>/<first words of the prompt>` (ASCII, no path tricks)."""
    words = re.sub(r"<[^>]*>", " ", prompt.lower())
    slug = "-".join(re.findall(r"[a-z0-9]+", words))[:40].strip("-") or "image"
    return f"{folder}/{datetime.now(timezone.utc):%Y-%m-%d}/{slug}"


def remove_files(paths: list[str]) -> int:
    """Delete files that exist; return how many were removed."""
    removed = 0
    for name in paths:
        path = Path(name)
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def written_files(output_dir: Path, results: Iterable[dict[str, Any] | None]) -> list[str]:
    """Every PNG the job results name: SaveImage's under the output folder, PreviewImage's under its temp/."""
    return [str(path) for result in results if result for output in (result.get("outputs") or {}).values()
            for path in written_paths(output_dir, output)]


def touch_inputs(input_dir: Path, names: list[str]) -> None:
    """Mark input files as used now (their modification time), as a fresh upload is; a file gone is left to the
    job, which says so."""
    for name in names:
        try:
            os.utime(input_dir / name)
        except FileNotFoundError:
            continue


def read_parameters(paths: list[str]) -> str | None:
    """The A1111 `parameters` text of the first PNG that still exists."""
    for name in paths:
        path = Path(name)
        if path.is_file():
            return read_png_texts(path).get("parameters")
    return None
