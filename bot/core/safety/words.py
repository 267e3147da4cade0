"""Banned words and patterns, matched the way a member trying to get around them would write them.

A prompt is folded before matching: Unicode compatibility forms (full-width letters, ligatures) become plain
letters, accents and invisible characters (zero-width spaces, soft hyphens) go, case goes, digits inside a word
read as the letters they stand in for (`nud3` -> `nude`), everything that is not a letter or a digit becomes a
space (emphasis like `(nude:1.3)`, `nu_de`'s underscore, commas), and a run of single letters is joined
(`n u d e`, `n.u.d.e` -> `nude`). A banned word then matches as a whole word or phrase, plural included
(`nude` finds `nudes`); `nud*` matches any word that starts so. Patterns are regular expressions that a
moderator writes; each runs against the prompt as typed (lower case) and folded, with a time limit: a pattern
that backtracks without end refuses the one prompt, it never holds the bot up.

Each text is also matched as the text encoder reads it (`as_encoded`, in [engine] prompt_syntax): `<lora:>` tags
taken out (Noodle's syntax), so the word around one closes up, and the emphasis brackets gone with their weights,
so `nu()de`, `nu[]de` and `nu(:1)de`, which encode as `nude`, are read as `nude` (in ComfyUI's syntax the runs
are joined as well, which reads more than its encoder sees, never less).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import regex

from prompts.emphasis import Fragment
from prompts.errors import PromptError
from prompts.plan import Syntax, encoded_fragments, without_references

__all__ = ["Banned", "as_encoded", "find_banned", "fold", "holds_phrase"]

PATTERN_SECONDS = 0.05  # per pattern and text: a sane pattern takes microseconds on a 2,000-character prompt
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_WORD_WITH_SIGNS = regex.compile(r"[\p{L}0-9@$]*\p{L}[\p{L}0-9@$]*")
_NOT_WORD = regex.compile(r"[^\p{L}\p{N}]+")


@dataclass(frozen=True)
class Banned:
    """What matched: the banned word or pattern as the moderator wrote it."""

    entry: str
    kind: str  # word | pattern

    def describe(self) -> str:
        return f"the word {self.entry!r}" if self.kind == "word" else f"the pattern {self.entry!r}"


def fold(text: str) -> str:
    """`text` as banned words are matched against it: folded words separated by single spaces, a run of single
    letters joined into one word."""
    return " ".join(_folded(text))


def _spelled_out(text: str) -> list[str]:
    """Each run of two or more single letters in `text`, joined: `a n.u.d.e figure` -> ["anude"] (the article
    joins too, so a banned word is looked for inside these, not only as the whole run)."""
    return _folded(text, runs_only=True)


def _folded(text: str, *, runs_only: bool = False) -> list[str]:
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(char for char in decomposed if unicodedata.category(char) not in ("Mn", "Me", "Cf"))
    lowered = plain.casefold()
    # digits stand in for letters only inside a word that is mostly letters: weights (1.3) and sizes (512x512)
    # stay numbers
    lowered = _WORD_WITH_SIGNS.sub(_unleet, lowered)
    words = _NOT_WORD.sub(" ", lowered).split()
    joined: list[str] = []
    run: list[str] = []
    for word in [*words, ""]:
        if len(word) == 1 and word.isalpha():
            run.append(word)
            continue
        if run and (len(run) > 1 or not runs_only):
            joined.append("".join(run))
        run = []
        if word and not runs_only:
            joined.append(word)
    return joined


def _unleet(match: regex.Match[str]) -> str:
    word = match.group(0)
    letters = sum(char.isalpha() for char in word)
    return word.translate(_LEET) if letters >= len(word) - letters else word


def _word_pattern(entry: str) -> regex.Pattern[str] | None:
    folded = fold(entry.strip("*"))
    if not folded:
        return None
    head = r"\S*" if entry.startswith("*") else ""
    tail = r"\S*" if entry.endswith("*") else "(?:e?s)?"
    return regex.compile(rf"(?:^| ){head}{regex.escape(folded)}{tail}(?= |$)")


def _encoded_fragments(text: str, syntax: Syntax) -> list[Fragment] | None:
    """`text`'s weighted runs as the text encoder reads them in `syntax` ([engine] prompt_syntax: in Noodle's, its
    `<lora:>` tags out); None when it does not parse (its encode refuses it, saying why)."""
    try:
        return encoded_fragments(text, syntax)
    except PromptError:
        return None


def as_encoded(text: str, syntax: Syntax = "noodle") -> str:
    """`text` as the text encoder reads it: without its emphasis brackets (and in Noodle's syntax its `<lora:>`
    tags), the runs of text joined (a BREAK a space); `text` itself when it does not parse."""
    fragments = _encoded_fragments(text, syntax)
    if fragments is None:
        return text
    return "".join(" " if fragment.is_break else fragment.text for fragment in fragments)


def holds_phrase(text: str, phrase: str, syntax: Syntax = "noodle") -> bool:
    """Whether `phrase` is in `text` as whole words (folded) at full weight or more, as the encoder reads it: an
    enforced negative counts as there only then. `xnsfw, nudex` does not hold `nsfw, nude`; neither does
    `(nsfw, nude:0)`, nor a phrase an unclosed `[` weighs down."""
    target = fold(phrase)
    if not target:
        return True
    fragments = _encoded_fragments(text, syntax)
    if fragments is None:
        return False
    whole = regex.compile(rf"(?:^| ){regex.escape(target)}(?= |$)")
    # an `embedding:name` reference is not encoded as its words (vectors, or nothing when there is no such file):
    # `blurry embedding:nsfw,nude` must not count as holding `nsfw, nude`
    return any(not fragment.is_break and fragment.weight >= 1.0
               and whole.search(fold(without_references(fragment.text, syntax))) for fragment in fragments)


def find_banned(texts: Iterable[str], words: Iterable[str], patterns: Iterable[str],
                syntax: Syntax = "noodle") -> Banned | None:
    """The first banned word or pattern found in any of `texts` (as typed, or as encoded in `syntax`), else None."""
    texts = list(dict.fromkeys(variant for text in texts if text for variant in (text, as_encoded(text, syntax))))
    folded = [fold(text) for text in texts]
    spelled = [run for text in texts for run in _spelled_out(text)]
    for entry in words:
        compiled = _word_pattern(entry)
        if compiled is not None and any(compiled.search(text) for text in folded):
            return Banned(entry, "word")
        letters = fold(entry.strip("*")).replace(" ", "")
        if len(letters) > 2 and any(letters in run for run in spelled):  # `a n u d e`: the run took the article
            return Banned(entry, "word")
    candidates = [*(text.casefold() for text in texts), *folded]
    for entry in patterns:
        compiled = regex.compile(entry, regex.IGNORECASE | regex.V1)
        for text in candidates:
            try:
                if compiled.search(text, timeout=PATTERN_SECONDS):
                    return Banned(entry, "pattern")
            except TimeoutError:  # a pattern that backtracks without end: the prompt is refused, not waited on
                return Banned(entry, "pattern")
    return None
