"""Prompt text -> chunks and a token report: the front half of every text encode.

    text --extract_lora_tags--> text without <lora:..> tags (the tags go to the report)
         --parse_weighted-----> weighted fragments and BREAKs
         --embeddings.match---> per fragment: plain text and embedding references
         --word_token_groups--> one group of tokens per word, one group of vectors per embedding
         --split_chunks-------> 75-token chunks; a configured cap drops the chunks past it

`token_report` stops here (what `noodle tokens` and the embed show); `encode.encode_prompt`
runs the chunks through the text encoders. Both go through `plan_prompt`, so the count shown is
the count encoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .chunks import BREAK, CHUNK_TOKENS, EMBEDDING_SLOT, Chunk, Unit, split_chunks
from .embeddings import EmbeddingLibrary
from .emphasis import Fragment, parse_weighted
from .errors import PromptError
from .loras import extract_lora_tags
from .report import TokenReport
from .tokenizer import clip_tokenizer, word_token_groups

__all__ = ["PromptPlan", "plan_prompt", "token_report"]


@dataclass(frozen=True)
class PromptPlan:
    """The chunks to encode (after any cap) and the report describing them."""

    chunks: tuple[Chunk, ...]
    report: TokenReport


def _text_groups(text: str, weight: float, tokenizer: PreTrainedTokenizerBase) -> list[list[Unit]]:
    return [[Unit(token, weight) for token in group] for group in word_token_groups(text, tokenizer)]


def _fragment_groups(
    fragment: Fragment,
    tokenizer: PreTrainedTokenizerBase,
    embeddings: EmbeddingLibrary | None,
    widths: Sequence[int] | None,
    used: list[str],
    warnings: list[str],
) -> list[list[Unit]]:
    """The word and embedding groups of one weighted fragment, left to right."""
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


def plan_prompt(
    text: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    embeddings: EmbeddingLibrary | None = None,
    widths: Sequence[int] | None = None,
    max_chunks: int | None = None,
) -> PromptPlan:
    """Chunk `text` for encoding and describe it; `widths` are the text encoders' widths (an
    embedding must have vectors for each), `max_chunks` an optional cap from config.

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
    tokenizer = tokenizer or clip_tokenizer()
    clean, loras = extract_lora_tags(text)
    used: list[str] = []
    warnings: list[str] = []
    groups: list[list[Unit] | None] = []
    for fragment in parse_weighted(clean):
        if fragment.is_break:
            groups.append(BREAK)
        else:
            groups += _fragment_groups(fragment, tokenizer, embeddings, widths, used, warnings)
    chunks = split_chunks(groups)
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
    text: str, embeddings: EmbeddingLibrary | None = None, *, max_chunks: int | None = None
) -> TokenReport:
    """Token usage of `text` with the shipped CLIP tokenizer (for `noodle tokens` and the embed).

    Without a model the encoder widths are unknown, so embeddings count their file's vectors
    unchecked; `encode_prompt` checks them against the model and may warn where this did not.
    """
    return plan_prompt(text, embeddings=embeddings, max_chunks=max_chunks).report
