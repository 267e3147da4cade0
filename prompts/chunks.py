"""Weighted token groups -> CLIP's 77-token chunks (start + 75 prompt tokens + end/padding).

A group is one word's tokens (whitespace-separated, as the tokenizer split it) or one
embedding's vectors; in ComfyUI's syntax, one weighted run's tokens (prompts/comfy_emphasis.py).
Groups fill a chunk in order; a group that does not fit starts the next chunk whole, so a word
never straddles two chunks, unless the group is longer than `keep_whole`: then it fills the
current chunk and runs on into the next ones. `BREAK` closes the current chunk. No chunk is
ever empty, except the single chunk of an empty prompt.

`keep_whole` is a chunk (75) for Noodle's syntax: whole words, as the design asks and a reader of
the token report expects. ComfyUI 0.3.64 keeps only groups of up to 7 tokens whole (its
max_word_length 8), and its groups are whole weighted runs: a plain long prompt is one group,
cut at exactly 75 tokens, inside a word if it falls there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["BREAK", "CHUNK_TOKENS", "COMFY_KEEP_WHOLE", "EMBEDDING_SLOT", "Chunk", "Slot", "Unit", "split_chunks"]

CHUNK_TOKENS = 75
COMFY_KEEP_WHOLE = 7  # ComfyUI's SDTokenizer: groups of max_word_length (8) tokens or more are split to fill a chunk
EMBEDDING_SLOT = -1  # stands in the token list where an embedding vector goes
BREAK = None  # a group list entry that forces a new chunk


@dataclass(frozen=True)
class Slot:
    """Where an embedding vector goes: `position` among the chunk's prompt tokens (start token not
    counted), the embedding's name and which of its vectors (`row`)."""

    position: int
    name: str
    row: int


@dataclass(frozen=True)
class Unit:
    """One prompt token (or, with `embedding` set, one embedding vector) and its weight."""

    token: int
    weight: float = 1.0
    embedding: tuple[str, int] | None = None  # (name, row)


@dataclass(frozen=True)
class Chunk:
    """Up to 75 prompt tokens with their weights; `input_ids` pads it to the encoder's 77."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    slots: tuple[Slot, ...] = ()

    @classmethod
    def of(cls, units: Sequence[Unit]) -> Chunk:
        """Build a chunk from units, placing their embedding vectors."""
        slots = tuple(Slot(i, u.embedding[0], u.embedding[1]) for i, u in enumerate(units) if u.embedding)
        return cls(tuple(u.token for u in units), tuple(u.weight for u in units), slots)

    def input_ids(self, bos: int, eos: int, pad: int, placeholder: int = 0) -> list[int]:
        """The 77 ids: start, tokens (embedding slots hold `placeholder`), end, then `pad`.

        The placeholder is overwritten by the vector before the first layer; it only must not
        be the end token, which marks where the pooled output is read.
        """
        body = [placeholder if t == EMBEDDING_SLOT else t for t in self.tokens]
        ids = [bos, *body, eos]
        return ids + [pad] * (CHUNK_TOKENS + 2 - len(ids))

    def full_weights(self) -> list[float]:
        """One weight per position of `input_ids`; start, end and padding keep 1.0."""
        return [1.0, *self.weights] + [1.0] * (CHUNK_TOKENS + 1 - len(self.weights))

    @property
    def weighted(self) -> bool:
        """Whether any token has a weight other than 1.0 (if not, the weighting step is skipped)."""
        return any(w != 1.0 for w in self.weights)


def split_chunks(groups: Iterable[Sequence[Unit] | None], keep_whole: int = CHUNK_TOKENS) -> list[Chunk]:
    """Pack groups (`BREAK` = None between them) into chunks of at most 75 units; a group of up to `keep_whole`
    units that does not fit moves whole to the next chunk."""
    chunks: list[list[Unit]] = []
    current: list[Unit] = []
    for group in groups:
        if group is BREAK:
            if current:
                chunks.append(current)
                current = []
            continue
        if len(current) + len(group) <= CHUNK_TOKENS:
            current.extend(group)
        elif len(group) <= keep_whole:  # does not fit, but is kept whole: it starts the next chunk
            chunks.append(current)
            current = list(group)
        else:  # longer than that: fill up, then carry on in fresh chunks
            rest = list(group)
            while rest:
                room = CHUNK_TOKENS - len(current)
                current.extend(rest[:room])
                rest = rest[room:]
                if rest:
                    chunks.append(current)
                    current = []
    if current or not chunks:
        chunks.append(current)
    return [Chunk.of(units) for units in chunks]
