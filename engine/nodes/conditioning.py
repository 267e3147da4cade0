"""Conditioning nodes: CLIPTextEncode, CLIPTextEncodeSDXL, ConditioningCombine, ConditioningConcat,
ConditioningAverage, ConditioningZeroOut, ConditioningSetTimestepRange and InpaintModelConditioning.

A timestep range rides on each cond's extras as ComfyUI's "start_percent" / "end_percent"; the sampler
(engine/nodes/guidance.py guided_eps) reads them on the model's own sigmas and leaves a cond out of the
steps outside it. The area nodes (ConditioningSetArea, ...Percentage, ...Strength, ConditioningSetMask) are in
area_conditioning.py.

Text goes through `prompts` (tokens, 75-token chunks, emphasis, embeddings); this module only
knows which encoders a checkpoint family has and how ComfyUI sets their layers.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from pydantic import Field

from engine.nodes.base import MAX_RESOLUTION, Node, RunContext, Socket, Text, register
from engine.nodes.vae import encode_pixels, masked_pixels
from engine.values import ClipRef, CondItem, Conditioning, ImageBatch, Latent, Mask, VaeRef
from prompts.encode import ClipEncoder, encode_prompt
from prompts.encoded import EncodedPrompt
from prompts.errors import PromptError

EOS = 49407

log = logging.getLogger(__name__)


def _layer_of(stop: int, model: torch.nn.Module, final_norm: bool) -> tuple[int, bool]:
    """ComfyUI's set_clip_options: a stop layer past the encoder's depth (SD1.x's 12 layers and SDXL's clip_l at
    -13..-24) means its "last" output, the last layer through the final norm; else that hidden layer as set."""
    if abs(stop) > model.config.num_hidden_layers:
        return -1, True
    return stop, final_norm


def clip_encoders(clip: ClipRef, ctx: RunContext) -> list[ClipEncoder]:
    """The ClipEncoders of a checkpoint with its LoRAs active and ComfyUI's layer choice."""
    models = ctx.models.use_text_encoders(clip)
    pipe = clip.pipe
    # the same module object encodes differently under another LoRA set: part of the cache key
    tag = repr(sorted((p.name, p.strength) for p in clip.loras))
    if clip.arch.family == "sdxl":
        # ComfyUI's SDXL encoders: both at the penultimate layer, no final layer norm; clip_g pads
        # with 0 and gives the pooled vector
        stop = -2 if clip.stop_at_layer is None else clip.stop_at_layer
        (layer_l, norm_l), (layer_g, norm_g) = _layer_of(stop, models[0], False), _layer_of(stop, models[1], False)
        return [
            ClipEncoder(pipe.tokenizer, models[0], layer=layer_l, final_norm=norm_l, pooled=False, pad_token=EOS,
                        cache_tag=tag),
            ClipEncoder(pipe.tokenizer_2, models[1], layer=layer_g, final_norm=norm_g, pooled=True, pad_token=0,
                        cache_tag=tag),
        ]
    if clip.arch.family == "sd2":
        # ComfyUI's SD2ClipModel: OpenCLIP's penultimate block through the final layer norm, padded with "!" (0).
        # diffusers loads 23 of the file's 24 blocks (SD2 never uses the last), so ComfyUI's layer -k is our -(k-1)
        stop = -2 if clip.stop_at_layer is None else clip.stop_at_layer
        # ComfyUI's "last" for a stop past the file's depth is that unloaded block too
        if stop == -1 or abs(stop) > models[0].config.num_hidden_layers + 1:
            raise ValueError("CLIPSetLastLayer -1 on an SD2 checkpoint asks for OpenCLIP's last block, which SD2 "
                             "never uses and Noodle does not load; use -2 (SD2's default) or lower")
        return [ClipEncoder(pipe.tokenizer, models[0], layer=stop + 1, final_norm=True, pooled=False, pad_token=0,
                            cache_tag=tag)]
    layer, norm = _layer_of(-1 if clip.stop_at_layer is None else clip.stop_at_layer, models[0], True)
    # SD1.x: an earlier layer still goes through the final layer norm (ComfyUI layer_norm_hidden_state)
    return [ClipEncoder(pipe.tokenizer, models[0], layer=layer, final_norm=norm, pooled=False, pad_token=EOS,
                        cache_tag=tag)]


