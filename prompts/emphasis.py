"""Noodle's emphasis syntax (`[engine] prompt_syntax = "noodle"`, the default): text -> weighted fragments, with
A1111's rules. ComfyUI's own reading, for pictures equal to ComfyUI's, is prompts/comfy_emphasis.py.

    (x)       x1.1, nested brackets multiply: ((x)) = 1.21
    (x:1.3)   x1.3 (times any enclosing brackets, as in A1111; ComfyUI would set 1.3 flat)
    [x]       /1.1
    \\( \\) \\[ \\] \\\\   the literal character
    BREAK     (upper case, as a word) ends the current 75-token chunk

Unbalanced brackets never fail: an unclosed `(` or `[` applies its default multiplier to the
end of the text, a stray `)` or `]` is plain text (both as A1111). `:` that is not a weight is
plain text, so `embedding:name` and `(a:b)` keep their colons. A lone backslash before
anything else stays a backslash (A1111 drops it; keeping it spares kaomoji and paths). A weight
may be written with an exponent, `(x:1e-1)`, as ComfyUI's float() reads it (A1111 would keep it
as text: whoever writes it means a weight, and so it is checked as one).

The errors (`PromptError`, naming the weight) are weights a public bot must not encode:
- a weight, written or reached by multiplying nested brackets, outside -MAX_WEIGHT..MAX_WEIGHT.
  A1111 has no bound, but 1e39 is inf in float32 and 1.1**1000 is 2.5e41: the conditioning turns
  to inf/NaN, the image decodes black, and on a GPU a NaN decode would switch the shared VAE to
  fp32 for every later job. ComfyUI's own strength inputs stop at ±100, so we do too; no real
  prompt comes near it (0.5-1.5 is usual);
- brackets open more than MAX_NESTING deep at once (1,000 `(` in a row).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import PromptError

__all__ = ["MAX_NESTING", "MAX_WEIGHT", "ROUND_MULTIPLIER", "SQUARE_MULTIPLIER", "Fragment", "check_product",
           "explicit_weight", "nesting_error", "parse_weighted"]

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
MAX_WEIGHT = 100.0  # |weight| of any text after its brackets multiply: ComfyUI's strength range, finite in fp16
MAX_NESTING = 64  # ( and [ open at once; 1.1**48 already passes MAX_WEIGHT, so only [ gets this deep

# One syntax element per match. Weights accept spaces around the number ("(x: 1.2 )"), which
# ComfyUI's float() parsing also accepts; a malformed number ("(x:1.2.3)") is not a weight.
_SYNTAX = re.compile(
    r"""
      (?P<escaped>\\[()\[\]\\])
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|[\\:])
    """,
    re.VERBOSE,
)
# A1111's rule: BREAK as a whole word, upper case only; surrounding whitespace goes with it.
# The leading whitespace is matched only from the start of its run: `\s*` tried at every space of a long run read
# to its end each time (quadratic: a /workflow text of 256 KiB of spaces took 16 minutes to parse).
_BREAK = re.compile(r"(?:(?<!\s)\s*+)?\bBREAK\b\s*")


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one weight, or (is_break) a BREAK marker that starts a new chunk."""

    text: str
    weight: float = 1.0
    is_break: bool = False


@dataclass
class _Span:
    """One bracket pair: pieces [start, end) get `multiplier` (end is fixed when the bracket closes)."""

    start: int
    multiplier: float
    end: int | None = None


def _nested_products(count: int, spans: list[_Span]) -> list[float]:
    """Per piece, the product of the multipliers of the spans covering it.

    Spans of one bracket kind come from a stack, so they nest; a sweep with a stack of running
    products is linear, where A1111's re-multiplying of every later piece at each close is
    quadratic (a 10k-character prompt of brackets would take seconds).
    """
    products = [1.0] * count
    ordered = sorted((s for s in spans if s.end is not None and s.end > s.start), key=lambda s: (s.start, -s.end))
    stack: list[tuple[int, float]] = []  # (end, product of this span and all spans around it)
    next_span = 0
    for index in range(count):
        while stack and stack[-1][0] <= index:
            stack.pop()
        while next_span < len(ordered) and ordered[next_span].start <= index:
            span = ordered[next_span]
            next_span += 1
            outer = stack[-1][1] if stack else 1.0
            stack.append((span.end, outer * span.multiplier))
        products[index] = stack[-1][1] if stack else 1.0
    return products


def _explicit_weight(number: str, text_of: Callable[[], str]) -> float:
    """The weight of `(text:number)`; the pattern only lets decimal numbers through (309+ digits give inf)."""
    return explicit_weight(float(number), number, text_of)


