"""Custom sampling: ComfyUI 0.3.64's scheduler nodes that make a SIGMAS list, the nodes that cut and turn one,
KSamplerSelect (a SAMPLER), SamplerCustom, which runs the sampling loop along any sigma list, and
SamplerCustomAdvanced with its NOISE (RandomNoise, DisableNoise) and GUIDER (BasicGuider, CFGGuider) inputs.

Names, inputs, defaults, ranges and math are comfy_extras/nodes_custom_sampler.py's; the schedules are
comfy/k_diffusion/sampling.py get_sigmas_karras / exponential / polyexponential and, for BasicScheduler, the
model's own schedule as KSampler computes it (engine/samplers/sigmas.py).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field

from engine import samplers
from engine.nodes.base import SEED_MAX, Choice, Node, RunContext, Socket, register
from engine.nodes.sampling import prepare_noise, run_sampler
from engine.samplers.model_sampling import ModelSampling
from engine.settings import Limits
from engine.values import Conditioning, DualCFG, Guider, Latent, ModelRef, Noise, Sampler, Sigmas

__all__ = ["basic_sigmas", "sample_custom", "sd_turbo_sigmas"]

_SCHEDULERS = "sampling/custom_sampling/schedulers"
_SIGMAS = "sampling/custom_sampling/sigmas"
# KarrasScheduler's and its siblings' defaults: SD1.x's training sigma_max and sigma_min
_SIGMA_MAX, _SIGMA_MIN = 14.614642, 0.0291675


def _sigma_field(default: float) -> Any:
    return Field(default, ge=0.0, le=5000.0, json_schema_extra={"step": 0.01, "round": False})


def _rho_field(default: float) -> Any:
    return Field(default, ge=0.0, le=100.0, json_schema_extra={"step": 0.01, "round": False})


def _zero_problems(values: dict[str, Any], names: tuple[str, ...], why: str) -> list[tuple[str, str]]:
    """The inputs among `names` that are 0 where the schedule's math cannot take 0 (ComfyUI raises mid-run)."""
    return [(name, f"{name} 0 {why}; use a value above 0") for name in names if values.get(name, 1.0) == 0]


def _append_zero(head: torch.Tensor) -> Sigmas:
    return Sigmas(torch.cat([head.float(), torch.zeros(1)]))


@register
class BasicScheduler(Node):
    """The model's own sigmas for a scheduler, steps and denoise, as KSampler computes them."""

    CATEGORY: ClassVar[str] = _SCHEDULERS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    model: ModelRef = Socket("MODEL")
    scheduler: str = Choice(samplers.SCHEDULER_NAMES)
    steps: int = Field(20, ge=1, le=10_000)
    denoise: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        denoise = values.get("denoise", 1.0)
        problem = None if denoise >= 1.0 else samplers.schedule_problem(values["steps"], denoise)
        return [("denoise", problem)] if problem else []

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        return (Sigmas(basic_sigmas(self.scheduler, self.steps, self.denoise, self.model.model_sampling)),)


def basic_sigmas(scheduler: str, steps: int, denoise: float, sampling: ModelSampling) -> torch.Tensor:
    """BasicScheduler.get_sigmas: with denoise < 1 the last steps+1 sigmas of int(steps / denoise); 0: none."""
    total = steps
    if denoise < 1.0:
        if denoise <= 0.0:
            return torch.zeros(0)
        problem = samplers.schedule_problem(steps, denoise)
        if problem is not None:
            raise ValueError(problem)
        total = int(steps / denoise)
    return samplers.comfy_sigmas(scheduler, total, sampling)[-(steps + 1):]


@register
class KarrasScheduler(Node):
    """Karras et al. (2022)'s schedule between sigma_max and sigma_min, then 0."""

    CATEGORY: ClassVar[str] = _SCHEDULERS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    steps: int = Field(20, ge=1, le=10_000)
    sigma_max: float = _sigma_field(_SIGMA_MAX)
    sigma_min: float = _sigma_field(_SIGMA_MIN)
    rho: float = _rho_field(7.0)

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        return _zero_problems(values, ("rho",), "divides by zero (the schedule takes sigma ** (1 / rho))")

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        ramp = torch.linspace(0, 1, self.steps)
        min_inv, max_inv = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (_append_zero((max_inv + ramp * (min_inv - max_inv)) ** self.rho),)


