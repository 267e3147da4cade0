"""Named styles: a positive template around the user's prompt and an addition to the negative.

Styles live in a TOML file (the shipped `prompts/styles.toml`, or a server's own), one table
per style:

    [cinematic]
    description = "Film still"
    prompt = "cinematic film still of {prompt}, film grain"
    negative = "cartoon, illustration"

As in A1111's styles: `{prompt}` in a template is replaced by the user's text; a template
without it is appended after a comma. The same rule joins the negative prompts.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import PromptError
from .names import closest_names

__all__ = ["DEFAULT_STYLES", "Style", "apply_style", "load_styles"]

DEFAULT_STYLES = Path(__file__).parent / "styles.toml"
PLACEHOLDER = "{prompt}"
_KEYS = {"prompt", "negative", "description"}


@dataclass(frozen=True)
class Style:
    """One named style: templates for the prompt and the negative prompt."""

    name: str
    prompt: str
    negative: str = ""
    description: str = ""


def _style_from_table(name: str, table: object, path: Path) -> Style:
    if not isinstance(table, dict):
        raise PromptError(f"{path}: '{name}' must be a table like [{name}] with prompt = \"... {PLACEHOLDER} ...\"")
    unknown = set(table) - _KEYS
    if unknown:
        raise PromptError(f"{path}: style '{name}' has unknown key(s) {sorted(unknown)}; "
                          f"allowed: {sorted(_KEYS)}")
    values = {key: table.get(key, "") for key in _KEYS}
    for key, value in values.items():
        if not isinstance(value, str):
            raise PromptError(f"{path}: style '{name}': {key} must be a string, not {type(value).__name__}")
    if not values["prompt"].strip():
        raise PromptError(f"{path}: style '{name}' has no prompt template; add prompt = \"... {PLACEHOLDER} ...\"")
    return Style(name, values["prompt"], values["negative"], values["description"])


def load_styles(path: Path | None = None) -> dict[str, Style]:
    """Read the styles in `path` (default: the shipped `styles.toml`), in file order, by name."""
    path = path or DEFAULT_STYLES
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PromptError(f"cannot read styles file {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise PromptError(f"styles file {path} is not valid TOML: {err}") from err
    return {name: _style_from_table(name, table, path) for name, table in data.items()}


def _combine(template: str, text: str) -> str:
    """Put `text` where the template says, or join the two with a comma (empty parts left out)."""
    if PLACEHOLDER in template:
        return template.replace(PLACEHOLDER, text)
    return ", ".join(part for part in (text.strip(), template.strip()) if part)


def apply_style(
    name: str, prompt: str, negative: str = "", styles: dict[str, Style] | None = None
) -> tuple[str, str]:
    """Return `(prompt, negative)` with the style `name` applied; unknown names raise `PromptError`."""
    styles = load_styles() if styles is None else styles
    style = styles.get(name)
    if style is None:
        hint = closest_names(name, styles)
        closest = f"; closest: {', '.join(hint)}" if hint else ""
        raise PromptError(f"style '{name}' is not defined{closest} (available: {', '.join(styles) or 'none'})")
    negative = _combine(style.negative, negative) if style.negative else negative
    return _combine(style.prompt, prompt), negative
