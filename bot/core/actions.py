"""The actions under a result, as both front ends name them: Discord's buttons (their `custom_id`s) and the
console's `press JOB ...` lines are spellings of one `Action`, and `buttons_for` says which a result offers.

A button's `custom_id` carries the generation and the action (`nd1:42:U2`, `nd1:42:zoom-2`), nothing else: the
button works after a restart and on a month-old message because everything else is read from SQLite when it is
pressed (the `nd1` prefix versions the spelling; 100 characters is Discord's limit, these stay under 40).
Nothing here knows Discord: bot/discord_app/buttons.py draws these as a persistent View.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from bot.core.errors import RequestInvalid
from bot.core.requests.workflow_file import is_workflow
from bot.core.storage.records import Generation

__all__ = ["ACTION_NAMES", "Action", "ButtonSpec", "CUSTOM_ID", "PAN_DIRECTIONS", "ZOOM_FACTORS", "buttons_for",
           "custom_id", "edits_result", "parse_action", "parse_custom_id", "press_words"]

ActionName = Literal["upscale", "variation", "reroll", "remix", "vary", "zoom", "pan", "delete", "details"]
ACTION_NAMES: tuple[str, ...] = ("upscale", "variation", "reroll", "remix", "vary", "zoom", "pan", "delete",
                                 "details")
VARY_STRENGTHS = ("subtle", "strong")
ZOOM_FACTORS = ("1.5", "2")
PAN_DIRECTIONS = ("left", "right", "up", "down")
MAX_GRID = 4  # U1-U4 / V1-V4: a batch of up to four is one grid
# kinds whose single image gets the edit set (vary subtle/strong, zoom, pan), as Midjourney's upscaled images do
EDITED_KINDS = frozenset({"upscale", "outpaint"})
PREFIX = "nd1"
CUSTOM_ID = re.compile(rf"{PREFIX}:(?P<generation>[0-9]{{1,18}}):(?P<code>[A-Za-z0-9.-]{{1,24}})")


@dataclass(frozen=True)
class Action:
    """One thing done to a result: `image` is 1-based (U2 is image 2); `arg` is the vary strength, the zoom
    factor or the pan direction."""

    name: ActionName
    image: int = 1
    arg: str = ""

    @property
    def code(self) -> str:
        """The action as a custom_id spells it: U2, V3, reroll, remix, vary-strong, zoom-1.5, pan-left, ..."""
        if self.name == "upscale":
            return f"U{self.image}"
        if self.name == "variation":
            return f"V{self.image}"
        suffix = f"-{self.arg}" if self.arg else ""
        image = f"-{self.image}" if self.name in ("vary", "zoom", "pan") and self.image != 1 else ""
        return f"{self.name}{suffix}{image}"


@dataclass(frozen=True)
class ButtonSpec:
    """A button as a front end draws it."""

    action: Action
    label: str
    emoji: str | None = None
    style: Literal["primary", "secondary", "success", "danger"] = "secondary"


def custom_id(generation_id: int, action: Action) -> str:
    """The persistent custom_id of `action` on generation `generation_id`."""
    return f"{PREFIX}:{generation_id}:{action.code}"


def parse_custom_id(text: str) -> tuple[int, Action] | None:
    """(generation id, action) of a custom_id of ours; None for anything else (another bot's, an old spelling)."""
    match = CUSTOM_ID.fullmatch(text)
    if match is None:
        return None
    try:
        return int(match["generation"]), _from_code(match["code"])
    except RequestInvalid:
        return None


def _from_code(code: str) -> Action:
    if len(code) == 2 and code[0] in "UV" and code[1] in "1234":
        return Action("upscale" if code[0] == "U" else "variation", int(code[1]))
    name, _, rest = code.partition("-")
    arg, _, image = rest.partition("-") if name in ("vary", "zoom", "pan") else (rest, "", "")
    return _checked(name, arg, int(image) if image.isdecimal() and len(image) == 1 else 1)


def _checked(name: str, arg: str, image: int) -> Action:
    allowed = {"vary": VARY_STRENGTHS, "zoom": ZOOM_FACTORS, "pan": PAN_DIRECTIONS}
    if name not in ACTION_NAMES or name in ("upscale", "variation"):
        raise RequestInvalid(f"{name!r} is not an action; use one of U1-U4, V1-V4, reroll, remix, vary subtle|strong,"
                             " zoom 1.5|2, pan left|right|up|down, delete, details")
    if name in allowed and arg not in allowed[name]:
        raise RequestInvalid(f"{name} takes {' or '.join(allowed[name])}, not {arg or '(nothing)'!r}")
    if name not in allowed and arg:
        raise RequestInvalid(f"{name} takes nothing after it, not {arg!r}")
    if not 1 <= image <= MAX_GRID:
        raise RequestInvalid(f"image {image} is not one of a result's images (1 to {MAX_GRID})")
    return Action(name, image, arg)  # type: ignore[arg-type]


def parse_action(words: list[str]) -> Action:
    """The console's spelling: `U2`, `V1`, `reroll`, `remix`, `vary strong`, `zoom 2`, `pan left`, `delete`,
    `details` (and the emoji 🔁 ✏️ 🗑️ ℹ️); RequestInvalid says what is allowed."""
    if not words:
        raise RequestInvalid("press needs an action: U1-U4, V1-V4, reroll, remix, vary subtle|strong, zoom 1.5|2, "
                             "pan left|right|up|down, delete or details")
    head = EMOJI_WORDS.get(words[0], words[0])
    if len(head) == 2 and head[0] in "UuVv" and head[1] in "1234":
        if len(words) > 1:
            raise RequestInvalid(f"{words[0]} takes nothing after it, not {' '.join(words[1:])!r}")
        return Action("upscale" if head[0] in "Uu" else "variation", int(head[1]))
    name = head.lower()
    arg = words[1].lower().removesuffix("x").removesuffix("×") if len(words) > 1 else ""
    if len(words) > 2:
        raise RequestInvalid(f"{name} takes one word after it at most, not {' '.join(words[1:])!r}")
    return _checked(name, arg, 1)


EMOJI_WORDS = {"🔁": "reroll", "✏️": "remix", "✏": "remix", "🗑️": "delete", "🗑": "delete", "ℹ️": "details",
               "ℹ": "details"}


def edits_result(generation: Generation) -> bool:
    """An upscaled, zoomed or panned image (a reroll or remix of one too, which runs the same graph): it offers the
    edit set rather than U/V."""
    params = generation.params
    return generation.kind in EDITED_KINDS or float(params.get("upscale_by") or 1.0) != 1.0 \
        or bool(params.get("outpaint"))


def buttons_for(generation: Generation) -> tuple[tuple[ButtonSpec, ...], ...]:
    """The rows of buttons under a result (Discord: at most 5 rows of 5).

    A /workflow result: 🔁 🗑️ ℹ️ (its graph is the user's own; vary and upscale need Noodle's params). An upscaled,
    zoomed or panned image: vary subtle/strong, 🔁 ✏️; zoom out 1.5x/2x; the four pans; 🗑️ ℹ️. Anything else: U1-Un
    and 🔁, V1-Vn and ✏️, 🗑️ ℹ️, numbered as the grid is (left to right, then down).
    """
    tail = (ButtonSpec(Action("delete"), "", "🗑️"), ButtonSpec(Action("details"), "", "ℹ️"))
    reroll, remix = ButtonSpec(Action("reroll"), "", "🔁"), ButtonSpec(Action("remix"), "", "✏️")
    if is_workflow(generation):  # its rerolls too: they run the same uploaded graph
        return ((reroll, *tail),)
    if edits_result(generation):
        return (
            (ButtonSpec(Action("vary", arg="subtle"), "Vary (subtle)", "🪄", "primary"),
             ButtonSpec(Action("vary", arg="strong"), "Vary (strong)", "🪄", "primary"), reroll, remix),
            (ButtonSpec(Action("zoom", arg="1.5"), "Zoom out 1.5×", "🔍"),
             ButtonSpec(Action("zoom", arg="2"), "Zoom out 2×", "🔍")),
            tuple(ButtonSpec(Action("pan", arg=way), "", emoji) for way, emoji in
                  zip(PAN_DIRECTIONS, ("⬅️", "➡️", "⬆️", "⬇️"), strict=True)),
            tail,
        )
    count = max(1, min(MAX_GRID, len(generation.images)))
    return (
        (*(ButtonSpec(Action("upscale", n), f"U{n}") for n in range(1, count + 1)), reroll),
        (*(ButtonSpec(Action("variation", n), f"V{n}") for n in range(1, count + 1)), remix),
        tail,
    )


def press_words(generation: Generation) -> str:
    """The console's spelling of `buttons_for`: what `press JOB ...` takes on this result, in the buttons' order."""
    words = []
    for row in buttons_for(generation):
        for spec in row:
            action = spec.action
            if action.name in ("upscale", "variation"):
                words.append(action.code)
            else:
                words.append(f"{action.name} {action.arg}" if action.arg else action.name)
    return " · ".join(words)