@register
class ExponentialScheduler(Node):
    """Sigmas evenly spaced in log sigma from sigma_max down to sigma_min, then 0."""

    CATEGORY: ClassVar[str] = _SCHEDULERS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    steps: int = Field(20, ge=1, le=10_000)
    sigma_max: float = _sigma_field(_SIGMA_MAX)
    sigma_min: float = _sigma_field(_SIGMA_MIN)

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        return _zero_problems(values, ("sigma_max", "sigma_min"), "has no logarithm (the schedule is log-spaced)")

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        return (_append_zero(torch.linspace(math.log(self.sigma_max), math.log(self.sigma_min), self.steps).exp()),)


@register
class PolyexponentialScheduler(Node):
    """A polynomial (power rho) in log sigma from sigma_max down to sigma_min, then 0."""

    CATEGORY: ClassVar[str] = _SCHEDULERS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    steps: int = Field(20, ge=1, le=10_000)
    sigma_max: float = _sigma_field(_SIGMA_MAX)
    sigma_min: float = _sigma_field(_SIGMA_MIN)
    rho: float = _rho_field(1.0)

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        return _zero_problems(values, ("sigma_max", "sigma_min"), "has no logarithm (the schedule is log-spaced)")

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        ramp = torch.linspace(1, 0, self.steps) ** self.rho
        low = math.log(self.sigma_min)
        return (_append_zero(torch.exp(ramp * (math.log(self.sigma_max) - low) + low)),)


def sd_turbo_sigmas(steps: int, denoise: float, sampling: ModelSampling) -> torch.Tensor:
    """SDTurboScheduler: the model's sigmas at timesteps 999, 899, ... 99, from 10 - int(10 * denoise) on, then 0."""
    if sampling.continuous:  # ComfyUI's sigma(999) there is exp(999 / 0.25): an infinite schedule
        raise ValueError("SDTurboScheduler reads a discrete model's timesteps 999, 899, ...; this MODEL samples on a "
                         "continuous EDM range (ModelSamplingContinuousEDM): use BasicScheduler or KarrasScheduler")
    start = 10 - int(10 * denoise)
    timesteps = (torch.arange(1, 11) * 100 - 1).flip(0)[start:start + steps].float()
    table = sampling.table
    skip = sampling.skip_steps
    if skip > 1:  # ModelSamplingDiscreteDistilled.sigma: a training timestep to its table index
        timesteps = (timesteps - (skip - 1)) / skip
    t = timesteps.clamp(0, len(table) - 1)  # ModelSamplingDiscrete.sigma: log-linear between table entries
    log_sigmas, w = table.log().float(), t.frac()
    head = ((1 - w) * log_sigmas[t.floor().long()] + w * log_sigmas[t.ceil().long()]).exp()
    return torch.cat([head, torch.zeros(1)])


@register
class SDTurboScheduler(Node):
    """SD Turbo's schedule: the model's sigmas every 100 timesteps from 999, as many as steps, then 0."""

    CATEGORY: ClassVar[str] = _SCHEDULERS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    model: ModelRef = Socket("MODEL")
    steps: int = Field(1, ge=1, le=10)
    denoise: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        return (Sigmas(sd_turbo_sigmas(self.steps, self.denoise, self.model.model_sampling)),)


@register
class SplitSigmas(Node):
    """Cut a schedule at `step`: high_sigmas up to it, low_sigmas from it (both hold the sigma at `step`)."""

    CATEGORY: ClassVar[str] = _SIGMAS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS", "SIGMAS")
    RETURN_NAMES: ClassVar[tuple[str, ...]] = ("high_sigmas", "low_sigmas")

    sigmas: Sigmas = Socket("SIGMAS")
    step: int = Field(0, ge=0, le=10_000)

    def run(self, ctx: RunContext) -> tuple[Sigmas, Sigmas]:
        values = self.sigmas.values
        return Sigmas(values[:self.step + 1]), Sigmas(values[self.step:])


