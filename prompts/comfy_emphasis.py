"""ComfyUI's own reading of prompt text (`[engine] prompt_syntax = "comfy"`), for pictures equal to ComfyUI's.

ComfyUI 0.3.64's CLIPTextEncode (comfy/sd1_clip.py: escape_important, parse_parentheses, token_weights) reads:

    (x)       x1.1, nested brackets multiply: ((x)) = 1.21
    (x:1.3)   1.3 flat: `((x:1.3))` is 1.3 too (Noodle's own syntax multiplies it to 1.573)
    \\( \\)     the literal bracket; nothing else is escaped, and `[x]`, `\\[` and `BREAK` are plain text
    a group's weight is what follows its last `:`, read as Python's float() reads it (" 1.2 ", "1e-1", "1_0")

and its brackets are counted the way its scanner counts them, quirks and all: a stray `)` makes the rest of the
top-level text plain (up to the next balanced pair after the count is back to 0), and an unclosed `(` group is
plain text unless it happens to end with `)`, in which case it is read as a group without its last character.
Each weighted run is tokenized on its own (`(a)(b)` is two runs where Noodle's syntax merges them), which is what
decides where ComfyUI's 75-token chunks break (prompts/chunks.py, `keep_whole`).

ComfyUI's scanner walks every character of every nesting level again (quadratic on deep text); this one walks
the text once to match brackets and then visits each bracket once. What ComfyUI would turn into a black picture
or a crash is refused with the same `PromptError`s as Noodle's own syntax (prompts/emphasis.py): a weight
outside ±MAX_WEIGHT or not finite (`(x:nan)`, `(x:inf)`), brackets nested deeper than MAX_NESTING.
"""

from __future__ import annotations

import re

from .emphasis import MAX_NESTING, ROUND_MULTIPLIER, Fragment, check_product, explicit_weight, nesting_error

__all__ = ["parse_comfy"]

# ComfyUI's own escapes: `\)` and `\(` become these two-character marks before the brackets are read, and the marks
# become the brackets again in each run's text (so a NUL-SOH or NUL-STX typed into a prompt reads as a bracket in
# ComfyUI too)
_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))
_BRACKETS = re.compile(r"[()]")


def _escape(text: str) -> str:
    for written, mark in _ESCAPES:
        text = text.replace(written, mark)
    return text


def _unescape(text: str) -> str:
    for written, mark in _ESCAPES:
        text = text.replace(mark, written[1])
    return text


class _Reader:
    """One text's runs: `matches` pairs each `(` with the `)` that closes it, as a stack of open brackets does;
    inside a group that is exactly how ComfyUI's nested scanner pairs them (its count never drops below the
    group's own there)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.matches: dict[int, int] = {}
        opened: list[int] = []
        for found in _BRACKETS.finditer(text):
            if found.group() == "(":
                opened.append(found.start())
            elif opened:
                self.matches[opened.pop()] = found.start()
        self.fragments: list[Fragment] = []

    def top_level(self) -> None:
        """ComfyUI's scan of the whole text (parse_parentheses at depth 0): its count may drop below 0 here, after
        a stray `)`, and then brackets are text until it is back at 0."""
        text, depth, start = self.text, 0, 0
        items: list[tuple[int, int]] = []
        for found in _BRACKETS.finditer(text):
            at = found.start()
            if found.group() == "(":
                if depth == 0:
                    if at > start:
                        items.append((start, at))
                    start = at
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    items.append((start, at + 1))
                    start = at + 1
        if start < len(text):
            items.append((start, len(text)))
        for begin, end in items:
            self.item(begin, end, 1.0, 0)

    def item(self, begin: int, end: int, weight: float, depth: int) -> None:
        """One of a level's items: a group when it starts with `(` and ends with `)`, else text at `weight`."""
        if end - begin >= 2 and self.text[begin] == "(" and self.text[end - 1] == ")":
            self.group(begin, end, weight, depth + 1)
        else:
            self.run(begin, end, weight)

    def group(self, begin: int, end: int, outer: float, depth: int) -> None:
        """`(inner)` or `(inner:weight)` (the last `:` of the inner text, not its first character)."""
        if depth > MAX_NESTING:
            raise nesting_error(depth, "(")
        inner_end, weight = end - 1, outer * ROUND_MULTIPLIER
        colon = self.text.rfind(":", begin + 1, end - 1)
        if colon > begin + 1:
            try:
                written = float(self.text[colon + 1 : end - 1])
            except ValueError:  # not a number: the colon is text, as in ComfyUI's try
                pass
            else:
                weight = explicit_weight(written, self.text[colon + 1 : end - 1],
                                         lambda: _unescape(self.text[begin + 1 : colon]))
                inner_end = colon
        self.level(begin + 1, inner_end, weight, depth)

    def level(self, begin: int, end: int, weight: float, depth: int) -> None:
        """The items inside a group: text, closed groups, and from a `(` not closed before `end`, the rest."""
        text, at = self.text, begin
        while at < end:
            opening = text.find("(", at, end)
            if opening < 0:
                self.run(at, end, weight)
                return
            self.run(at, opening, weight)
            closing = self.matches.get(opening, end)
            if closing >= end:  # open to the end of this group: the rest is one item
                self.item(opening, end, weight, depth)
                return
            self.group(opening, closing + 1, weight, depth + 1)
            at = closing + 1

    def run(self, begin: int, end: int, weight: float) -> None:
        if end > begin:
            piece = _unescape(self.text[begin:end])
            check_product(piece, weight)
            self.fragments.append(Fragment(piece, weight))


def parse_comfy(text: str) -> list[Fragment]:
    """`text`'s weighted runs as ComfyUI reads them, left to right, none merged and none empty.

    `parse_comfy("a ((b:1.2)) [c]")` gives `[Fragment("a ", 1.0), Fragment("b", 1.2), Fragment(" [c]", 1.0)]`.
    Raises `PromptError` for a weight outside ±MAX_WEIGHT or not finite, written or multiplied, and for groups
    nested deeper than MAX_NESTING.
    """
    reader = _Reader(_escape(text))
    reader.top_level()
    return reader.fragments
