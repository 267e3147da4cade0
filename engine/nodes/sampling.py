"""Sampler nodes: KSampler and KSamplerAdvanced, with ComfyUI's names, defaults and ranges.

The sigma schedule is ComfyUI's (engine/samplers/sigmas.py), the step math is a diffusers scheduler,
and the model call is ComfyUI's guided prediction (engine/nodes/guidance.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field

from engine import samplers
from engine.models.unet_hooks import unet_patched
from engine.nodes.base import SEED_MAX, Choice, Node, RunContext, Socket, register
from engine.nodes.cfg_hooks import is_hooked
from engine.nodes.guidance import InpaintSource, guided_eps
from engine.samplers.loop import lands_on_denoised, resize_noise_mask
from engine.settings import Limits
from engine.values import Conditioning, DualCFG, Latent, ModelRef


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: tuple[int, ...] | None = None) -> torch.Tensor:
    """Initial noise on the CPU for the whole batch, as comfy/sample.py prepare_noise: same seed, same picture anywhere."""
    # a generator of our own: the same numbers as ComfyUI's torch.manual_seed(seed), without reseeding
    # the process-wide generator under other threads
    generator = torch.Generator("cpu").manual_seed(seed)
    if batch_index is None:
        return torch.randn(latent.shape, dtype=torch.float32, generator=generator, device="cpu")
    # items of a split batch keep the noise they had in the whole batch
    draws = [torch.randn((1, *latent.shape[1:]), dtype=torch.float32, generator=generator, device="cpu")
             for _ in range(max(batch_index) + 1)]
    return torch.cat([draws[i] for i in batch_index])


def run_sampler(ctx: RunContext, model: ModelRef, latent: Latent, noise: torch.Tensor, sigmas: torch.Tensor,
                sampler_name: str, scheduler: str, seed: int, cfg: float,
                positive: Conditioning | Sequence[Conditioning], negative: Conditioning | Sequence[Conditioning],
                sizes: Sequence[int] | None = None, options: Mapping[str, Any] | None = None,
                preview: Callable[[int, torch.Tensor], None] | None = None, dual: DualCFG | None = None) -> Latent:
    """Denoise `latent` along `sigmas`; progress and interrupts at every step.

    Per-item conds and `sizes` as in `guided_eps`: the queue samples several jobs' latents at once. A latent
    with a noise mask changes only where the mask is 1 (ComfyUI's KSamplerX0Inpaint; engine/samplers/loop.py).
    The result keeps the input's batch index and noise mask, as ComfyUI's `latent.copy()` does, so a second
    sampler after this one is masked too. `options` are a Sampler* node's (eta, s_noise, ...); `preview(step,
    denoised)` gets each step's denoised estimate, as k-diffusion's callback hands it out (SamplerCustom's
    denoised_output).
    The MODEL's CFG hooks (RescaleCFG, SAG, PAG) apply; `dual` is a DualCFGGuider's (cfg is then its cfg_conds).
    """
    if len(sigmas) < 2:
        return latent  # nothing to do (denoise 0, or start past the end), as ComfyUI returns the input
    unet = ctx.models.use_unet(model)
    scale = float(model.pipe.vae.config.scaling_factor)
    h, w = latent.samples.shape[2] * 8, latent.samples.shape[3] * 8
    inpaint = InpaintSource(latent.samples.float() * scale, latent.noise_mask, scale)
    # [engine] compile: the UNet's compiled call, unless this run hooks the UNet (patches, CFG hooks) or has LoRAs
    forward = ctx.models.unet_forward(model, unet, hooked=bool(model.patches.unet) or is_hooked(model.patches))
    eps = guided_eps(unet, positive, negative, cfg, model.arch.family == "sdxl", (h, w), sizes, inpaint,
                     sampling=model.model_sampling, family=model.arch.family, patches=model.patches, dual=dual,
                     seed=seed, forward=forward)
    plan = samplers.build_scheduler(sampler_name, scheduler, sigmas, seed, model.model_sampling, options,
                                    device=unet.device)
    steps = len(sigmas) - 1

    def on_step(index: int, total: int, x: torch.Tensor) -> None:
        ctx.progress(index + 1, total)

    ctx.progress(0, steps)
    mask_patch = model.patches.denoise_mask  # DifferentialDiffusion's, read on this MODEL's sampling
    # FreeU / hypernetwork hooks on the shared UNet for this run only: removed on the way out, errors included
    with torch.inference_mode(), unet_patched(unet, model.patches.unet):
        # LATENT values are in the VAE's raw space; the model works on scaled latents
        masked = {} if latent.noise_mask is None else {"denoise_mask": latent.noise_mask}
        if masked and mask_patch is not None:
            masked["denoise_mask_function"] = functools.partial(mask_patch, sampling=model.model_sampling)
        # sampled on the UNet's device, handed back where LATENT values live (the CPU), once
        out = samplers.sample(plan, eps, latent.samples.float() * scale, noise, callback=on_step, device=unet.device,
                              preview=preview, **masked).to(latent.samples.device) / scale
    # (a per-step mask function may denoise the mask-0 area too: ComfyUI's result stands as it is then)
    if latent.noise_mask is not None and mask_patch is None and lands_on_denoised(plan):
        # where the mask is 0 the sampler ended on the original latent up to float rounding (scaling included):
        # hand back the original itself, so an inpaint leaves the rest of the picture's latent as it was
        kept = resize_noise_mask(latent.noise_mask, out.shape) == 0
        out = torch.where(kept, latent.samples.float(), out)
    return Latent(out, latent.batch_index, latent.noise_mask)


def _sampler_problems(values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
    if values["steps"] > limits.max_steps:  # refused anyway: its schedule is not worth computing
        return [("steps", f"steps {values['steps']} is above this server's limit of {limits.max_steps}; "
                          "use fewer, or ask the owner to raise limits.max_steps in config.toml")]
    denoise = values.get("denoise", 1.0)
    too_long = samplers.schedule_problem(values["steps"], denoise)
    if too_long is not None:
        return [("denoise", too_long)]
    try:
        samplers.check_pair(values["sampler_name"], values["scheduler"], values["steps"], denoise)
    except samplers.UnfaithfulSampler as err:
        return [("scheduler", str(err))]
    return []


@register
class KSampler(Node):
    """Denoise a latent with one ComfyUI sampler/scheduler pair."""

    CATEGORY: ClassVar[str] = "sampling"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    model: ModelRef = Socket("MODEL")
    seed: int = Field(0, ge=0, le=SEED_MAX, json_schema_extra={"control_after_generate": True})
    steps: int = Field(20, ge=1, le=10_000)
    cfg: float = Field(8.0, ge=0.0, le=100.0, json_schema_extra={"step": 0.1})
    sampler_name: str = Choice(samplers.SUPPORTED_SAMPLERS)
    scheduler: str = Choice(samplers.SCHEDULER_NAMES)
    positive: Conditioning = Socket("CONDITIONING")
    negative: Conditioning = Socket("CONDITIONING")
    latent_image: Latent = Socket("LATENT")
    denoise: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        return _sampler_problems(values, limits)

    def run(self, ctx: RunContext) -> tuple[Latent]:
        ctx.meta.seeds[ctx.node_id] = self.seed
        latent = self.latent_image
        noise = prepare_noise(latent.samples, self.seed, latent.batch_index)
        sigmas = samplers.ksampler_sigmas(self.scheduler, self.steps, self.denoise, self.model.model_sampling,
                                           sampler_name=self.sampler_name)
        return (run_sampler(ctx, self.model, latent, noise, sigmas, self.sampler_name, self.scheduler, self.seed,
                            self.cfg, self.positive, self.negative),)


@register
class KSamplerAdvanced(Node):
    """KSampler with control over noise and the range of steps run."""

    CATEGORY: ClassVar[str] = "sampling"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    model: ModelRef = Socket("MODEL")
    add_noise: str = Choice(("enable", "disable"))
    noise_seed: int = Field(0, ge=0, le=SEED_MAX, json_schema_extra={"control_after_generate": True})
    steps: int = Field(20, ge=1, le=10_000)
    cfg: float = Field(8.0, ge=0.0, le=100.0, json_schema_extra={"step": 0.1})
    sampler_name: str = Choice(samplers.SUPPORTED_SAMPLERS)
    scheduler: str = Choice(samplers.SCHEDULER_NAMES)
    positive: Conditioning = Socket("CONDITIONING")
    negative: Conditioning = Socket("CONDITIONING")
    latent_image: Latent = Socket("LATENT")
    start_at_step: int = Field(0, ge=0, le=10_000)
    end_at_step: int = Field(10_000, ge=0, le=10_000)
    return_with_leftover_noise: str = Choice(("disable", "enable"))

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        return _sampler_problems(values, limits)

    def run(self, ctx: RunContext) -> tuple[Latent]:
        ctx.meta.seeds[ctx.node_id] = self.noise_seed
        latent = self.latent_image
        if self.add_noise == "disable":
            noise = torch.zeros(latent.samples.shape)
        else:
            noise = prepare_noise(latent.samples, self.noise_seed, latent.batch_index)
        sigmas = samplers.advanced_sigmas(self.scheduler, self.steps, self.start_at_step, self.end_at_step,
                                          self.return_with_leftover_noise != "enable", self.model.model_sampling,
                                          sampler_name=self.sampler_name)
        return (run_sampler(ctx, self.model, latent, noise, sigmas, self.sampler_name, self.scheduler,
                            self.noise_seed, self.cfg, self.positive, self.negative),)