@register
class FlipSigmas(Node):
    """Reverse a schedule (lowest first); a leading 0 becomes 0.0001, as ComfyUI's."""

    CATEGORY: ClassVar[str] = _SIGMAS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    sigmas: Sigmas = Socket("SIGMAS")

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        values = self.sigmas.values
        if len(values) == 0:
            return (self.sigmas,)
        flipped = values.flip(0)  # a copy: the input value stays as it was
        if flipped[0] == 0:
            flipped[0] = 0.0001
        return (Sigmas(flipped),)


@register
class KSamplerSelect(Node):
    """Pick a sampler for SamplerCustom; only the ComfyUI samplers Noodle runs faithfully are offered."""

    CATEGORY: ClassVar[str] = "sampling/custom_sampling/samplers"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SAMPLER",)

    sampler_name: str = Choice(samplers.SUPPORTED_SAMPLERS)

    def run(self, ctx: RunContext) -> tuple[Sampler]:
        return (Sampler(self.sampler_name),)


@register
class SamplerCustom(Node):
    """Denoise a latent along any SIGMAS list with a SAMPLER; also hands out the last step's denoised estimate."""

    CATEGORY: ClassVar[str] = "sampling/custom_sampling"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT", "LATENT")
    RETURN_NAMES: ClassVar[tuple[str, ...]] = ("output", "denoised_output")

    model: ModelRef = Socket("MODEL")
    add_noise: bool = True
    noise_seed: int = Field(0, ge=0, le=SEED_MAX, json_schema_extra={"control_after_generate": True})
    cfg: float = Field(8.0, ge=0.0, le=100.0, json_schema_extra={"step": 0.1, "round": 0.01})
    positive: Conditioning = Socket("CONDITIONING")
    negative: Conditioning = Socket("CONDITIONING")
    sampler: Sampler = Socket("SAMPLER")
    sigmas: Sigmas = Socket("SIGMAS")
    latent_image: Latent = Socket("LATENT")

    def run(self, ctx: RunContext) -> tuple[Latent, Latent]:
        return sample_custom(ctx, self.model, Noise(self.noise_seed, self.add_noise), self.positive, self.negative,
                             self.cfg, self.sampler, self.sigmas, self.latent_image)


def sample_custom(ctx: RunContext, model: ModelRef, noise_source: Noise, positive: Conditioning,
                  negative: Conditioning, cfg: float, sampler: Sampler, sigmas_in: Sigmas,
                  latent: Latent, dual: DualCFG | None = None) -> tuple[Latent, Latent]:
    """SamplerCustom's and SamplerCustomAdvanced's run: (output, denoised_output); `dual` a DualCFGGuider's."""
    ctx.meta.seeds[ctx.node_id] = noise_source.seed
    sigmas, name = sigmas_in.values.float().cpu().flatten().clone(), sampler.name  # the input value stays as is
    if noise_source.random:
        noise = prepare_noise(latent.samples, noise_source.seed, latent.batch_index)
    else:
        noise = torch.zeros(latent.samples.shape)
    steps = len(sigmas) - 1
    if steps > ctx.limits.max_steps:
        raise ValueError(f"the sigmas make {steps:,} steps; this server's limit is {ctx.limits.max_steps:,} "
                         "(limits.max_steps in config.toml): use a shorter schedule")
    seen: dict[str, torch.Tensor] = {}
    scale = float(model.pipe.vae.config.scaling_factor)

    def preview(step: int, denoised: torch.Tensor) -> None:
        # ComfyUI's preview callback "x0": the last step's first call's estimate, already KSamplerX0Inpaint's blend
        # with the original latent where a noise mask is 0
        if step == steps - 1:
            seen["x0"] = (denoised / scale).cpu()

    try:
        # the scheduler name only labels the plan: the sigmas are the ones given
        out = run_sampler(ctx, model, latent, noise, sigmas, name, "normal", noise_source.seed, cfg, positive,
                          negative, options=sampler.option_dict, preview=preview, dual=dual)
    except samplers.UnfaithfulSampler as err:
        # build_scheduler's refusal names the label scheduler: keep only its reason
        text = str(err)
        start, end = text.find(" on diffusers (") + len(" on diffusers ("), text.rfind("); schedulers that work")
        reason = text[start:end] if 0 < start < end else text
        raise samplers.UnfaithfulSampler(
            f"sampler {name!r} cannot step through these {len(sigmas)} sigmas as ComfyUI does on diffusers "
            f"({reason}); pick another sampler in KSamplerSelect") from None
    denoised = Latent(seen["x0"], latent.batch_index, latent.noise_mask) if "x0" in seen else out
    return out, denoised


