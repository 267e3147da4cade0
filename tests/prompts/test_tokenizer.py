"""Token counts come from the real CLIP tokenizer."""

from __future__ import annotations

import pytest
from transformers import CLIPTokenizer

from prompts import clip_tokenizer, count_tokens
from prompts.tokenizer import TOKENIZER_DIR, word_token_groups


def test_shipped_tokenizer_gives_clips_ids() -> None:
    assert clip_tokenizer()("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_clip_tokenizer_is_built_once() -> None:
    assert clip_tokenizer() is clip_tokenizer()


def test_a_photo_of_a_cat_is_five_tokens() -> None:
    assert count_tokens("a photo of a cat") == 5


@pytest.mark.parametrize(
    "text",
    ["", "   ", "a photo of a cat", "masterpiece,best_quality,1girl", "(cat:1.2) [dog]", "héllo wörld 日本語 🙂",
     "photorealistic octane render, 8k uhd", "<|endoftext|> after", "tab\tand\nnewline"],
)
def test_count_matches_a_fresh_clip_tokenizer(text: str) -> None:
    fresh = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    assert count_tokens(text) == len(fresh(text)["input_ids"]) - 2


def test_word_groups_keep_the_tokenizers_tokens_and_split_at_whitespace(tokenizer: CLIPTokenizer) -> None:
    text = "a photorealistic  cat,dog\nfox"
    groups = word_token_groups(text)
    assert [t for group in groups for t in group] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(groups) == 4  # a | photorealistic | cat,dog | fox
    assert groups[2] == tokenizer("cat,dog", add_special_tokens=False)["input_ids"]
