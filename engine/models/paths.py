"""The models folder: listing model files and turning a user-given name into a safe path.

Names come from workflows and slash commands, so they are untrusted: a name resolves only to a
file inside its own folder (`checkpoints/`, `loras/`, `vae/`, `embeddings/`). `..`, absolute
paths and symlinks leading out of the folder are refused, as are pickle files unless the owner
opted into weights-only loading. Path traversal through model names was reported against both
ComfyUI and A1111; this module is the one place Noodle turns a name into a path.

`safe_join` applies the same rules to other user-named files (the input images folder).
Also here: the cheap fingerprint the model cache keys on; the catalog answers A1111's short "Model hash"
from its own HashBook (engine/models/hashes.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Literal

from engine.errors import ModelNotFound, UnsafeModelFile, UnsupportedModel
from engine.models.detect import PICKLE_SUFFIXES
from engine.models.hashes import HashBook

__all__ = ["FOLDERS", "FolderLookup", "ModelCatalog", "display_name", "file_fingerprint", "safe_join",
           "suffix_case_refusal"]

Folder = Literal["checkpoints", "loras", "vae", "embeddings", "upscale_models", "controlnet", "hypernetworks",
                 "gligen", "clip_vision"]
FOLDERS: dict[str, str] = {"checkpoints": "checkpoint", "loras": "LoRA", "vae": "VAE", "embeddings": "embedding",
                           "upscale_models": "upscale model", "controlnet": "ControlNet",
                           "hypernetworks": "hypernetwork", "gligen": "GLIGEN model",
                           "clip_vision": "CLIP vision model"}
SAFE_SUFFIX = ".safetensors"
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


class ModelCatalog:
    """The four model folders under one root, with listing, safe name resolution and the files' short hashes.

    `hash_cache` is the JSON file the hashes are kept in across restarts ([models] hash_cache); None keeps
    them in memory only.
    """

    def __init__(self, root: Path, allow_weights_only_pickle: bool = False, hash_cache: Path | None = None) -> None:
        self.root = Path(root)
        self.allow_weights_only_pickle = allow_weights_only_pickle
        self._hashes = HashBook(hash_cache)

    def _suffixes(self) -> tuple[str, ...]:
        return (SAFE_SUFFIX, *PICKLE_SUFFIXES) if self.allow_weights_only_pickle else (SAFE_SUFFIX,)

    def _loadable(self, file: str) -> bool:
        # '.safetensors' in lowercase only: diffusers' single-file loader takes 'X.SAFETENSORS' for a pickle
        return file.endswith(SAFE_SUFFIX) or file.lower().endswith(self._suffixes()[1:])

    def _folder(self, folder: str) -> Path:
        if folder not in FOLDERS:
            raise ValueError(f"model folder {folder!r} is not one of {', '.join(FOLDERS)}")
        return self.root / folder

    def _shown(self, folder: str) -> str:
        return f"{self.root.name}/{folder}"

    def list(self, folder: str) -> list[str]:
        """Loadable files in a folder: relative posix names (subfolders included), sorted.

        Only .safetensors (plus pickle suffixes when allowed); files whose real path leaves the
        folder are left out, since `resolve` would refuse them.
        """
        base = self._folder(folder)
        if not base.is_dir():
            return []
        real_base = base.resolve()
        names: list[str] = []
        # os.walk does not descend into symlinked directories (followlinks=False): a link to "/"
        # inside loras/ would otherwise make the listing walk the whole disk.
        for directory, subdirs, files in os.walk(base):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for file in files:
                path = Path(directory) / file
                if file.startswith(".") or not self._loadable(file):
                    continue
                if path.resolve().is_relative_to(real_base) and path.is_file():
                    names.append(path.relative_to(base).as_posix())
        return sorted(names)

    def safetensors_for(self, folder: str, name: str) -> str | None:
        """The `.safetensors` name a pickle name runs on: same folder, same stem (`v1-5-pruned-emaonly.ckpt` ->
        `v1-5-pruned-emaonly.safetensors`), when that file is there; None otherwise or for a non-pickle name.

        Shared workflows name pickles (ComfyUI's own examples load `v1-5-pruned-emaonly.ckpt`, most upscalers are
        `.pth`), while most owners keep only the .safetensors release of the same model.
        """
        clean = name.replace("\\", "/")
        suffix = PurePosixPath(clean).suffix
        if suffix.lower() not in PICKLE_SUFFIXES:
            return None
        candidate = clean[: -len(suffix)] + SAFE_SUFFIX
        try:
            safe_join(self._folder(folder), candidate, listing=lambda: ())
        except ModelNotFound:
            return None
        return candidate

    def resolve(self, folder: str, name: str) -> Path:
        """The real path of `name` inside `folder`; refuses escapes and pickles, names the closest on a miss.

        A pickle name resolves to the .safetensors file of the same stem beside it when there is one
        (`safetensors_for`; the executor notes it in the run's meta).
        """
        base = self._folder(folder)
        kind = FOLDERS[folder]
        suffix = PurePosixPath(name.replace("\\", "/")).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            substitute = self.safetensors_for(folder, name)
            if substitute is not None:
                return safe_join(base, substitute, what=kind, shown=self._shown(folder))
            if not self.allow_weights_only_pickle:
                raise UnsafeModelFile(self._pickle_refusal(folder, name, suffix))
        path = safe_join(base, name, what=kind, shown=self._shown(folder), listing=lambda: self.list(folder))
        if suffix == SAFE_SUFFIX and not name.endswith(SAFE_SUFFIX):
            raise UnsupportedModel(suffix_case_refusal(kind, name))
        if suffix not in self._suffixes():
            raise UnsupportedModel(f"{kind} {name!r} is not a .safetensors file; only .safetensors is loaded")
        return path

    def _pickle_refusal(self, folder: str, name: str, suffix: str) -> str:
        kind = FOLDERS[folder]
        clean = name.replace("\\", "/")
        stem_file = PurePosixPath(clean[: -len(suffix)] + SAFE_SUFFIX).name
        try:
            safe_join(self._folder(folder), name, listing=lambda: ())
            fix = (f"convert it once with `noodle convert {(self.root / folder / clean).as_posix()}` (it writes "
                   f"{stem_file} beside it), or download the .safetensors release")
        except ModelNotFound:
            fix = f"put {stem_file} (the .safetensors release of the same model) in {self._shown(folder)}"
        return (f"{kind} {name!r} is a pickle file ({suffix}), and pickle files can run code when loaded; only "
                f".safetensors is loaded, and {self._shown(folder)} has no {stem_file} to run it on. To fix it, "
                f"{fix}; or the owner can set models.allow_weights_only_pickle = true in config.toml to load "
                f"pickles with torch.load(weights_only=True)")

    def short_hash(self, path: Path) -> str:
        """A1111's "Model hash" of a model file: the first 10 hex digits of its whole sha256, remembered per file
        version (across restarts when the catalog has a hash_cache)."""
        return self._hashes.short_hash(Path(path))


class FolderLookup:
    """Resolves the files a node names, for fingerprints; the executor passes the model manager's."""

    def resolve(self, folder: str, name: str) -> Path:  # pragma: no cover - interface
        raise NotImplementedError


def _all_files(base: Path) -> list[str]:
    if not base.is_dir():
        return []
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())