@register
class RandomNoise(Node):
    """Seeded initial noise for SamplerCustomAdvanced, as KSampler draws it."""

    CATEGORY: ClassVar[str] = "sampling/custom_sampling/noise"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("NOISE",)

    noise_seed: int = Field(0, ge=0, le=SEED_MAX, json_schema_extra={"control_after_generate": True})

    def run(self, ctx: RunContext) -> tuple[Noise]:
        return (Noise(self.noise_seed, True),)


@register
class DisableNoise(Node):
    """No initial noise: SamplerCustomAdvanced goes on from the latent as it is (a second stage)."""

    CATEGORY: ClassVar[str] = "sampling/custom_sampling/noise"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("NOISE",)

    def run(self, ctx: RunContext) -> tuple[Noise]:
        return (Noise(0, False),)


@register
class BasicGuider(Node):
    """Guide the model with one conditioning alone (cfg 1, no negative pass)."""

    CATEGORY: ClassVar[str] = "sampling/custom_sampling/guiders"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("GUIDER",)

    model: ModelRef = Socket("MODEL")
    conditioning: Conditioning = Socket("CONDITIONING")

    def run(self, ctx: RunContext) -> tuple[Guider]:
        return (Guider(self.model, self.conditioning, None, 1.0),)


@register
class CFGGuider(Node):
    """Classifier-free guidance between a positive and a negative conditioning, as KSampler's."""

    CATEGORY: ClassVar[str] = "sampling/custom_sampling/guiders"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("GUIDER",)

    model: ModelRef = Socket("MODEL")
    positive: Conditioning = Socket("CONDITIONING")
    negative: Conditioning = Socket("CONDITIONING")
    cfg: float = Field(8.0, ge=0.0, le=100.0, json_schema_extra={"step": 0.1, "round": 0.01})

    def run(self, ctx: RunContext) -> tuple[Guider]:
        return (Guider(self.model, self.positive, self.negative, self.cfg),)


@register
class SamplerCustomAdvanced(Node):
    """SamplerCustom with its noise and its guider as inputs of their own."""

    CATEGORY: ClassVar[str] = "sampling/custom_sampling"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT", "LATENT")
    RETURN_NAMES: ClassVar[tuple[str, ...]] = ("output", "denoised_output")

    noise: Noise = Socket("NOISE")
    guider: Guider = Socket("GUIDER")
    sampler: Sampler = Socket("SAMPLER")
    sigmas: Sigmas = Socket("SIGMAS")
    latent_image: Latent = Socket("LATENT")

    def run(self, ctx: RunContext) -> tuple[Latent, Latent]:
        guider = self.guider
        # BasicGuider's missing negative: no conds, a denoised estimate of 0 wherever a hook or a cfg_pp sampler
        # reads it, as ComfyUI's None cond list (at cfg 1 its pass is skipped anyway)
        negative = guider.negative if guider.negative is not None else Conditioning(())
        return sample_custom(ctx, guider.model, self.noise, guider.positive, negative, guider.cfg, self.sampler,
                             self.sigmas, self.latent_image, guider.dual)
