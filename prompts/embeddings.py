"""Textual-inversion embeddings: a folder of `.safetensors` files, found in prompt text.

Two ways to name one in a prompt, both always on:
  * ComfyUI: `embedding:name` (optionally `embedding:sub/name` or with `.safetensors`); the
    reference is replaced by the vectors, or dropped with a warning when it cannot be used.
  * A1111: the file's bare name as a word ("easynegative"), matched case-insensitively as
    A1111's token matching is; only files that exist match, so the text is otherwise untouched.

File layouts read (the tensor's last dimension tells which text encoder it is for):
  * A1111 SD1.x/SD2: `emb_params` [n, dim], or `string_to_param.*` (how A1111's
    `{"string_to_param": {"*": tensor}}` is flattened into safetensors);
  * SDXL: `clip_l` [n, 768] and `clip_g` [n, 1280];
  * a file holding a single tensor (diffusers' `learned_embeds`) [n, dim] or [dim].

Each vector takes the place of one token. Only `.safetensors` are read: a pickle (`.pt`,
`.bin`, `.ckpt`, `.pth`) could run code when loaded, so it is refused with a warning, as the
models folder contract says. Nothing here raises for a bad file: every problem becomes a
warning and the reference is skipped. Files are listed when first needed and their tensors
loaded on first use; headers alone answer "how many tokens". A file changed in place is read again at the next
prompt; a link leading out of the folder is not listed, as ModelCatalog refuses such links.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .names import closest_names

__all__ = ["REFERENCE", "EmbeddingLibrary", "EmbeddingMatch"]

SAFE_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")
_COMFY_PREFIX = "embedding:"
# ComfyUI starts a reference only at the start of a word; the name runs to whitespace or a comma (Noodle's syntax)
REFERENCE = r"(?<![^\s,])embedding:(?P<comfy>[^\s,]+)"
_TRAILING_PUNCTUATION = ".;:!?)]}'\""
_KNOWN_KEYS = ("clip_l", "clip_g", "emb_params")


@dataclass(frozen=True)
class EmbeddingMatch:
    """A reference in a piece of text: the span [start, end) is replaced by `vectors` tokens of
    the embedding `name`, or (name None) dropped, with `warning` saying why."""

    start: int
    end: int
    name: str | None
    vectors: int = 0
    warning: str | None = None


@dataclass(frozen=True)
class _Listing:
    """One scan of the folder: file names (relative, no extension, '/' separators) -> paths."""

    safe: dict[str, Path]
    pickles: dict[str, Path]
    stamp: tuple[tuple[str, int, int], ...]  # (name, size, mtime_ns): the cache fingerprint
    pattern: re.Pattern[str]


class EmbeddingLibrary:
    """The textual-inversion embeddings in `folder` (usually `models/embeddings/`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._listing: _Listing | None = None
        self._folder_mtime: int | None = None
        self._shapes: dict[Path, dict[str, tuple[int, ...]] | str] = {}  # header, or why unreadable
        self._tensors: dict[tuple[str, int], torch.Tensor] = {}

    # -- the folder ----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Forget the file list and loaded tensors (after files changed inside subfolders)."""
        self._listing = None
        self._shapes.clear()
        self._tensors.clear()

    def _current(self) -> _Listing:
        """The listing, read again when a listed file changed in place (`cp new.safetensors embeddings/x.safetensors`
        writes into the file and leaves the folder's mtime as it was): a stat per file, at each prompt."""
        listing = self._scan()
        if listing.stamp != _stamp(self.folder, [*listing.safe.values(), *listing.pickles.values()]):
            self.refresh()
            listing = self._scan()
        return listing

    def _scan(self) -> _Listing:
        # a rescan when the folder's own mtime moves catches added/removed top-level files
        try:
            mtime = self.folder.stat().st_mtime_ns
        except OSError:
            mtime = None
        if self._listing is not None and mtime == self._folder_mtime:
            return self._listing
        if self._listing is not None:
            self.refresh()
        safe: dict[str, Path] = {}
        pickles: dict[str, Path] = {}
        files = sorted(self.folder.rglob("*")) if mtime is not None else []
        real_folder = self.folder.resolve()
        for path in files:
            suffix = path.suffix.lower()
            if not path.is_file() or (suffix != SAFE_SUFFIX and suffix not in PICKLE_SUFFIXES):
                continue
            if not path.resolve().is_relative_to(real_folder):  # a link out of the folder, as ModelCatalog refuses
                continue
            name = path.relative_to(self.folder).with_suffix("").as_posix()
            (safe if suffix == SAFE_SUFFIX else pickles).setdefault(name, path)
        self._folder_mtime = mtime
        stamp = _stamp(self.folder, [*safe.values(), *pickles.values()])
        self._listing = _Listing(safe, pickles, stamp, _reference_pattern([*safe, *pickles]))
        return self._listing

    def names(self) -> list[str]:
        """The usable embedding names (`.safetensors` files), e.g. `["easynegative", "sub/style"]`."""
        return sorted(self._current().safe)

    def fingerprint(self) -> tuple[str, tuple[tuple[str, int, int], ...]]:
        """What the files look like now; part of the encoding cache key."""
        return str(self.folder), self._current().stamp

    # -- finding references -------------------------------------------------------------------
    def match(self, text: str, widths: Sequence[int] | None = None) -> tuple[list[EmbeddingMatch], list[str]]:
        """The embedding references in `text`, left to right, and warnings for bare names that
        name a refused (pickle) file, whose text stays as ordinary words.

        With `widths` (the text encoders' widths) an embedding must have vectors of every width
        and the same count in each; without, the count of its first tensor is used.
        """
        listing = self._current()
        matches: list[EmbeddingMatch] = []
        warnings: list[str] = []
        for found in listing.pattern.finditer(text):
            if found.group("comfy") is not None:
                matches.append(self._comfy_match(found, widths))
                continue
            name = _by_stem(found.group("bare").lower(), listing.safe)
            if name is None:  # a pickle file's bare name: say so, keep the word
                if _by_stem(found.group("bare").lower(), listing.pickles) is not None:
                    warnings.append(self._pickle_warning(found.group("bare")))
                continue  # else a word the case-blind pattern took for a name ("eaſynegative"): plain text
            vectors, warning = self._vector_count(name, widths)
            matches.append(EmbeddingMatch(found.start(), found.end(), name if vectors else None, vectors, warning))
        return matches, warnings

    def _comfy_match(self, found: re.Match[str], widths: Sequence[int] | None) -> EmbeddingMatch:
        listing = self._scan()
        written = found.group("comfy")
        end = found.end()
        name = self._resolve(written, listing)
        stripped = written.rstrip(_TRAILING_PUNCTUATION)
        if name is None and stripped != written and (name := self._resolve(stripped, listing)) is not None:
            end -= len(written) - len(stripped)  # "embedding:foo." ends a sentence: the "." is text
        if name is None:
            return EmbeddingMatch(found.start(), end, None, 0, self._missing_warning(written, listing))
        vectors, warning = self._vector_count(name, widths)
        return EmbeddingMatch(found.start(), end, name if vectors else None, vectors, warning)

    def lookup(self, written: str, widths: Sequence[int] | None = None) -> EmbeddingMatch:
        """The embedding a ComfyUI-syntax reference names, `written` being all of it up to whitespace (commas
        included: the caller tries again without them, as ComfyUI does): its name and vector count, or (name None)
        the warning saying why it was left out. The span is not known here: start and end are 0."""
        if not written:
            return EmbeddingMatch(0, 0, None, 0, "'embedding:' is followed by no name here; it was left out "
                                                 "(write embedding:name, the file's name without .safetensors)")
        listing = self._current()
        name = self._resolve(written, listing)
        if name is None:
            return EmbeddingMatch(0, 0, None, 0, self._missing_warning(written, listing))
        vectors, warning = self._vector_count(name, widths)
        return EmbeddingMatch(0, 0, name if vectors else None, vectors, warning)

    @staticmethod
    def _resolve(written: str, listing: _Listing) -> str | None:
        """The `.safetensors` name `written` refers to: exact path, then any case, then by file stem
        in any subfolder (ComfyUI searches the subfolders too)."""
        wanted = written[: -len(SAFE_SUFFIX)] if written.lower().endswith(SAFE_SUFFIX) else written
        if wanted in listing.safe:
            return wanted
        lowered = wanted.lower()
        same = next((name for name in listing.safe if name.lower() == lowered), None)
        return same or _by_stem(lowered, listing.safe)

    def _missing_warning(self, written: str, listing: _Listing) -> str:
        stem = written.rsplit(".", 1)[0] if written.lower().endswith(PICKLE_SUFFIXES) else written
        if stem in listing.pickles or _by_stem(stem.lower(), listing.pickles):
            return self._pickle_warning(stem)
        hint = closest_names(written, listing.safe)
        closest = f"; closest: {', '.join(hint)}" if hint else ""
        # the folder's own name only: warnings reach Discord, the server's paths should not
        return f"embedding:{written} is not in {self.folder.name}/{closest}; it was left out"

    def _pickle_warning(self, name: str) -> str:
        return (f"embedding '{name}' is a pickle file (.pt/.bin), which Noodle refuses to load because "
                "it can run code; convert it to .safetensors. It was not applied")

    # -- reading files ------------------------------------------------------------------------
    def _candidates(self, name: str) -> dict[str, tuple[int, ...]] | str:
        """The file's embedding tensors and shapes (header only), or why none can be used."""
        path = self._scan().safe[name]
        if path not in self._shapes:
            try:
                with safe_open(path, framework="pt") as handle:
                    shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            except (OSError, SafetensorError) as err:
                reason = err.strerror if isinstance(err, OSError) else str(err)  # strerror: no path
                self._shapes[path] = f"embedding '{name}' could not be read ({reason}); it was left out"
                return self._shapes[path]
            chosen = {k: s for k, s in shapes.items() if k in _KNOWN_KEYS or k.startswith("string_to_param.")}
            if not chosen and len(shapes) == 1:
                chosen = shapes  # diffusers' learned_embeds: a single tensor under the token's name
            chosen = {k: s for k, s in chosen.items() if len(s) in (1, 2) and all(s)}
            self._shapes[path] = chosen or (
                f"embedding '{name}' holds no embedding tensor (found {sorted(shapes)[:6]}; expected "
                "emb_params, string_to_param.*, or clip_l and clip_g); it was left out"
            )
        return self._shapes[path]

    def _vector_count(self, name: str, widths: Sequence[int] | None) -> tuple[int, str | None]:
        """How many tokens `name` takes for these encoder widths, or 0 and a warning."""
        candidates = self._candidates(name)
        if isinstance(candidates, str):
            return 0, candidates
        by_width: dict[int, int] = {}
        for shape in candidates.values():  # the first tensor of a width wins, as in `vectors`
            by_width.setdefault(shape[-1], shape[0] if len(shape) == 2 else 1)
        if widths is None:
            return next(iter(by_width.values())), None
        missing = [w for w in widths if w not in by_width]
        if missing:
            return 0, (f"embedding '{name}' has vectors of width {sorted(by_width)} but this model's text "
                       f"encoder(s) need {list(widths)} (an SD1.x embedding on SDXL, or the reverse?); "
                       "it was left out")
        counts = {by_width[w] for w in widths}
        if len(counts) > 1:
            return 0, f"embedding '{name}' has different vector counts per encoder {sorted(counts)}; it was left out"
        return counts.pop(), None

    def vectors(self, name: str, width: int) -> torch.Tensor:
        """The vectors of `name` for an encoder of `width`, [n, width] float32 on the CPU.

        Call it for a name and width `match` accepted; the tensor is kept for later prompts.
        """
        if (name, width) not in self._tensors:
            candidates = self._candidates(name)
            if isinstance(candidates, str):
                raise LookupError(candidates)
            key = next(k for k, shape in candidates.items() if shape[-1] == width)
            with safe_open(self._scan().safe[name], framework="pt") as handle:
                tensor = handle.get_tensor(key)
            self._tensors[(name, width)] = tensor.reshape(-1, width).to(torch.float32)
        return self._tensors[(name, width)]


def _stamp(folder: Path, paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of each file, sorted; a file gone since has size -1."""
    stamp = []
    for path in paths:
        try:
            info = path.stat()
            stamp.append((path.relative_to(folder).as_posix(), info.st_size, info.st_mtime_ns))
        except OSError:
            stamp.append((path.relative_to(folder).as_posix(), -1, 0))
    return tuple(sorted(stamp))


def _by_stem(stem: str, names: dict[str, Path]) -> str | None:
    """The first name whose file stem, in any case, is `stem` (already lower case)."""
    return next((name for name in names if name.rsplit("/", 1)[-1].lower() == stem), None)


def _reference_pattern(names: list[str]) -> re.Pattern[str]:
    """ComfyUI's `embedding:name`, or any file's stem as a whole word (longest first), any case."""
    stems = sorted({name.rsplit("/", 1)[-1] for name in names}, key=len, reverse=True)
    if not stems:
        return re.compile(REFERENCE + r"|(?P<bare>(?!))")
    bare = "|".join(re.escape(stem) for stem in stems)
    return re.compile(REFERENCE + rf"|(?<!\w)(?P<bare>(?i:{bare}))(?!\w)")
