"""Text -> conditioning with transformers CLIP text models: the engine's CLIPTextEncode.

One `ClipEncoder` per text encoder: SD1.x has one (`sd1_encoder`), SDXL two (`sdxl_encoders`:
clip_l, then clip_g, joined on the feature axis as ComfyUI's SDXLClipModel does).

    1. plan: the text's chunks and report (plan.py), the same for every encoder
    2. per encoder: every chunk as 77 ids in one batch, embedding vectors put into the token
       embeddings, hidden states of `layer`, optional final layer norm
    3. weights: ComfyUI's `(z - z_empty) * w + z_empty`, or A1111's multiply-and-restore-mean
    4. chunks joined along the token axis, encoders along the feature axis; the pooled output
       is the pooled encoder's `text_embeds` of the first chunk

Outputs are float32, as ComfyUI's text encoders return, on the models' device; the engine
casts them to the UNet's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, cast

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from .cache import PromptEncoderCache
from .chunks import CHUNK_TOKENS, Chunk
from .embeddings import EmbeddingLibrary
from .encoded import EncodedPrompt
from .errors import PromptError
from .plan import Syntax, plan_prompt

__all__ = ["ClipEncoder", "Weighting", "encode_prompt", "sd1_encoder", "sdxl_encoders"]

Weighting = Literal["comfy", "a1111"]
_WEIGHTINGS = ("comfy", "a1111")


@dataclass(frozen=True, eq=False)  # compared by identity: tokenizers and models have no value equality
class ClipEncoder:
    """One CLIP text encoder and how to read it.

    `layer`: which hidden layer, -1 the last, -2 the penultimate (ComfyUI's CLIPSetLastLayer,
    A1111's "clip skip" 2). `final_norm`: apply the final layer norm to that layer (SD1.x does,
    SDXL does not). `pooled`: this encoder gives SDXL's pooled output (`text_embeds` of a
    CLIPTextModelWithProjection). `pad_token`: what fills a chunk after its end token (the end
    token 49407 for SD1.x and clip_l, 0 for SDXL's clip_g, as ComfyUI pads). `cache_tag`: tells
    two weight states of the same model object apart (e.g. the LoRAs patched into it); it is
    part of the cache key.
    """

    tokenizer: PreTrainedTokenizerBase
    model: CLIPTextModel | CLIPTextModelWithProjection
    layer: int = -1
    final_norm: bool = True
    pooled: bool = False
    pad_token: int = 49407
    cache_tag: str = ""

    def __post_init__(self) -> None:
        depth = self.model.config.num_hidden_layers
        if not -depth <= self.layer <= -1:
            raise ValueError(f"layer {self.layer} is outside this text encoder's -{depth}..-1 "
                             "(-1 = last hidden layer, -2 = penultimate)")
        if self.pooled and not isinstance(self.model, CLIPTextModelWithProjection):
            raise ValueError(f"a pooled encoder needs a CLIPTextModelWithProjection, not {type(self.model).__name__}")

    @property
    def width(self) -> int:
        """Features per token (768 for clip_l, 1280 for clip_g)."""
        return int(self.model.config.hidden_size)

    def input_ids(self, chunk: Chunk) -> list[int]:
        """The chunk as this encoder's 77 ids: start, tokens, end, then this encoder's padding."""
        bos, eos = cast(int, self.tokenizer.bos_token_id), _end_token(self.tokenizer)
        return chunk.input_ids(bos, eos, self.pad_token)

    def key(self) -> tuple[object, ...]:
        """What identifies this encoder's output in a cache key (objects by id, see cache.py)."""
        return (id(self.model), id(self.tokenizer), self.layer, self.final_norm, self.pooled, self.pad_token,
                self.cache_tag)


def sd1_encoder(
    tokenizer: PreTrainedTokenizerBase, model: CLIPTextModel, layer: int = -1
) -> ClipEncoder:
    """SD1.x's text encoder: last layer by default, final norm applied, padded with the end token."""
    return ClipEncoder(tokenizer, model, layer=layer, final_norm=True, pad_token=_end_token(tokenizer))


def sdxl_encoders(
    tokenizer_l: PreTrainedTokenizerBase,
    model_l: CLIPTextModel | CLIPTextModelWithProjection,
    tokenizer_g: PreTrainedTokenizerBase,
    model_g: CLIPTextModelWithProjection,
    layer: int = -2,
) -> tuple[ClipEncoder, ClipEncoder]:
    """SDXL's clip_l and clip_g, both at `layer` (-2 as ComfyUI) without the final norm; clip_g pads
    with 0 and gives the pooled output."""
    return (
        ClipEncoder(tokenizer_l, model_l, layer=layer, final_norm=False, pad_token=_end_token(tokenizer_l)),
        ClipEncoder(tokenizer_g, model_g, layer=layer, final_norm=False, pooled=True, pad_token=0),
    )


def _end_token(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(cast(int, tokenizer.eos_token_id))


def _text_model(model: CLIPTextModel | CLIPTextModelWithProjection) -> CLIPTextModel:
    return model.text_model if isinstance(model, CLIPTextModelWithProjection) else model


def _run(
    encoder: ClipEncoder, ids: list[list[int]], vectors: list[tuple[int, int, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode a batch of 77-id rows; `vectors` = (row, position, vector) placed into the token
    embeddings. Returns hidden states [rows, 77, width] and pooled [rows, projection] in float32."""
    model = encoder.model
    table = model.get_input_embeddings()
    input_ids = torch.tensor(ids, dtype=torch.long, device=table.weight.device)

    # transformers 5.23's CLIP text models take no `inputs_embeds`; a forward hook on the token
    # embedding swaps the vectors in before the position embeddings are added, so the model's
    # own forward (causal mask, pooling at the first end token) runs unchanged. The hook lives
    # only for this call; the engine's single worker thread owns the models, so no other
    # forward pass can run through it meanwhile.
    def put_vectors(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, position, vector in vectors:
            output[row, position] = vector.to(device=output.device, dtype=output.dtype)
        return output

    wants_hidden = not (encoder.layer == -1 and encoder.final_norm)  # else last_hidden_state is it
    handle = table.register_forward_hook(put_vectors) if vectors else None
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, output_hidden_states=wants_hidden)
            if wants_hidden:
                z = out.hidden_states[encoder.layer]
                if encoder.final_norm:
                    z = _text_model(model).final_layer_norm(z)
            else:
                z = out.last_hidden_state
    finally:
        if handle is not None:
            handle.remove()
    pooled = out.text_embeds.float() if encoder.pooled else None
    return z.float(), pooled


def _empty_encoding(encoder: ClipEncoder, cache: PromptEncoderCache | None) -> torch.Tensor:
    """The encoding of the empty prompt's 77 tokens [77, width], ComfyUI's weighting reference."""
    owners = (encoder.model, encoder.tokenizer)
    if cache is not None and (stored := cache.empty_lookup(encoder.key(), owners)) is not None:
        return stored
    z_empty = _run(encoder, [encoder.input_ids(Chunk((), ()))], [])[0][0]
    if cache is not None:
        cache.empty_store(encoder.key(), owners, z_empty)
    return z_empty


# A1111 restores a chunk's mean by the ratio of two means; when either is this small next to the
# chunk's typical magnitude the ratio is noise (a final LayerNorm without bias gives means of ~1e-8,
# and 0/0 is NaN), so the chunk is weighted without restoring and the report says so.
_MEAN_RESTORE_FLOOR = 1e-3


def _apply_weights(
    z: torch.Tensor, chunks: Sequence[Chunk], weighting: Weighting, empty: torch.Tensor | None
) -> tuple[torch.Tensor, list[str]]:
    """Weight each chunk's hidden states [chunks, 77, width], with warnings for the report; chunks
    with all weights 1.0 are left bit for bit as encoded."""
    out = z.clone()
    warnings: list[str] = []
    for index, chunk in enumerate(chunks):
        if not chunk.weighted:
            continue
        w = torch.tensor(chunk.full_weights(), dtype=z.dtype, device=z.device)[:, None]
        if weighting == "comfy":
            # ComfyUI: move each token away from (w > 1) or towards (w < 1) the empty prompt's
            # token at that position; weight-1.0 positions are not touched (where, not arithmetic)
            assert empty is not None
            moved = (z[index] - empty) * w + empty
            out[index] = torch.where(w != 1.0, moved, z[index])
            continue
        # A1111 "Original": scale each token, then restore the chunk's mean so the overall
        # magnitude stays where the UNet expects it
        original_mean = z[index].mean()
        scaled = z[index] * w
        new_mean = scaled.mean()
        floor = _MEAN_RESTORE_FLOOR * z[index].abs().mean()
        ratio = original_mean / new_mean if new_mean != 0 else torch.tensor(float("inf"))
        if min(original_mean.abs(), new_mean.abs()) <= floor or not torch.isfinite(ratio):
            out[index] = scaled
            warnings.append(f"a1111 weighting: chunk {index + 1}'s mean ({float(original_mean):.2g}) is too close "
                            "to zero to restore; its weights were applied without restoring the mean")
        else:
            out[index] = scaled * ratio
    return out, warnings


def encode_prompt(
    text: str,
    encoders: Sequence[ClipEncoder],
    *,
    embeddings: EmbeddingLibrary | None = None,
    weighting: Weighting = "comfy",
    max_chunks: int | None = None,
    cache: PromptEncoderCache | None = None,
    syntax: Syntax = "noodle",
) -> EncodedPrompt:
    """Encode `text` with `encoders` (SD1.x: one, SDXL: clip_l then clip_g) into conditioning.

    Long prompts become several 77-token chunks, each encoded on its own (as one row of a batch)
    and joined on the token axis;
    `max_chunks` (from config) caps them and the report says what was cut; `syntax` is how the text is read
    (Noodle's or ComfyUI's, prompts/plan.py). With `cache`, the same text, encoders, layers, weighting, syntax,
    cap and embedding files give the stored result.
    Raises `PromptError` for text the user must fix, `ValueError` for bad arguments.
    """
    # 1. Check inputs
    if not encoders:
        raise ValueError("encode_prompt needs at least one ClipEncoder")
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {_WEIGHTINGS}, not {weighting!r}")
    if sum(encoder.pooled for encoder in encoders) > 1:
        raise ValueError("only one encoder can give the pooled output (SDXL: clip_g)")
    owners = [obj for encoder in encoders for obj in (encoder.model, encoder.tokenizer)]
    key = (text, tuple(encoder.key() for encoder in encoders), weighting, syntax, max_chunks,
           None if embeddings is None else embeddings.fingerprint())  # the folder and its files, not the object
    if cache is not None and (stored := cache.lookup(key, owners)) is not None:
        return stored.copy()

    # 2. Plan: the chunks are the same for every encoder (one CLIP vocabulary); only padding differs
    plan = plan_prompt(text, encoders[0].tokenizer, embeddings=embeddings,
                       widths=[encoder.width for encoder in encoders], max_chunks=max_chunks, syntax=syntax)

    # 3. Encode every chunk with every encoder, then weight
    per_encoder: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    warnings: list[str] = []
    for encoder in encoders:
        ids = [encoder.input_ids(chunk) for chunk in plan.chunks]
        vectors = [
            (row, 1 + slot.position, cast(EmbeddingLibrary, embeddings).vectors(slot.name, encoder.width)[slot.row])
            for row, chunk in enumerate(plan.chunks)
            for slot in chunk.slots
        ]
        z, encoder_pooled = _run(encoder, ids, vectors)
        if any(chunk.weighted for chunk in plan.chunks):
            empty = _empty_encoding(encoder, cache) if weighting == "comfy" else None
            z, weight_warnings = _apply_weights(z, plan.chunks, weighting, empty)
            warnings.extend(weight_warnings)
        per_encoder.append(z.reshape(1, len(plan.chunks) * (CHUNK_TOKENS + 2), encoder.width))
        if encoder_pooled is not None:
            pooled = encoder_pooled[0:1]  # from the first chunk, as ComfyUI and A1111

    # 4. Join encoders on the feature axis (SDXL: clip_l then clip_g)
    embeds = torch.cat(per_encoder, dim=-1)
    if not bool(torch.isfinite(embeds).all()) or (pooled is not None and not bool(torch.isfinite(pooled).all())):
        # never hand NaN/inf to a sampler: it would decode black, and on a GPU flip the shared VAE to fp32
        raise PromptError("this prompt's conditioning came out as NaN or infinity (an extreme weight?); "
                          "use smaller weights and try again")
    report = plan.report if not warnings else replace(
        plan.report, warnings=list(dict.fromkeys([*plan.report.warnings, *warnings])))
    result = EncodedPrompt(embeds, pooled, report)
    if cache is not None:
        cache.store(key, owners, result)
        return result.copy()
    return result
