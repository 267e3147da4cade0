"""Prompt text -> chunks and a token report: the front half of every text encode.

    text --extract_lora_tags--> text without <lora:..> tags (the tags go to the report)
         --parse_weighted-----> weighted fragments and BREAKs
         --embeddings.match---> per fragment: plain text and embedding references
         --word_token_groups--> one group of tokens per word, one group of vectors per embedding
         --split_chunks-------> 75-token chunks; a configured cap drops the chunks past it

That is Noodle's syntax (`[engine] prompt_syntax = "noodle"`). ComfyUI's ("comfy") reads the text as ComfyUI's
CLIPTextEncode does, for pictures equal to ComfyUI's: no `<lora:..>` tags (they are text there), parse_comfy's
runs, `embedding:name` only, one group per run (its text between embeddings), and runs of 8 tokens or more
split to fill a chunk (chunks.COMFY_KEEP_WHOLE).

`token_report` stops here (what `noodle tokens` and the embed show); `encode.encode_prompt`
runs the chunks through the text encoders. Both go through `plan_prompt`, so the count shown is
the count encoded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, cast

from transformers import PreTrainedTokenizerBase

from .chunks import BREAK, CHUNK_TOKENS, COMFY_KEEP_WHOLE, EMBEDDING_SLOT, Chunk, Unit, split_chunks
from .comfy_emphasis import parse_comfy
from .embeddings import REFERENCE, EmbeddingLibrary, EmbeddingMatch
from .emphasis import Fragment, parse_weighted
from .errors import PromptError
from .loras import extract_lora_tags
from .report import TokenReport
from .tokenizer import clip_tokenizer, text_tokens, word_token_groups

__all__ = ["SYNTAXES", "PromptPlan", "Syntax", "encoded_fragments", "plan_prompt", "token_report",
           "without_references"]

Syntax = Literal["noodle", "comfy"]
SYNTAXES: tuple[Syntax, ...] = ("noodle", "comfy")
_COMFY_REFERENCE = re.compile(r" embedding:|\nembedding:")  # where ComfyUI splits a run for its embeddings
# a whole reference, as each syntax finds it: Noodle's name runs to whitespace or a comma, ComfyUI's to whitespace
_REFERENCES: dict[str, re.Pattern[str]] = {"noodle": re.compile(REFERENCE),
                                           "comfy": re.compile(r"(?:^|(?<=[ \n]))embedding:\S*")}


@dataclass(frozen=True)
class PromptPlan:
    """The chunks to encode (after any cap) and the report describing them."""

    chunks: tuple[Chunk, ...]
    report: TokenReport


def _text_groups(text: str, weight: float, tokenizer: PreTrainedTokenizerBase) -> list[list[Unit]]:
    return [[Unit(token, weight) for token in group] for group in word_token_groups(text, tokenizer)]


@dataclass
class _Reading:
    """What turning one text's fragments into groups reads (the tokenizer, the embeddings and the encoders'
    widths) and collects (the embeddings used, the warnings)."""

    tokenizer: PreTrainedTokenizerBase
    embeddings: EmbeddingLibrary | None
    widths: Sequence[int] | None
    used: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    found: dict[str, EmbeddingMatch] = field(default_factory=dict)  # ComfyUI-syntax references looked up so far

    def lookup(self, written: str) -> EmbeddingMatch:
        """`embeddings.lookup`, once per name and text: 18,000 references in a 256 KiB text stat-ed the folder's
        files 18,000 times."""
        if written not in self.found:
            self.found[written] = cast(EmbeddingLibrary, self.embeddings).lookup(written, self.widths)
        return self.found[written]


def _fragment_groups(fragment: Fragment, reading: _Reading) -> list[list[Unit]]:
    """The word and embedding groups of one weighted fragment, left to right."""
    tokenizer, embeddings, widths, used, warnings = (reading.tokenizer, reading.embeddings, reading.widths,
                                                     reading.used, reading.warnings)
    if embeddings is None:  # as ComfyUI without an embeddings folder: `embedding:x` is just text
        return _text_groups(fragment.text, fragment.weight, tokenizer)
    matches, extra = embeddings.match(fragment.text, widths)
    warnings.extend(extra)
    groups: list[list[Unit]] = []
    position = 0
    for match in matches:
        groups += _text_groups(fragment.text[position : match.start], fragment.weight, tokenizer)
        if match.warning:
            warnings.append(match.warning)
        if match.name is not None:
            used.append(match.name)
            groups.append([Unit(EMBEDDING_SLOT, fragment.weight, (match.name, row)) for row in range(match.vectors)])
        position = match.end
    return groups + _text_groups(fragment.text[position:], fragment.weight, tokenizer)


def _comfy_groups(fragment: Fragment, reading: _Reading) -> list[list[Unit]]:
    """One run's groups as ComfyUI's SDTokenizer makes them: its text split before each ` embedding:` (a space or
    a line break, then the prefix; or the prefix first in the run), the name running to the next whitespace
    (tried again without commas at its ends), what follows it up to the next reference one more group."""
    weight, embeddings = fragment.weight, reading.embeddings
    first, *rest = _COMFY_REFERENCE.split(fragment.text)
    groups: list[list[Unit]] = []
    for piece in [first, *(f"embedding:{part}" for part in rest)]:
        if not piece:
            continue
        if embeddings is not None and piece.startswith("embedding:"):
            written, *after = piece[len("embedding:"):].strip("\n").split() or [""]
            leftover = " ".join(after)
            match = reading.lookup(written)
            if match.name is None and len(stripped := written.strip(",")) < len(written):
                leftover = f"{written[len(stripped):]} {leftover}"  # ComfyUI's own join, commas and a space
                retry = reading.lookup(stripped)
                match = retry if retry.name is not None else match
            if match.name is not None:
                reading.used.append(match.name)
                groups.append([Unit(EMBEDDING_SLOT, weight, (match.name, row)) for row in range(match.vectors)])
            elif match.warning:
                reading.warnings.append(match.warning)
            if not leftover:
                continue
            piece = leftover
        groups.append([Unit(token, weight) for token in text_tokens(piece, reading.tokenizer)])
    return groups


def without_references(text: str, syntax: Syntax = "noodle") -> str:
    """`text` with each `embedding:name` reference, as `syntax` finds it, made a space: the encoder reads the
    embedding's vectors there, or nothing when there is no such file, never the words."""
    return _REFERENCES[syntax].sub(" ", text)