def encode_text(text: str, encoders: list[ClipEncoder], ctx: RunContext) -> EncodedPrompt:
    """Encode with the models folder's embeddings and the configured weighting; errors name the node."""
    try:
        hits = ctx.models.prompt_cache.cache_info().hits
        encoded = encode_prompt(text, encoders, embeddings=ctx.models.embeddings,
                                weighting=ctx.prompt_weighting,  # type: ignore[arg-type]
                                syntax=ctx.prompt_syntax,  # type: ignore[arg-type]
                                cache=ctx.models.prompt_cache, max_chunks=ctx.limits.max_prompt_chunks)
    except PromptError as err:
        raise PromptError(f"node {ctx.node_id}: {err}") from err
    # the same text with the same encoders in another graph (or this one) comes from the encoder cache
    ctx.meta.encoder_cache[ctx.node_id] = "hit" if ctx.models.prompt_cache.cache_info().hits > hits else "miss"
    return encoded


def cond_item(encoded: EncodedPrompt, extras: dict | None = None) -> CondItem:
    # kept on the CPU in fp32: conditionings are cached between runs and moved to the device by the sampler
    pooled = encoded.pooled.detach().float().cpu() if encoded.pooled is not None else None
    return CondItem(encoded.embeds.detach().float().cpu(), pooled, dict(extras or {}), encoded.report)


@register
class CLIPTextEncode(Node):
    """Encode a prompt into conditioning; long prompts become several 75-token chunks."""

    CATEGORY: ClassVar[str] = "conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    text: str = Text(multiline=True)
    clip: ClipRef = Socket("CLIP")

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        encoded = encode_text(self.text, clip_encoders(self.clip, ctx), ctx)
        ctx.meta.tokens[ctx.node_id] = encoded.report.to_dict()
        return (Conditioning((cond_item(encoded),)),)


@register
class CLIPTextEncodeSDXL(Node):
    """SDXL: separate texts for the two encoders, with explicit size conditioning."""

    CATEGORY: ClassVar[str] = "advanced/conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    clip: ClipRef = Socket("CLIP")
    width: int = Field(1024, ge=0, le=MAX_RESOLUTION)
    height: int = Field(1024, ge=0, le=MAX_RESOLUTION)
    crop_w: int = Field(0, ge=0, le=MAX_RESOLUTION)
    crop_h: int = Field(0, ge=0, le=MAX_RESOLUTION)
    target_width: int = Field(1024, ge=0, le=MAX_RESOLUTION)
    target_height: int = Field(1024, ge=0, le=MAX_RESOLUTION)
    text_g: str = Text(multiline=True)
    text_l: str = Text(multiline=True)

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        if self.clip.arch.family != "sdxl":
            raise ValueError(f"CLIPTextEncodeSDXL needs an SDXL checkpoint; {self.clip.checkpoint.name!r} is "
                             f"{self.clip.arch.family}: use CLIPTextEncode")
        clip_l, clip_g = clip_encoders(self.clip, ctx)
        enc_l = encode_text(self.text_l, [clip_l], ctx)
        enc_g = encode_text(self.text_g, [clip_g], ctx)
        # ComfyUI pads the shorter token list with empty-prompt chunks so both have as many chunks
        embeds_l, embeds_g = enc_l.embeds, enc_g.embeds
        if embeds_l.shape[1] != embeds_g.shape[1]:
            empty_l = encode_text("", [clip_l], ctx).embeds
            empty_g = encode_text("", [clip_g], ctx).embeds
            while embeds_l.shape[1] < embeds_g.shape[1]:
                embeds_l = torch.cat([embeds_l, empty_l], dim=1)
            while embeds_g.shape[1] < embeds_l.shape[1]:
                embeds_g = torch.cat([embeds_g, empty_g], dim=1)
        joined = EncodedPrompt(torch.cat([embeds_l, embeds_g], dim=-1), enc_g.pooled, enc_g.report)
        ctx.meta.tokens[ctx.node_id] = {"text_g": enc_g.report.to_dict(), "text_l": enc_l.report.to_dict()}
        extras = {"width": self.width, "height": self.height, "crop_w": self.crop_w, "crop_h": self.crop_h,
                  "target_width": self.target_width, "target_height": self.target_height}
        return (Conditioning((cond_item(joined, extras),)),)


@register
class ConditioningCombine(Node):
    """Keep two conditionings side by side: the sampler averages their predictions."""

    CATEGORY: ClassVar[str] = "conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    conditioning_1: Conditioning = Socket("CONDITIONING")
    conditioning_2: Conditioning = Socket("CONDITIONING")

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        return (Conditioning(self.conditioning_1.items + self.conditioning_2.items),)


@register
class ConditioningConcat(Node):
    """Join the first cond of `conditioning_from` to each of `conditioning_to` along the token axis."""

    CATEGORY: ClassVar[str] = "conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    conditioning_to: Conditioning = Socket("CONDITIONING")
    conditioning_from: Conditioning = Socket("CONDITIONING")

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        source = self.conditioning_from.items[0]
        joined = tuple(CondItem(torch.cat([item.embeds, source.embeds], dim=1), item.pooled, item.extras, item.report)
                       for item in self.conditioning_to.items)
        return (Conditioning(joined),)


