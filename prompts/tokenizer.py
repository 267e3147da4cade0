"""The real CLIP tokenizer, shipped with the package, and token counting.

Every count Noodle shows comes from `transformers.CLIPTokenizer` built from `clip_tokenizer/`
(vocab.json and merges.txt derived from open-clip's BPE file), never from a word-count guess.
SD1.x and SDXL (both of its encoders) use this same vocabulary.
"""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path

from transformers import CLIPTokenizer, PreTrainedTokenizerBase

__all__ = ["TOKENIZER_DIR", "clip_tokenizer", "count_tokens", "text_tokens", "word_token_groups"]

TOKENIZER_DIR = Path(__file__).parent / "clip_tokenizer"
# A fast tokenizer's Rust core rejects concurrent calls that change its truncation settings
# ("Already borrowed"); the bot counts tokens on its loop while the engine's worker encodes.
_CALLS = threading.Lock()


@cache  # read-only after construction; building it parses a 49,408-entry vocabulary (~0.3 s)
def clip_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer from the files shipped in `prompts/clip_tokenizer/` (no hub access)."""
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, *, offsets: bool) -> dict:
    # verbose=False: a prompt longer than model_max_length (77) is normal here, chunking handles it
    with _CALLS:
        return tokenizer(
            text, add_special_tokens=False, truncation=False, return_offsets_mapping=offsets, verbose=False
        )


def count_tokens(text: str, tokenizer: PreTrainedTokenizerBase | None = None) -> int:
    """How many CLIP tokens `text` is, without the start and end tokens ("a photo of a cat" -> 5)."""
    return len(text_tokens(text, tokenizer))


def text_tokens(text: str, tokenizer: PreTrainedTokenizerBase | None = None) -> list[int]:
    """The CLIP tokens of `text`, without the start and end tokens."""
    return list(_encode(tokenizer or clip_tokenizer(), text, offsets=False)["input_ids"])


def word_token_groups(text: str, tokenizer: PreTrainedTokenizerBase | None = None) -> list[list[int]]:
    """The tokens of `text`, exactly as the tokenizer gives them, grouped by whitespace-separated word.

    Tokenizing the whole text once (not word by word) keeps the count equal to the tokenizer's
    own; the offsets then tell where one word ends: a gap between two tokens' character spans
    is whitespace the tokenizer dropped, so the next token starts a new word.
    """
    encoded = _encode(tokenizer or clip_tokenizer(), text, offsets=True)
    groups: list[list[int]] = []
    previous_end = -1
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if groups and start <= previous_end:
            groups[-1].append(token)
        else:
            groups.append([token])
        previous_end = max(previous_end, end)
    return groups
