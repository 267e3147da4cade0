"""Text -> conditioning with tiny real CLIP text models, checked against direct model calls."""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from prompts import (
    ClipEncoder,
    EmbeddingLibrary,
    PromptEncoderCache,
    encode_prompt,
    sd1_encoder,
    sdxl_encoders,
)

from .conftest import G_PROJECTION, G_WIDTH, L_WIDTH

BOS, EOS = 49406, 49407


def ids_for(tokenizer: CLIPTokenizer, text: str, pad: int = EOS) -> torch.Tensor:
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    row = [BOS, *body, EOS]
    return torch.tensor([row + [pad] * (77 - len(row))])


def hidden(
    model: CLIPTextModel | CLIPTextModelWithProjection, ids: torch.Tensor, layer: int, norm: bool
) -> torch.Tensor:
    """Reference: the model's own hidden states, read the way ComfyUI does."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        z = out.hidden_states[layer]
        text_model = model.text_model if isinstance(model, CLIPTextModelWithProjection) else model
        return text_model.final_layer_norm(z) if norm else z


@pytest.fixture
def sd1(tokenizer: CLIPTokenizer, sd1_model: CLIPTextModel) -> ClipEncoder:
    return sd1_encoder(tokenizer, sd1_model)


def test_unweighted_prompt_is_the_models_last_hidden_state(sd1: ClipEncoder, tokenizer: CLIPTokenizer,
                                                           sd1_model: CLIPTextModel) -> None:
    encoded = encode_prompt("a photo of a cat", [sd1])
    with torch.no_grad():
        expected = sd1_model(input_ids=ids_for(tokenizer, "a photo of a cat")).last_hidden_state
    assert encoded.embeds.shape == (1, 77, L_WIDTH) and encoded.pooled is None
    assert torch.equal(encoded.embeds, expected)
    assert encoded.report.tokens == 5


def test_clip_skip_reads_the_penultimate_layer_with_final_norm(tokenizer: CLIPTokenizer,
                                                               sd1_model: CLIPTextModel) -> None:
    encoded = encode_prompt("a cat", [sd1_encoder(tokenizer, sd1_model, layer=-2)])
    expected = hidden(sd1_model, ids_for(tokenizer, "a cat"), -2, norm=True)
    torch.testing.assert_close(encoded.embeds, expected, rtol=0, atol=1e-6)


def test_104_tokens_encode_as_two_chunks_of_77(sd1: ClipEncoder, tokenizer: CLIPTokenizer,
                                               sd1_model: CLIPTextModel) -> None:
    text = " ".join(["cat"] * 104)
    encoded = encode_prompt(text, [sd1])
    assert encoded.embeds.shape == (1, 154, L_WIDTH)
    assert encoded.report.chunks == 2 and encoded.report.chunk_tokens == [75, 29]
    second = encode_prompt(" ".join(["cat"] * 29), [sd1]).embeds
    torch.testing.assert_close(encoded.embeds[:, 77:], second, rtol=0, atol=1e-6)  # each chunk on its own


def test_break_makes_a_chunk_encoded_on_its_own(sd1: ClipEncoder) -> None:
    encoded = encode_prompt("a cat BREAK a dog", [sd1])
    assert encoded.embeds.shape == (1, 154, L_WIDTH)
    torch.testing.assert_close(encoded.embeds[:, :77], encode_prompt("a cat", [sd1]).embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoded.embeds[:, 77:], encode_prompt("a dog", [sd1]).embeds, rtol=0, atol=1e-6)


def test_comfy_weighting_matches_a_hand_computation(sd1: ClipEncoder, tokenizer: CLIPTokenizer,
                                                    sd1_model: CLIPTextModel) -> None:
    encoded = encode_prompt("a (cat:1.5) on [a mat]", [sd1], weighting="comfy")
    with torch.no_grad():
        z = sd1_model(input_ids=ids_for(tokenizer, "a cat on a mat")).last_hidden_state[0]
        empty = sd1_model(input_ids=torch.tensor([[BOS] + [EOS] * 76])).last_hidden_state[0]
    expected = z.clone()
    # positions: 0 start, 1 "a", 2 "cat", 3 "on", 4 "a", 5 "mat"
    for position, weight in [(2, 1.5), (4, 1 / 1.1), (5, 1 / 1.1)]:
        w = torch.tensor(weight, dtype=torch.float32)
        expected[position] = (z[position] - empty[position]) * w + empty[position]
    torch.testing.assert_close(encoded.embeds[0], expected, rtol=0, atol=1e-6)
    assert torch.equal(encoded.embeds[0, 3], z[3])  # weight 1.0 positions untouched


@pytest.fixture(scope="module")
def biased_sd1_model(sd1_model: CLIPTextModel) -> CLIPTextModel:
    """The tiny CLIP with a final LayerNorm bias, as real CLIP-L has: hidden states whose mean is not ~0."""
    model = copy.deepcopy(sd1_model)
    with torch.no_grad():
        model.final_layer_norm.bias.copy_(torch.linspace(-0.5, 0.2, L_WIDTH))
    return model


def test_a1111_weighting_matches_a_hand_computation(tokenizer: CLIPTokenizer,
                                                    biased_sd1_model: CLIPTextModel) -> None:
    encoded = encode_prompt("a (cat:1.5) on [a mat]", [sd1_encoder(tokenizer, biased_sd1_model)], weighting="a1111")
    with torch.no_grad():
        z = biased_sd1_model(input_ids=ids_for(tokenizer, "a cat on a mat")).last_hidden_state[0]
    assert abs(float(z.mean())) > 0.05  # a mean that can be restored
    weights = torch.ones(77)
    weights[2] = 1.5
    weights[4:6] = 1 / 1.1
    scaled = z * weights[:, None]
    expected = scaled * (z.mean() / scaled.mean())
    torch.testing.assert_close(encoded.embeds[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoded.embeds[0].mean(), z.mean(), rtol=1e-5, atol=1e-7)
    assert not any("restore" in warning for warning in encoded.report.warnings)


def test_a1111_weighting_of_a_mean_near_zero_weights_without_restoring_and_says_so(
        sd1: ClipEncoder, tokenizer: CLIPTokenizer, sd1_model: CLIPTextModel) -> None:
    # a final LayerNorm without bias (random tiny CLIP) gives a chunk mean of ~1e-8: 0/0 would be NaN
    with torch.no_grad():
        z = sd1_model(input_ids=ids_for(tokenizer, "a cat on a mat")).last_hidden_state[0]
    assert abs(float(z.mean())) < 1e-4
    encoded = encode_prompt("a (cat:1.5) on [a mat]", [sd1], weighting="a1111")
    weights = torch.ones(77)
    weights[2] = 1.5
    weights[4:6] = 1 / 1.1
    assert torch.isfinite(encoded.embeds).all()
    torch.testing.assert_close(encoded.embeds[0], z * weights[:, None], rtol=0, atol=1e-6)
    assert any("too close to zero to restore" in warning for warning in encoded.report.warnings)


@pytest.mark.parametrize("weighting", ["comfy", "a1111"])
def test_weight_one_is_exactly_unweighted(sd1: ClipEncoder, weighting: str) -> None:
    plain = encode_prompt("a cat on a mat", [sd1], weighting=weighting)  # type: ignore[arg-type]
    ones = encode_prompt("a (cat:1.0) on (a mat:1)", [sd1], weighting=weighting)  # type: ignore[arg-type]
    assert torch.equal(plain.embeds, ones.embeds)


def test_unweighted_chunks_stay_bitwise_next_to_weighted_ones(sd1: ClipEncoder) -> None:
    plain = encode_prompt("a cat BREAK a dog", [sd1])
    weighted = encode_prompt("a (cat:1.3) BREAK a dog", [sd1])
    assert torch.equal(plain.embeds[:, 77:], weighted.embeds[:, 77:])
    assert not torch.equal(plain.embeds[:, :77], weighted.embeds[:, :77])


def test_sdxl_joins_clip_l_and_clip_g_and_pools_from_clip_g(
    tokenizer: CLIPTokenizer, sdxl_models: tuple[CLIPTextModel, CLIPTextModelWithProjection]
) -> None:
    clip_l, clip_g = sdxl_models
    encoders = sdxl_encoders(tokenizer, clip_l, tokenizer, clip_g)
    encoded = encode_prompt("a photo of a cat", encoders)
    assert encoded.embeds.shape == (1, 77, L_WIDTH + G_WIDTH)
    assert encoded.pooled is not None and encoded.pooled.shape == (1, G_PROJECTION)
    l_ids, g_ids = ids_for(tokenizer, "a photo of a cat"), ids_for(tokenizer, "a photo of a cat", pad=0)
    torch.testing.assert_close(encoded.embeds[..., :L_WIDTH], hidden(clip_l, l_ids, -2, norm=False), rtol=0, atol=1e-6)
    torch.testing.assert_close(encoded.embeds[..., L_WIDTH:], hidden(clip_g, g_ids, -2, norm=False), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(encoded.pooled, clip_g(input_ids=g_ids).text_embeds, rtol=0, atol=1e-6)


def test_sdxl_long_prompt_pools_from_the_first_chunk(
    tokenizer: CLIPTokenizer, sdxl_models: tuple[CLIPTextModel, CLIPTextModelWithProjection]
) -> None:
    encoders = sdxl_encoders(tokenizer, *sdxl_models[:1], tokenizer, sdxl_models[1])
    encoded = encode_prompt("a cat BREAK a dog", encoders)
    assert encoded.embeds.shape == (1, 154, L_WIDTH + G_WIDTH)
    first = encode_prompt("a cat", encoders).pooled
    assert first is not None and encoded.pooled is not None
    torch.testing.assert_close(encoded.pooled, first, rtol=0, atol=1e-6)


def _with_row(model: CLIPTextModel, token: int, vector: torch.Tensor) -> CLIPTextModel:
    """A copy of `model` whose token `token` embeds as `vector` (the old ComfyUI way to apply one)."""
    patched = copy.deepcopy(model)
    with torch.no_grad():
        patched.get_input_embeddings().weight[token] = vector
    return patched


def test_embedding_vectors_replace_token_embeddings(sd1: ClipEncoder, tokenizer: CLIPTokenizer,
                                                    sd1_model: CLIPTextModel, library: EmbeddingLibrary) -> None:
    encoded = encode_prompt("a embedding:sd1style cat", [sd1], embeddings=library)
    assert encoded.report.tokens == 4 and encoded.report.embeddings == ["sd1style"]
    vectors = library.vectors("sd1style", L_WIDTH)
    patched = _with_row(_with_row(sd1_model, 1000, vectors[0]), 1001, vectors[1])
    ids = torch.tensor([[BOS, 320, 1000, 1001, 2368] + [EOS] * 72])
    with torch.no_grad():
        expected = patched(input_ids=ids).last_hidden_state
    torch.testing.assert_close(encoded.embeds, expected, rtol=0, atol=1e-6)


def test_bare_name_and_comfy_syntax_give_the_same_conditioning(sd1: ClipEncoder, library: EmbeddingLibrary) -> None:
    comfy = encode_prompt("a embedding:sd1style cat", [sd1], embeddings=library)
    bare = encode_prompt("a sd1style cat", [sd1], embeddings=library)
    as_text = encode_prompt("a sd1style cat", [sd1])
    assert torch.equal(comfy.embeds, bare.embeds)
    assert not torch.allclose(bare.embeds, as_text.embeds)
    assert bare.report.tokens == 4 and as_text.report.tokens > 4


def test_embedding_takes_its_weight(sd1: ClipEncoder, library: EmbeddingLibrary) -> None:
    plain = encode_prompt("a sd1style cat", [sd1], embeddings=library)
    weighted = encode_prompt("a (sd1style:1.4) cat", [sd1], embeddings=library)
    assert not torch.equal(plain.embeds[0, 2:4], weighted.embeds[0, 2:4])
    assert torch.equal(plain.embeds[0, 1], weighted.embeds[0, 1])


def test_sdxl_embedding_uses_each_encoders_vectors(
    tokenizer: CLIPTokenizer, sdxl_models: tuple[CLIPTextModel, CLIPTextModelWithProjection],
    library: EmbeddingLibrary,
) -> None:
    encoders = sdxl_encoders(tokenizer, sdxl_models[0], tokenizer, sdxl_models[1])
    encoded = encode_prompt("embedding:xlstyle cat", encoders, embeddings=library)
    assert encoded.report.embeddings == ["xlstyle"] and encoded.report.tokens == 3
    assert encoded.report.warnings == []
    mismatched = encode_prompt("embedding:sd1style cat", encoders, embeddings=library)
    assert mismatched.report.embeddings == [] and "width" in mismatched.report.warnings[0]
    assert mismatched.embeds.shape == (1, 77, L_WIDTH + G_WIDTH)


def test_missing_embedding_warns_and_still_encodes(sd1: ClipEncoder, library: EmbeddingLibrary) -> None:
    encoded = encode_prompt("a embedding:nothere cat", [sd1], embeddings=library)
    assert "nothere" in encoded.report.warnings[0]
    assert torch.equal(encoded.embeds, encode_prompt("a cat", [sd1]).embeds)


def test_cap_from_config_cuts_chunks(sd1: ClipEncoder) -> None:
    encoded = encode_prompt(" ".join(["cat"] * 200), [sd1], max_chunks=2)
    assert encoded.embeds.shape == (1, 154, L_WIDTH)
    assert encoded.report.truncated == 50 and encoded.report.tokens == 200


def test_cache_hits_for_the_same_request(sd1: ClipEncoder, tokenizer: CLIPTokenizer,
                                         sd1_model: CLIPTextModel) -> None:
    cache = PromptEncoderCache(maxsize=4)
    first = encode_prompt("a (cat:1.2)", [sd1], cache=cache)
    first.embeds.zero_()  # a caller scribbling on its copy cannot reach the cache
    second = encode_prompt("a (cat:1.2)", [sd1], cache=cache)
    assert cache.cache_info() == (1, 1, 4, 1)
    assert torch.equal(second.embeds, encode_prompt("a (cat:1.2)", [sd1]).embeds)
    encode_prompt("a (cat:1.2)", [sd1], cache=cache, weighting="a1111")
    encode_prompt("a (cat:1.2)", [sd1_encoder(tokenizer, sd1_model, layer=-2)], cache=cache)
    encode_prompt("a (cat:1.2)", [ClipEncoder(tokenizer, sd1_model, cache_tag="lora:x=0.8")], cache=cache)
    assert cache.cache_info().hits == 1 and cache.cache_info().misses == 4


def test_cache_does_not_keep_models_alive(tokenizer: CLIPTokenizer, sd1_model: CLIPTextModel) -> None:
    cache = PromptEncoderCache()
    model = copy.deepcopy(sd1_model)
    ref = weakref.ref(model)
    encode_prompt("a cat", [sd1_encoder(tokenizer, model)], cache=cache)
    del model
    gc.collect()
    assert ref() is None and cache.cache_info().currsize == 1


def test_bad_arguments_are_refused(tokenizer: CLIPTokenizer, sd1_model: CLIPTextModel, sd1: ClipEncoder) -> None:
    with pytest.raises(ValueError, match="outside"):
        ClipEncoder(tokenizer, sd1_model, layer=-4)
    with pytest.raises(ValueError, match="WithProjection"):
        ClipEncoder(tokenizer, sd1_model, pooled=True)
    with pytest.raises(ValueError, match="weighting"):
        encode_prompt("x", [sd1], weighting="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        encode_prompt("x", [])


def test_cache_key_follows_the_embedding_files_not_the_library_object(
    sd1: ClipEncoder, embedding_folder: Path
) -> None:
    cache = PromptEncoderCache()
    encode_prompt("a sd1style cat", [sd1], embeddings=EmbeddingLibrary(embedding_folder), cache=cache)
    encode_prompt("a sd1style cat", [sd1], embeddings=EmbeddingLibrary(embedding_folder), cache=cache)
    assert cache.cache_info().hits == 1
    save_file({"emb_params": torch.randn(1, L_WIDTH)}, embedding_folder / "cat.safetensors")
    changed = encode_prompt("a sd1style cat", [sd1], embeddings=EmbeddingLibrary(embedding_folder), cache=cache)
    assert cache.cache_info().hits == 1 and changed.report.embeddings == ["sd1style", "cat"]


def test_half_precision_model_gives_float32_close_to_full(
    tokenizer: CLIPTokenizer, sd1_model: CLIPTextModel, library: EmbeddingLibrary
) -> None:
    half = copy.deepcopy(sd1_model).to(torch.bfloat16)
    text = "a (embedding:sd1style:1.2) cat"
    low = encode_prompt(text, [sd1_encoder(tokenizer, half)], embeddings=library)
    full = encode_prompt(text, [sd1_encoder(tokenizer, sd1_model)], embeddings=library)
    assert low.embeds.dtype == torch.float32
    torch.testing.assert_close(low.embeds, full.embeds, rtol=0.05, atol=0.05)