def encoded_fragments(text: str, syntax: Syntax = "noodle") -> list[Fragment]:
    """`text`'s weighted runs (and BREAKs) as its text encode reads them: in Noodle's syntax without its
    `<lora:..>` tags. Raises `PromptError` as `plan_prompt` would, for a weight or nesting it refuses."""
    if syntax == "comfy":
        return parse_comfy(text)
    return parse_weighted(extract_lora_tags(text)[0])


def plan_prompt(
    text: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    embeddings: EmbeddingLibrary | None = None,
    widths: Sequence[int] | None = None,
    max_chunks: int | None = None,
    syntax: Syntax = "noodle",
) -> PromptPlan:
    """Chunk `text` for encoding and describe it; `widths` are the text encoders' widths (an
    embedding must have vectors for each), `max_chunks` an optional cap from config, `syntax`
    Noodle's or ComfyUI's reading of the text (module docstring).

    Raises `PromptError` only for what the user must fix (an unreadable `<lora:..>` tag, a
    weight that overflows); every other problem is a warning in the report.
    """
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"max_chunks must be 1 or more (or None for no cap), not {max_chunks}")
    try:  # the tokenizer fails on it with a TypeError that names nothing (/tokens, the cost check)
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError("the prompt holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is no character; "
                          "write the text itself") from None
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax must be one of {', '.join(SYNTAXES)}, not {syntax!r}")
    tokenizer = tokenizer or clip_tokenizer()
    clean, loras = extract_lora_tags(text) if syntax == "noodle" else (text, [])
    reading = _Reading(tokenizer, embeddings, widths)
    used, warnings = reading.used, reading.warnings
    groups: list[list[Unit] | None] = []
    grouped = _fragment_groups if syntax == "noodle" else _comfy_groups
    for fragment in parse_comfy(clean) if syntax == "comfy" else parse_weighted(clean):
        if fragment.is_break:
            groups.append(BREAK)
        else:
            groups += grouped(fragment, reading)
    chunks = split_chunks(groups, CHUNK_TOKENS if syntax == "noodle" else COMFY_KEEP_WHOLE)
    counts = [len(chunk.tokens) for chunk in chunks]
    kept = len(chunks) if max_chunks is None else min(max_chunks, len(chunks))
    truncated = sum(counts[kept:])
    if kept < len(chunks):
        warnings.append(
            f"the prompt needs {len(chunks)} chunks of {CHUNK_TOKENS} tokens but the limit is {kept}: "
            f"its last {truncated} tokens were cut"
        )
    report = TokenReport(
        tokens=sum(counts),
        chunks=kept,
        chunk_tokens=counts[:kept],
        embeddings=list(dict.fromkeys(used)),
        loras=[tag.to_dict() for tag in loras],
        warnings=list(dict.fromkeys(warnings)),
        truncated=truncated,
    )
    return PromptPlan(tuple(chunks[:kept]), report)


def token_report(
    text: str, embeddings: EmbeddingLibrary | None = None, *, max_chunks: int | None = None,
    syntax: Syntax = "noodle",
) -> TokenReport:
    """Token usage of a prompt as the bot draws it, with the shipped CLIP tokenizer (for `noodle tokens`, /tokens
    and the embed): its `<lora:..>` tags become LoraLoaders in either syntax (the graph's text has none left),
    so they are reported, not counted.

    Without a model the encoder widths are unknown, so embeddings count their file's vectors
    unchecked; `encode_prompt` checks them against the model and may warn where this did not.
    """
    if syntax == "noodle":
        return plan_prompt(text, embeddings=embeddings, max_chunks=max_chunks).report
    clean, loras = extract_lora_tags(text)
    report = plan_prompt(clean, embeddings=embeddings, max_chunks=max_chunks, syntax=syntax).report
    return replace(report, loras=[tag.to_dict() for tag in loras])