@register
class ConditioningAverage(Node):
    """Blend each cond of `conditioning_to` with the first cond of `conditioning_from`, embeddings and pooled
    output alike: to * strength + from * (1 - strength), `from` cut or zero-padded to each cond's length."""

    CATEGORY: ClassVar[str] = "conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    conditioning_to: Conditioning = Socket("CONDITIONING")
    conditioning_from: Conditioning = Socket("CONDITIONING")
    conditioning_to_strength: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        if not self.conditioning_from.items:
            raise ValueError(f"node {ctx.node_id}: ConditioningAverage's conditioning_from holds no cond to blend in")
        if len(self.conditioning_from.items) > 1:  # as ComfyUI warns
            log.warning("ConditioningAverage conditioning_from contains more than 1 cond, only the first one will "
                        "actually be applied to conditioning_to.")
        source = self.conditioning_from.items[0]
        strength = self.conditioning_to_strength
        out = []
        for item in self.conditioning_to.items:
            length, width = item.embeds.shape[1], item.embeds.shape[2]
            if source.embeds.shape[2] != width:
                raise ValueError(f"node {ctx.node_id}: ConditioningAverage cannot blend conds of {width} and "
                                 f"{source.embeds.shape[2]} features per token; both must come from the same kind "
                                 "of text encoder (one checkpoint family)")
            blend = source.embeds[:, :length]
            if blend.shape[1] < length:  # a shorter `from` is padded with zeros to the cond's length
                blend = torch.cat([blend, torch.zeros((1, length - blend.shape[1], width))], dim=1)
            embeds = item.embeds * strength + blend * (1.0 - strength)
            pooled = item.pooled
            if source.pooled is not None:  # a cond without its own pooled output blends `from`'s with itself
                pooled_to = item.pooled if item.pooled is not None else source.pooled
                pooled = pooled_to * strength + source.pooled * (1.0 - strength)
            out.append(CondItem(embeds, pooled, dict(item.extras), item.report))
        return (Conditioning(tuple(out)),)


@register
class ConditioningZeroOut(Node):
    """Every cond with its embeddings and pooled output set to zeros (the rest of the cond kept)."""

    CATEGORY: ClassVar[str] = "advanced/conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    conditioning: Conditioning = Socket("CONDITIONING")

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        return (Conditioning(tuple(
            CondItem(torch.zeros_like(item.embeds), None if item.pooled is None else torch.zeros_like(item.pooled),
                     dict(item.extras), item.report) for item in self.conditioning.items)),)


@register
class ConditioningSetTimestepRange(Node):
    """Let the conds take part only between `start` and `end` of the sampling (fractions of the model's
    timesteps, read as sigmas on the model's own schedule at sampling time)."""

    CATEGORY: ClassVar[str] = "advanced/conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    conditioning: Conditioning = Socket("CONDITIONING")
    start: float = Field(0.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.001})
    end: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.001})

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        # ComfyUI's conditioning_set_values: a later range replaces an earlier one
        return (self.conditioning.with_values(start_percent=self.start, end_percent=self.end),)


@register
class InpaintModelConditioning(Node):
    """Conditioning for inpainting models: the masked image and the mask ride on the conds; the latent is the
    whole image, with the mask as its noise mask unless `noise_mask` is off."""

    CATEGORY: ClassVar[str] = "conditioning/inpaint"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES: ClassVar[tuple[str, ...]] = ("positive", "negative", "latent")

    positive: Conditioning = Socket("CONDITIONING")
    negative: Conditioning = Socket("CONDITIONING")
    vae: VaeRef = Socket("VAE")
    pixels: ImageBatch = Socket("IMAGE")
    mask: Mask = Socket("MASK")
    noise_mask: bool = Field(True, description="Add a noise mask to the latent so sampling will only happen within "
                                               "the mask. Might improve results or completely break things "
                                               "depending on the model.")

    def run(self, ctx: RunContext) -> tuple[Conditioning, Conditioning, Latent]:
        greyed, mask = masked_pixels(self.pixels.pixels, self.mask.values)
        # the raw VAE latent, as ComfyUI stores it: an inpainting UNet scales it when it concatenates it. A
        # 4-channel UNet has nothing to concatenate and never reads these two (ComfyUI's concat_keys are empty).
        extras = {"concat_latent_image": encode_pixels(self.vae, greyed), "concat_mask": mask}
        positive, negative = self.positive.with_values(**extras), self.negative.with_values(**extras)
        latent = Latent(encode_pixels(self.vae, self.pixels.pixels), noise_mask=mask if self.noise_mask else None)
        return positive, negative, latent
