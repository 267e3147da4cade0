"""Wildcards: `{red|green|blue}` picks one option, `__name__` draws a line from `<name>.txt`.

Resolution happens once per request, before the text is parsed for emphasis, and depends only
on the text, the seed and the files: the same seed gives the same prompt (a reroll with a new
seed gives a new draw). Options may nest (`{a {big|small}|the} dog`) and a wildcard line may
itself hold options or other wildcards, up to `MAX_DEPTH` levels.

`\\{`, `\\}` and `\\|` are literal characters; an unmatched brace is left as written, and `|`
outside braces is plain text. The shipped examples live in `prompts/wildcards/`; a server can
point `folder` at its own.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PromptError
from .names import closest_names

__all__ = ["DEFAULT_WILDCARDS", "MAX_DEPTH", "MAX_NAME_CHARS", "available_wildcards", "resolve_wildcards"]

DEFAULT_WILDCARDS = Path(__file__).parent / "wildcards"
MAX_DEPTH = 8
# a wildcard's name, folders included: far above real names ("artists/painters"), far below the 255 bytes
# one file name may take (Linux NAME_MAX, ".txt" included)
MAX_NAME_CHARS = 100
_ESCAPABLE = ("{", "}", "|")  # only these: `\(` must reach the emphasis parser untouched
# a name starts with a letter or digit, so "____" or "__" in ordinary text stays text
# lazy, so the shortest name ends at the first `__`: `__colors__-__animals__` is two wildcards, not one name
_WILDCARD = re.compile(r"__([A-Za-z0-9][A-Za-z0-9_\-]*?(?:/[A-Za-z0-9][A-Za-z0-9_\-]*?)*?)__")


def available_wildcards(folder: Path | None = None) -> list[str]:
    """The wildcard names in `folder` (default: the shipped examples), e.g. `["animals", "colors"]`."""
    root = folder or DEFAULT_WILDCARDS
    if not root.is_dir():
        return []
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.txt"))


@dataclass
class _Resolver:
    """One resolution: the seeded random stream and the files read so far (each read once)."""

    folder: Path
    rng: random.Random
    lines: dict[str, list[str]] = field(default_factory=dict)

    def wildcard_lines(self, name: str) -> list[str]:
        if name not in self.lines:
            if len(name) > MAX_NAME_CHARS:  # before any path is built: 300 letters were ENAMETOOLONG, path and all
                raise PromptError(f"wildcard __{name[:20]}…__ has a {len(name)}-character name; wildcard names are "
                                  f"at most {MAX_NAME_CHARS} letters, digits, _ and - (with / between folders): "
                                  f"{self._listed()}")
            try:
                root = self.folder.resolve()
                path = (root / f"{name}.txt").resolve()
                found = path.is_relative_to(root) and path.is_file()
            except (OSError, RuntimeError) as err:  # a folder we may not read; RuntimeError: Python 3.11's link loop
                reason = err.strerror if isinstance(err, OSError) else "a symbolic link loop"  # neither names a path
                raise PromptError(f"wildcard __{name}__ cannot be looked up ({reason}); ask the server's owner to "
                                  "check the wildcards folder") from None
            if not found:
                closest = closest_names(name, available_wildcards(self.folder))
                hint = f"; closest: {', '.join(closest)}" if closest else ""
                # the folder's own name only: the message reaches Discord, the server's paths should not
                raise PromptError(f"wildcard __{name}__ is not in {self.folder.name}/{hint} ({self._listed()})")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                reason = err.strerror if isinstance(err, OSError) else str(err)  # strerror: no server path
                raise PromptError(f"wildcard file {path.name} cannot be read as UTF-8 text ({reason}); "
                                  "save it as UTF-8") from err
            entries = [line.strip() for line in text.splitlines()]
            self.lines[name] = [line for line in entries if line and not line.startswith("#")]
            if not self.lines[name]:
                raise PromptError(f"wildcard file {path.name} has no lines to draw from; add one option per line")
        return self.lines[name]

    def _listed(self) -> str:
        listed = ", ".join(f"__{n}__" for n in available_wildcards(self.folder)) or "none"
        return f"available: {listed}"

    def resolve(self, text: str, depth: int) -> str:
        if depth > MAX_DEPTH:
            raise PromptError(f"wildcards and {{a|b}} groups nest deeper than {MAX_DEPTH} levels (does a "
                              "wildcard file draw itself?); nest less")
        out: list[str] = []
        pairs = _brace_pairs(text)
        position = 0
        while position < len(text):
            char = text[position]
            if char == "\\" and text[position + 1 : position + 2] in _ESCAPABLE:
                out.append(text[position + 1])
                position += 2
            elif char == "{" and (end := pairs.get(position)) is not None:
                options = _split_options(text[position + 1 : end])
                out.append(self.resolve(options[self.rng.randrange(len(options))], depth + 1))
                position = end + 1
            elif char == "_" and (match := _WILDCARD.match(text, position)):
                choices = self.wildcard_lines(match.group(1))
                out.append(self.resolve(choices[self.rng.randrange(len(choices))], depth + 1))
                position = match.end()
            else:
                out.append(char)
                position += 1
        return "".join(out)


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each `{` -> index of its closing `}`; escapes skipped, unclosed braces left out.

    One pass with a stack, so a text of thousands of unclosed braces stays linear.
    """
    pairs: dict[int, int] = {}
    opened: list[int] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char == "\\" and text[position + 1 : position + 2] in _ESCAPABLE:
            position += 2
            continue
        if char == "{":
            opened.append(position)
        elif char == "}" and opened:
            pairs[opened.pop()] = position
        position += 1
    return pairs


def _split_options(body: str) -> list[str]:
    """Split an option group's body at its top-level `|` (nested groups and escapes kept whole)."""
    options: list[str] = []
    depth = 0
    current: list[str] = []
    position = 0
    while position < len(body):
        char = body[position]
        if char == "\\" and body[position + 1 : position + 2] in _ESCAPABLE:
            current.append(body[position : position + 2])
            position += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == "|" and depth == 0:
            options.append("".join(current))
            current = []
        else:
            current.append(char)
        position += 1
    options.append("".join(current))
    return options


def resolve_wildcards(text: str, seed: int, folder: Path | None = None) -> str:
    """Replace every `{a|b}` group and `__name__` wildcard in `text`, reproducibly for `seed`.

    Raises `PromptError` for an unknown wildcard (listing the available ones), an empty
    wildcard file, or wildcards that nest deeper than `MAX_DEPTH`.
    """
    return _Resolver(folder or DEFAULT_WILDCARDS, random.Random(seed)).resolve(text, 0)
