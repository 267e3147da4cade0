"""hypothesis: arbitrary prompt text never breaks the parsers or the counts.

The promise about counts, made precise. For a prompt `text` define its *visible text*:

    visible_text(text) = " ".join(f.text for f in parse_weighted(extract_lora_tags(text)[0])
                                  if not f.is_break)

i.e. the text with the `<lora:..>` tags, the emphasis brackets, the `:weight` numbers, the
escape backslashes and the BREAK keywords taken out; a space stands where syntax separated two
fragments, because each fragment is tokenized on its own (as ComfyUI tokenizes each weighted
segment). Then, without an embeddings library:

    token_report(text).tokens == count_tokens(visible_text(text))   (CLIPTokenizer's own count)

so the reported count never exceeds CLIPTokenizer's count of the syntax-free text; and for text
holding no syntax at all, it is CLIPTokenizer's count of the text itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from prompts import (
    CHUNK_TOKENS,
    EmbeddingLibrary,
    PromptError,
    count_tokens,
    encode_prompt,
    extract_lora_tags,
    parse_weighted,
    resolve_wildcards,
    sd1_encoder,
    token_report,
)
from prompts.tokenizer import TOKENIZER_DIR

from .conftest import L_WIDTH

PIECES = ["(", ")", "[", "]", "\\", ":", ":1.5)", ":-0.3)", ":1e9)", "<", ">", "<lora:", "<lora:x:0.5>",
          "{", "}", "|", "__", "__colors__", "BREAK", " BREAK ", "embedding:", ",", " ", "\n", "\t", "cat", "🙂",
          "é", "\u0301", "<|endoftext|>", "9" * 12]
MAX_CHARS = 10_000
# syntax-heavy text, plain unicode text, and either repeated up to 10k characters (hypothesis
# alone rarely draws long text; repeats also build deep nesting and many chunks)
SYNTAX_TEXT = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=6)), max_size=2_000).map("".join)
LONG_TEXT = st.tuples(st.one_of(SYNTAX_TEXT, st.text(min_size=1, max_size=200)), st.integers(1, MAX_CHARS)).map(
    lambda pair: (pair[0] * pair[1])[:MAX_CHARS]
)
PROMPT_TEXT = st.one_of(SYNTAX_TEXT, st.text(max_size=MAX_CHARS), LONG_TEXT)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SYNTAX_CHARS = set("()[]\\:<>")
FRESH_TOKENIZER = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def visible_text(text: str) -> str:
    clean, _ = extract_lora_tags(text)
    return " ".join(f.text for f in parse_weighted(clean) if not f.is_break)


@FUZZ
@given(PROMPT_TEXT)
def test_parse_weighted_gives_finite_weights_or_a_message(text: str) -> None:
    try:
        fragments = parse_weighted(text)
    except PromptError as err:
        assert str(err)
        return
    assert all(math.isfinite(f.weight) for f in fragments)
    assert all(f.text for f in fragments)


@FUZZ
@given(PROMPT_TEXT)
def test_count_tokens_never_raises_and_matches_clip_tokenizer(text: str) -> None:
    assert count_tokens(text) == len(FRESH_TOKENIZER(text, verbose=False)["input_ids"]) - 2


@FUZZ
@given(PROMPT_TEXT)
def test_lora_extraction_returns_readable_tags_or_a_message(text: str) -> None:
    try:
        clean, tags = extract_lora_tags(text)
    except PromptError as err:
        assert "<lora:" in str(err).lower() or "lora tag" in str(err).lower()
        return
    assert len(clean) <= len(text)
    assert all(tag.name and math.isfinite(tag.unet_weight) and math.isfinite(tag.clip_weight) for tag in tags)


@FUZZ
@given(PROMPT_TEXT)
def test_report_counts_the_visible_text_with_clip_tokenizer(text: str) -> None:
    try:
        report = token_report(text)
        visible = visible_text(text)
    except PromptError as err:
        assert str(err)
        return
    assert report.tokens == count_tokens(visible)
    assert sum(report.chunk_tokens) == report.tokens and report.truncated == 0
    assert report.chunks == len(report.chunk_tokens) >= 1
    assert all(0 <= n <= CHUNK_TOKENS for n in report.chunk_tokens)
    assert report.chunks >= math.ceil(report.tokens / CHUNK_TOKENS)


@pytest.mark.slow  # long texts through the real CLIP tokenizer, every example
@FUZZ
@given(st.one_of(st.text(max_size=MAX_CHARS), LONG_TEXT).filter(lambda t: not SYNTAX_CHARS & set(t)
                                                              and "BREAK" not in t))
def test_text_without_syntax_counts_exactly_like_clip_tokenizer(text: str) -> None:
    assert token_report(text).tokens == len(FRESH_TOKENIZER(text, verbose=False)["input_ids"]) - 2


@FUZZ
@given(SYNTAX_TEXT.filter(lambda t: "__" not in t), st.integers(min_value=0, max_value=2**64 - 1))
def test_wildcards_are_deterministic_and_fail_only_with_a_message(text: str, seed: int) -> None:
    try:
        first = resolve_wildcards(text, seed)
    except PromptError as err:
        assert "nest deeper" in str(err)
        return
    assert resolve_wildcards(text, seed) == first


EMBEDDING_PIECES = ["sd1style", "embedding:sd1style", "embedding:sd1style.", "OldStyle", "embedding:xlstyle",
                    "evil", "embedding:evil", "embedding:broken", "embedding:nothere", "embedding:sub/concept"]
WITH_EMBEDDINGS = st.lists(st.one_of(st.sampled_from(PIECES + EMBEDDING_PIECES), st.text(max_size=4)),
                           max_size=600).map("".join)


@pytest.fixture(scope="module")
def fuzz_library(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingLibrary:
    folder = tmp_path_factory.mktemp("fuzz") / "embeddings"
    folder.mkdir()
    torch.manual_seed(2)
    save_file({"emb_params": torch.randn(2, L_WIDTH)}, folder / "sd1style.safetensors")
    save_file({"string_to_param.*": torch.randn(3, L_WIDTH)}, folder / "oldstyle.safetensors")
    save_file({"clip_l": torch.randn(2, L_WIDTH), "clip_g": torch.randn(2, 64)}, folder / "xlstyle.safetensors")
    (folder / "sub").mkdir()
    save_file({"<toy>": torch.randn(L_WIDTH)}, folder / "sub" / "concept.safetensors")
    (folder / "evil.pt").write_bytes(b"never opened")
    (folder / "broken.safetensors").write_bytes(b"not safetensors")
    return EmbeddingLibrary(folder)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=WITH_EMBEDDINGS)
def test_encoding_any_prompt_gives_finite_conditioning_of_the_reported_shape(
    text: str, fuzz_library: EmbeddingLibrary, tokenizer: CLIPTokenizer, sd1_model: CLIPTextModel
) -> None:
    encoder = sd1_encoder(tokenizer, sd1_model)
    try:
        encoded = encode_prompt(text, [encoder], embeddings=fuzz_library)
    except PromptError as err:
        assert str(err)
        return
    report = encoded.report
    assert encoded.embeds.shape == (1, 77 * report.chunks, L_WIDTH)
    assert torch.isfinite(encoded.embeds).all()
    assert sum(report.chunk_tokens) == report.tokens == token_report(text, fuzz_library).tokens
    assert all(isinstance(w, str) and w for w in report.warnings)