def safe_join(
    base: Path,
    name: str,
    *,
    what: str = "file",
    shown: str | None = None,
    listing: Callable[[], Iterable[str]] | None = None,
) -> Path:
    """The real path of the existing file `name` inside `base`, for names from untrusted input.

    Refuses (UnsafeModelFile) NUL bytes, absolute paths, `..` and symlinks whose target leaves
    `base`; a missing file raises ModelNotFound with the closest names from `listing` (by
    default every file under `base`). `what` and `shown` word the messages ("input image",
    "input").
    """
    shown = shown or base.name
    # ComfyUI on Windows lists subfolder models as "sub\\model.safetensors"; workflows exported
    # there carry that spelling, so a backslash is read as a separator, never as a file name.
    clean = name.replace("\\", "/")
    if "\x00" in clean:
        raise UnsafeModelFile(f"{what} name {name!r} contains a NUL byte; names are plain file names in {shown}")
    if clean.startswith("/") or _WINDOWS_DRIVE.match(clean):
        raise UnsafeModelFile(
            f"{what} name {name!r} is an absolute path; a name must be relative to {shown}"
        )
    parts = PurePosixPath(clean).parts
    if ".." in parts:
        raise UnsafeModelFile(f"{what} name {name!r} contains '..'; a name must stay inside {shown}")
    available = listing or (lambda: _all_files(base))
    if not parts:
        raise ModelNotFound(what, name, shown, available())
    try:
        real = base.joinpath(*parts).resolve()
        inside = real.is_relative_to(base.resolve())
        exists = inside and real.is_file()
    except (OSError, ValueError):  # a name the file system cannot even look up (too long, NUL, a lone surrogate)
        inside, exists = True, False
    if not inside:
        raise UnsafeModelFile(
            f"{what} {name!r} is a symlink whose target leaves {shown}; a name must resolve inside its folder"
        )
    if not exists:
        raise ModelNotFound(what, name, shown, available())
    return real


def display_name(name: str) -> str:
    """A model file as people read it, without its folder and `.safetensors`: `anime/detail.safetensors` -> `detail`."""
    return name.rsplit("/", 1)[-1].removesuffix(SAFE_SUFFIX)


def suffix_case_refusal(kind: str, name: str) -> str:
    """Why `name`, ending in '.SAFETENSORS' or another casing, is not loaded, and what to do."""
    right = name[: -len(SAFE_SUFFIX)] + SAFE_SUFFIX
    return (f"{kind} {name!r} ends in {name[-len(SAFE_SUFFIX):]!r}; the loader reads a file as safetensors only by "
            f"the lowercase '.safetensors' (it would take this one for a pickle): rename it to {right!r}")


def file_fingerprint(path: Path) -> str:
    """Size and modification time: cheap, and changes whenever the file is replaced or rewritten."""
    stat = Path(path).stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"
