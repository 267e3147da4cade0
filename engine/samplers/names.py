"""ComfyUI's sampler and scheduler names, and how each supported sampler runs on a diffusers scheduler.

`SPECS` maps a ComfyUI sampler name to the diffusers scheduler class that reproduces it and the flags its
loop needs (two model calls a step, VP scaling, step noise); the names without a spec are refused with
`UnfaithfulSampler`. The samplers diffusers has no scheduler for are written in engine/samplers/kdiffusion/
(`KDIFFUSION`), and so are the ones a Sampler* node gives options to; `uses_kdiffusion` says which path runs.
The math is ComfyUI 0.3.64's: comfy/samplers.py and k_diffusion/sampling.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from diffusers.schedulers import (DPMSolverMultistepScheduler, DPMSolverSDEScheduler,
                                  EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                                  KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LMSDiscreteScheduler,
                                  UniPCMultistepScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from engine.samplers.kdiffusion import KDIFFUSION

__all__ = ["DETERMINISTIC_SAMPLERS", "SAMPLER_NAMES", "SCHEDULER_NAMES", "SPECS", "SUPPORTED_SAMPLERS",
           "SamplerSpec", "UnfaithfulSampler", "is_deterministic", "require_known", "spec_for", "uses_kdiffusion"]

# comfy/samplers.py KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"], in ComfyUI's order.
SAMPLER_NAMES: tuple[str, ...] = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
    "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc",
    "uni_pc_bh2")
SCHEDULER_NAMES: tuple[str, ...] = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                                    "normal", "linear_quadratic", "kl_optimal")


class UnfaithfulSampler(ValueError):
    """A sampler/scheduler choice whose diffusers run would not give ComfyUI's picture."""


@dataclass(frozen=True)
class SamplerSpec:
    """How one ComfyUI sampler runs on diffusers."""

    cls: type[SchedulerMixin]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    two_calls: bool = False  # 2nd order: two model calls a step, one for the step into sigma 0
    vp: bool = False  # steps x/sqrt(sigma^2+1) (DPM-Solver, UniPC) where ComfyUI steps x
    noise: str = ""  # step noise: "generator" (a seeded torch.Generator) or "brownian" (a seeded Brownian tree)


_DPMPP = MappingProxyType({"solver_order": 2, "final_sigmas_type": "zero"})
SPECS: Mapping[str, SamplerSpec] = MappingProxyType({
    "euler": SamplerSpec(EulerDiscreteScheduler),
    "euler_ancestral": SamplerSpec(EulerAncestralDiscreteScheduler, noise="generator"),
    "heun": SamplerSpec(HeunDiscreteScheduler, two_calls=True),
    "dpm_2": SamplerSpec(KDPM2DiscreteScheduler, two_calls=True),
    "dpm_2_ancestral": SamplerSpec(KDPM2AncestralDiscreteScheduler, two_calls=True, noise="generator"),
    "lms": SamplerSpec(LMSDiscreteScheduler),
    "dpmpp_sde": SamplerSpec(DPMSolverSDEScheduler, two_calls=True, noise="brownian"),
    "dpmpp_2m": SamplerSpec(DPMSolverMultistepScheduler, {**_DPMPP, "algorithm_type": "dpmsolver++"}, vp=True),
    "dpmpp_2m_sde": SamplerSpec(DPMSolverMultistepScheduler, {**_DPMPP, "algorithm_type": "sde-dpmsolver++"},
                                vp=True, noise="brownian"),
    # ComfyUI's "ddim" is sampler_object("euler"); its random inpaint noise only matters with a mask.
    "ddim": SamplerSpec(EulerDiscreteScheduler),
    "uni_pc": SamplerSpec(UniPCMultistepScheduler, {"solver_type": "bh1"}, vp=True),
    "uni_pc_bh2": SamplerSpec(UniPCMultistepScheduler, {"solver_type": "bh2"}, vp=True),
})
SUPPORTED_SAMPLERS: tuple[str, ...] = tuple(name for name in SAMPLER_NAMES if name in SPECS or name in KDIFFUSION)


def uses_kdiffusion(name: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether `name` (with a Sampler* node's `options`) runs on Noodle's own k-diffusion steps: those diffusers
    has no scheduler for, and a diffusers-backed one given options other than ComfyUI's defaults."""
    if name not in KDIFFUSION:
        return False
    return name not in SPECS or KDIFFUSION[name].options(options) != dict(KDIFFUSION[name].defaults)


def is_deterministic(name: str, options: Mapping[str, Any] | None = None) -> bool:
    """No step noise and no coupling between latents: each latent of a batch gets exactly its solo result (the
    queue may batch such jobs). dpm_adaptive draws no noise but picks its step sizes from the whole batch."""
    if uses_kdiffusion(name, options):
        entry = KDIFFUSION[name]
        return not entry.is_stochastic(entry.options(options)) and not entry.couples_batch
    return name in SPECS and not SPECS[name].noise


# Under KSampler's names (no options), the samplers the queue may batch.
DETERMINISTIC_SAMPLERS = frozenset(name for name in SUPPORTED_SAMPLERS if is_deterministic(name))


def require_known(name: str, names: tuple[str, ...], kind: str) -> None:
    """Refuse a sampler or scheduler name ComfyUI does not have, listing the ones it has."""
    if name not in names:
        raise ValueError(f"unknown {kind} {name!r}; ComfyUI's {kind}s: {', '.join(names)}")


def spec_for(sampler_name: str) -> SamplerSpec:
    """How a ComfyUI sampler runs on diffusers; UnfaithfulSampler for a known one Noodle cannot reproduce."""
    require_known(sampler_name, SAMPLER_NAMES, "sampler")
    if sampler_name not in SPECS:
        raise UnfaithfulSampler(f"sampler {sampler_name!r} has no faithful diffusers equivalent in Noodle; "
                                f"use one of: {', '.join(SUPPORTED_SAMPLERS)}")
    return SPECS[sampler_name]