def explicit_weight(weight: float, number: str, text_of: Callable[[], str]) -> float:
    """`weight`, written as `number` after a group's colon, or PromptError outside ±MAX_WEIGHT or not finite (1e39 or
    400 digits: inf in float32; ComfyUI's float() also reads nan). The group's text is only made for the refusal:
    made for every weight, thousands of nested groups cost a quadratic join."""
    if not (math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
        text = text_of()
        shown = number if len(number) <= 20 else f"{number[:12]}… ({len(number)} characters)"
        raise PromptError(f"emphasis weight {shown.strip()} on {_shown(text)} is outside {_range()}; weights of 0.5 "
                          f"to 1.5 are usual: write it like ({_shown(text, quote=False)}:1.2)")
    return weight


def check_product(piece: str, weight: float) -> None:
    """PromptError when the brackets around `piece` multiply its weight past ±MAX_WEIGHT: (x:90) inside a ( is 99,
    inside two it is 108.9."""
    if piece and not (math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
        raise PromptError(f"the brackets around {_shown(piece)} multiply its weight to {weight:.4g}, outside "
                          f"{_range()}: use fewer brackets, or write one weight, as in "
                          f"({_shown(piece, quote=False)}:1.5)")


def nesting_error(deepest: int, brackets: str = "( and [") -> PromptError:
    return PromptError(f"brackets nest {deepest} deep here; at most {MAX_NESTING} {brackets} may be open at once "
                       "(each ( multiplies the weight by 1.1): close them, or write one weight, as in (word:1.5)")


def _range() -> str:
    return f"-{MAX_WEIGHT:g} to {MAX_WEIGHT:g}, the range this bot allows"


def _shown(text: str, *, quote: bool = True) -> str:
    short = " ".join(text.split())
    short = short if len(short) <= 30 else short[:29] + "…"
    if quote:
        return repr(short) if short else "an empty group"
    return short or "word"


def parse_weighted(text: str) -> list[Fragment]:
    """Split `text` into fragments with A1111 emphasis weights; adjacent equal weights are merged.

    `parse_weighted("an (important) word")` gives `[Fragment("an ", 1.0), Fragment("important",
    1.1), Fragment(" word", 1.0)]`. Empty text gives `[]`. Raises `PromptError` only for a weight,
    written or multiplied, outside ±MAX_WEIGHT, and for brackets nested deeper than MAX_NESTING.
    """
    pieces: list[str | None] = []  # None marks a BREAK
    round_spans: list[_Span] = []
    square_spans: list[_Span] = []
    open_round: list[_Span] = []
    open_square: list[_Span] = []
    deepest = 0

    for match in _SYNTAX.finditer(text):
        kind = match.lastgroup
        token = match.group(0)
        if kind == "escaped":
            pieces.append(token[1])
        elif kind == "open":
            span = _Span(len(pieces), ROUND_MULTIPLIER if token == "(" else SQUARE_MULTIPLIER)
            (open_round if token == "(" else open_square).append(span)
            (round_spans if token == "(" else square_spans).append(span)
            deepest = max(deepest, len(open_round) + len(open_square))
        elif kind == "weight" and open_round:
            span = open_round.pop()
            span.multiplier = _explicit_weight(match.group("weight"),
                                               lambda start=span.start: "".join(p or "" for p in pieces[start:]))
            span.end = len(pieces)
        elif kind == "close" and token == ")" and open_round:
            open_round.pop().end = len(pieces)
        elif kind == "close" and token == "]" and open_square:
            open_square.pop().end = len(pieces)
        else:  # text, or a weight/close with nothing open: literal, as A1111
            parts = _BREAK.split(token)
            for position, part in enumerate(parts):
                if position:
                    pieces.append(None)
                pieces.append(part)

    if deepest > MAX_NESTING:
        raise nesting_error(deepest)
    for span in open_round + open_square:  # unclosed: default multiplier up to the end
        span.end = len(pieces)
    weights = [
        r * s
        for r, s in zip(_nested_products(len(pieces), round_spans), _nested_products(len(pieces), square_spans))
    ]
    for piece, weight in zip(pieces, weights):
        check_product(piece or "", weight)
    return _merge(pieces, weights)


def _merge(pieces: list[str | None], weights: list[float]) -> list[Fragment]:
    """Drop empty pieces and join neighbours of equal weight (A1111 does too: "(a)(b)" is "ab" at 1.1)."""
    fragments: list[Fragment] = []
    for piece, weight in zip(pieces, weights):
        if piece is None:
            if fragments and not fragments[-1].is_break:
                fragments.append(Fragment("BREAK", 1.0, is_break=True))
            continue
        if not piece:
            continue
        if fragments and not fragments[-1].is_break and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + piece, weight)
        else:
            fragments.append(Fragment(piece, weight))
    return fragments
