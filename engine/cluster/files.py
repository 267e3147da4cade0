"""The files a job reads and writes, carried between the bot's machine and a Ray worker ([ray] files = "bytes").

Going out, the input images a graph names (inputs whose choices come from the input folder: LoadImage,
LoadImageMask, LoadLatent) are sent with the job and written under the worker's own input folder. Coming back,
the files its output nodes wrote (ComfyUI's `{"filename", "subfolder", "type"}` entries: SaveImage's and
PreviewImage's images, SaveLatent's latents, CheckpointSave's checkpoints) are read, sent, and removed on the
worker; the bot writes them under its output folder at the same names, each name held to one plain file name
inside its folder (a worker's reply is trusted no more than a workflow). A name another writer
took meanwhile (two workers both saving `noodle_00001_.png`) gets the next free counter, and the result's entry
says so. With files = "shared" none of this runs: every worker reads and writes the bot's folders.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from engine.disk import check_free_space
from engine.errors import NoodleError, UnsafeModelFile
from engine.executor import TEMP_FOLDER, WRITTEN_LISTS
from engine.input_folder import INPUT_FOLDERS
from engine.models.paths import safe_join

__all__ = ["WireFile", "collect_results", "input_files", "place_results", "read_inputs", "write_inputs"]

COUNTER = re.compile(r"^(?P<stem>.*_)(?P<n>\d{5,})(?P<rest>_?\.[A-Za-z0-9]+)$")  # SaveImage's noodle_00001_.png


@dataclass(frozen=True)
class WireFile:
    """A file on its way: its path relative to its folder ("output", "temp" or "input") and its bytes."""

    kind: str
    path: str  # posix, relative
    data: bytes


def input_files(workflow: Mapping[str, Any], catalog: Mapping[str, Any]) -> list[str]:
    """The input-folder names an API workflow reads, by the node catalog's specs."""
    names: list[str] = []
    for node in workflow.values():
        cls = catalog.get(node.get("class_type")) if isinstance(node, Mapping) else None
        inputs = node.get("inputs") if cls is not None else None
        if not isinstance(inputs, Mapping):
            continue
        names += [value for spec in cls.input_specs()
                  if spec.choices_from in INPUT_FOLDERS and isinstance(value := inputs.get(spec.name), str)]
    return list(dict.fromkeys(names))


def read_inputs(input_dir: Path, names: Sequence[str]) -> tuple[WireFile, ...]:
    """The named input files' bytes (validation already refused names that leave the folder or do not exist)."""
    return tuple(WireFile("input", name, safe_join(input_dir, name, what="input image").read_bytes())
                 for name in names)


def write_inputs(input_dir: Path, files: Sequence[WireFile], min_free_mb: int) -> None:
    """Write the sent input files where this worker's LoadImage reads them, unless it has them already."""
    for item in files:
        path = _inside(input_dir, item.path)
        if path.is_file() and _same(path, item.data):
            continue
        check_free_space(input_dir.parent, min_free_mb, len(item.data), label="the worker's input folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")
        partial.write_bytes(item.data)
        os.replace(partial, path)


def _same(path: Path, data: bytes) -> bool:
    return path.stat().st_size == len(data) and hashlib.sha256(path.read_bytes()).digest() == \
        hashlib.sha256(data).digest()


def collect_results(output_dir: Path, results: Sequence[dict[str, Any] | None]) -> tuple[WireFile, ...]:
    """The files the results' output nodes wrote, read and removed (the worker keeps no copies)."""
    found: list[WireFile] = []
    roots = {"output": output_dir, TEMP_FOLDER: output_dir / TEMP_FOLDER}
    for result in results:
        for ui in (result or {}).get("outputs", {}).values():
            for item in _entries(ui):
                kind = item.get("type", "output")
                if kind not in roots:
                    continue
                path = _inside(roots[kind], _relative(item))
                if path.is_file():
                    found.append(WireFile(kind, _relative(item), path.read_bytes()))
                    path.unlink()
    return tuple(found)


def place_results(output_dir: Path, result: dict[str, Any], files: Sequence[WireFile], min_free_mb: int
                  ) -> dict[str, Any]:
    """Write a result's files under the bot's output folder; the result, its entries renamed where a name was
    taken. Files are matched to entries by kind and relative path."""
    by_key = {(f.kind, f.path): f for f in files}
    roots = {"output": output_dir, TEMP_FOLDER: output_dir / TEMP_FOLDER}
    written: list[Path] = []
    try:
        for ui in result.get("outputs", {}).values():
            for item in _entries(ui):
                kind = item.get("type", "output")
                if kind not in roots:
                    continue
                _plain_name(item.get("filename"))
                sent = by_key.get((kind, _relative(item)))
                if sent is None:  # the result would name a file the bot does not have (or another job's)
                    raise NoodleError(f"the worker sent no file for its result {_relative(item)!r}")
                check_free_space(output_dir, min_free_mb, len(sent.data), label=f"{output_dir.name}/")
                folder = _inside(roots[kind], str(item.get("subfolder", "") or ""))
                item["filename"] = _write_new(folder, item["filename"], sent.data)
                written.append(folder / item["filename"])
    except BaseException:
        for path in written:  # all of a job's files or none, as SaveImage
            path.unlink(missing_ok=True)
        raise
    return result


def _inside(root: Path, relative: str) -> Path:
    """`root`/`relative`, which need not exist yet, refusing a name that leaves `root` (a worker's reply is
    trusted no more than a workflow)."""
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    target = root.joinpath(*parts).resolve() if parts else root.resolve()
    if "\x00" in relative or PurePosixPath(relative).is_absolute() or ".." in parts \
            or not target.is_relative_to(root.resolve()):
        raise UnsafeModelFile(f"{relative!r} leaves {root.name}/; a worker's files stay inside their folder")
    return target


def _plain_name(name: Any) -> None:
    """Refuse a result file name that is not one plain name: `_inside` holds the subfolder, this the name itself
    (`../../x.png` or an absolute path would be written wherever the bot may write)."""
    text = str(name)
    if not isinstance(name, str) or not text or "\x00" in text or "/" in text or "\\" in text or text in (".", ".."):
        raise UnsafeModelFile(f"result file name {text[:80]!r} is not a plain file name; a worker's files stay inside "
                              "their folder")


def _entries(ui: Any) -> list[dict[str, Any]]:
    """A node's written-file entries, of every list an output node writes (the executor's WRITTEN_LISTS)."""
    if not isinstance(ui, dict):
        return []
    return [item for entries in WRITTEN_LISTS for item in ui.get(entries, ()) if isinstance(item, dict)]


def _relative(item: Mapping[str, Any]) -> str:
    sub = str(item.get("subfolder", "") or "")
    return f"{sub}/{item['filename']}" if sub else str(item["filename"])


def _write_new(folder: Path, name: str, data: bytes) -> str:
    """Write `data` as `name` in `folder`, or under the next free counter of its name; the name used."""
    folder.mkdir(parents=True, exist_ok=True)
    match = COUNTER.match(name)
    stem, number, rest = (match["stem"], int(match["n"]), match["rest"]) if match else (f"{Path(name).stem}-", 1,
                                                                                        Path(name).suffix)
    candidate = name
    while True:
        try:
            with open(folder / candidate, "xb") as out:  # never over another writer's file
                out.write(data)
            return candidate
        except FileExistsError:
            number += 1
            candidate = f"{stem}{number:05}{rest}" if match else f"{stem}{number}{rest}"
