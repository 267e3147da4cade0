"""A diffusers scheduler set up to step through ComfyUI's sigmas (`SamplerPlan`), or a refusal saying why not.

`build_scheduler` hands the scheduler the exact sigmas, checks it steps through them, and lists the model
calls; `check_pair` answers the same question cheaply at validation, once per sampler/scheduler pair.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from diffusers.schedulers import (DPMSolverSDEScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                                  HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler,
                                  UniPCMultistepScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from engine.samplers.kdiffusion import KDIFFUSION, KDiffSampler
from engine.samplers.model_sampling import DEFAULT_SAMPLING, ModelSampling
from engine.samplers.names import (SAMPLER_NAMES, SCHEDULER_NAMES, SPECS, SamplerSpec, UnfaithfulSampler,
                                   require_known, spec_for, uses_kdiffusion)
from engine.samplers.sigmas import ksampler_sigmas, model_sigmas

__all__ = ["SamplerPlan", "build_scheduler", "check_pair", "supported_schedulers"]

# SD1.x/SDXL training betas; "linspace" because the checkpoint's own "leading" spacing gives another
# picture (COMFY_FACTS: 19.5 dB). The spacing only matters before our sigmas replace diffusers' own.
_SD_CONFIG: Mapping[str, Any] = MappingProxyType({"num_train_timesteps": 1000, "beta_start": 0.00085,
                                                  "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                                  "prediction_type": "epsilon", "timestep_spacing": "linspace"})


@dataclass(frozen=True, eq=False)
class SamplerPlan:
    """A diffusers scheduler set up to step through one ComfyUI sigma list. Single use: it holds state."""

    sampler_name: str
    scheduler_name: str
    sigmas: torch.Tensor  # ComfyUI's sigmas; fewer than 2: nothing to sample
    steps: int  # ComfyUI's total_steps, len(sigmas) - 1
    scheduler: SchedulerMixin | None
    calls: tuple[tuple[float, float], ...]  # (UNet timestep, sigma) of each model call, in order
    generator: torch.Generator | None  # step noise of the ancestral samplers, seeded with the job seed
    seed: int
    sigma_max: float  # the model's largest training sigma: decides ComfyUI's initial noise scale
    mechanism: str  # how diffusers got the sigmas: "sigmas=", "sigma array", "sigma hook"; or "k-diffusion"
    # Noodle's own k-diffusion step function (engine/samplers/kdiffusion/) and its options, instead of `scheduler`
    kdiff: KDiffSampler | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    sampling: ModelSampling = DEFAULT_SAMPLING

    @property
    def effective_sigmas(self) -> torch.Tensor:
        """The sigmas the diffusers scheduler's steps go between."""
        return self.sigmas if self.scheduler is None else _boundaries(self.scheduler)[: self.steps + 1]

    @property
    def runs(self) -> bool:
        """Whether there is anything to sample (at least one step, on diffusers or on Noodle's own steps)."""
        return self.scheduler is not None or (self.kdiff is not None and self.steps >= 1)


@functools.cache
def _pristine(cls: type[SchedulerMixin], kwargs: tuple[tuple[str, Any], ...]) -> SchedulerMixin:
    """One scheduler per configuration, handed out as copies: KDPM2's constructor alone takes 0.2 s."""
    return cls(**_SD_CONFIG, **dict(kwargs))


def _configure(spec: SamplerSpec, target: torch.Tensor) -> tuple[str, SchedulerMixin]:
    """A diffusers scheduler set to step through `target`, and how; the caller checks the result."""
    n, kwargs = len(target) - 1, dict(spec.kwargs)
    if spec.cls is UniPCMultistepScheduler:
        kwargs["solver_order"] = max(1, min(3, n - 1))  # uni_pc.py: order = min(3, len(timesteps) - 2)
    make = lambda **flags: copy.deepcopy(_pristine(spec.cls, tuple(sorted({**kwargs, **flags}.items()))))  # noqa
    if spec.cls is EulerDiscreteScheduler:
        scheduler = make()
        scheduler.set_timesteps(sigmas=target.tolist())
        return "sigmas=", scheduler
    # diffusers always ends with a step into sigma 0: a list stopping above 0 (KSamplerAdvanced's leftover
    # noise) gets a 0 appended and the run stops a step early. UniPC gets its last sigma set below instead.
    head = target[:-1] if target[-1] == 0 or spec.cls is UniPCMultistepScheduler else target
    if spec.cls is EulerAncestralDiscreteScheduler:  # no custom sigmas, but its step() reads only .sigmas
        scheduler = make()
        scheduler.set_timesteps(len(head))
        scheduler.sigmas = torch.cat([head, torch.zeros(1)])
        return "sigma array", scheduler
    # The rest derive all their arrays (2nd-order interleaving, midpoints, timesteps) from _convert_to_karras, so it
    # answers ComfyUI's sigmas. Plain flags (use_karras_sigmas...) move sigmas ~1e-5: enough to change a timestep.
    scheduler = make(use_karras_sigmas=True)
    scheduler._convert_to_karras = lambda in_sigmas, num_inference_steps=None: head.double().numpy().copy()
    scheduler.set_timesteps(len(head))
    if spec.cls is UniPCMultistepScheduler:
        scheduler.sigmas[-1] = float(target[-1])  # UniPC's updates read only .sigmas
    return "sigma hook", scheduler


def _boundaries(scheduler: SchedulerMixin) -> torch.Tensor:
    """The sigmas a scheduler's steps go between, undoing the 2nd-order schedulers' interleaving."""
    sigmas = scheduler.sigmas
    if isinstance(scheduler, (KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler)):
        return sigmas[0::2]  # s0, s1, s1, ..., s_last, s_last, 0, 0, 0
    if isinstance(scheduler, (HeunDiscreteScheduler, DPMSolverSDEScheduler)):
        return torch.cat([sigmas[:-1:2], sigmas[-1:]])  # s0, s1, s1, ..., s_last, s_last, 0
    return sigmas


def _call_sigmas(scheduler: SchedulerMixin) -> list[float]:
    """The sigma of each model call, taken where each scheduler's scale_model_input takes it."""
    sigmas, out = scheduler.sigmas, []
    for k in range(len(scheduler.timesteps)):  # odd calls of 2nd-order schedulers are their 2nd calls
        if k % 2 and isinstance(scheduler, KDPM2DiscreteScheduler):
            out.append(scheduler.sigmas_interpol[k])
        elif k % 2 and isinstance(scheduler, KDPM2AncestralDiscreteScheduler):
            out.append(scheduler.sigmas_interpol[k - 1])
        elif k % 2 and isinstance(scheduler, DPMSolverSDEScheduler):  # midpoint in t = -log(sigma), as step() has it
            t, t_next = sigmas[k - 1].log().neg(), sigmas[k].log().neg()
            out.append((t + (t_next - t) * 0.5).neg().exp())
        else:  # Heun's 2nd call is at the next sigma, which its interleaved .sigmas holds there
            out.append(sigmas[k])
    return [float(s) for s in out]


def _plan(sampler_name: str, scheduler_name: str, sigmas: torch.Tensor, seed: int,
          sampling: ModelSampling = DEFAULT_SAMPLING) -> SamplerPlan:
    """build_scheduler, refusing without the list of alternatives."""
    spec = spec_for(sampler_name)
    require_known(scheduler_name, SCHEDULER_NAMES, "scheduler")
    sigmas = _checked_sigmas(sigmas)
    n = len(sigmas) - 1
    plan = dict(sampler_name=sampler_name, scheduler_name=scheduler_name, sigmas=sigmas, steps=max(n, 0), seed=seed,
                sigma_max=sampling.sigma_max)
    if n < 1:
        return SamplerPlan(**plan, scheduler=None, calls=(), generator=None, mechanism="none")
    target = sigmas.clone()
    problem = _count_problem(spec, n)
    if problem is not None:
        raise UnfaithfulSampler(problem)
    if spec.cls is UniPCMultistepScheduler and target[-1] == 0:  # uni_pc.py stops at 0.001, then divides by alpha
        target[-1] = 0.001
    mechanism, scheduler = _configure(spec, target)
    effective = _boundaries(scheduler)[: n + 1]
    if len(effective) != n + 1 or not bool(((effective - target).abs() <= 1e-4 * target + 1e-8).all()):
        raise UnfaithfulSampler(f"diffusers steps through {effective.tolist()}, ComfyUI through {target.tolist()}")
    scheduler.set_begin_index(0)  # step() then follows our call order instead of looking timesteps up
    # a 2nd-order scheduler makes one call for its step into 0, which a run ending above 0 never takes
    n_calls = 2 * n - (len(_boundaries(scheduler)) == n + 1) if spec.two_calls else n
    call_sigmas = _call_sigmas(scheduler)[:n_calls]
    # floats: a discrete model's are whole training timesteps, a continuous one's 0.25 * log(sigma)
    calls = tuple(zip(sampling.timestep(torch.tensor(call_sigmas)).tolist(), call_sigmas))
    generator = torch.Generator("cpu").manual_seed(seed) if spec.noise == "generator" else None
    return SamplerPlan(**plan, scheduler=scheduler, calls=calls, generator=generator, mechanism=mechanism)


def build_scheduler(sampler_name: str, scheduler_name: str, sigmas: torch.Tensor, seed: int,
                    sampling: ModelSampling = DEFAULT_SAMPLING,
                    options: Mapping[str, Any] | None = None, device: torch.device | None = None) -> SamplerPlan:
    """A diffusers scheduler (SD1.5 betas) stepping through `sigmas`; UnfaithfulSampler if it cannot. A sampler
    diffusers lacks, or one given a Sampler* node's `options`, gets Noodle's own k-diffusion steps instead.
    `device` is the model's. ComfyUI's ancestral samplers draw their step noise from a generator seeded on it, and a
    CUDA generator's numbers are not a CPU one's; diffusers' schedulers draw on the CPU (and refuse a CUDA
    generator for CPU latents), so off the CPU those samplers run on Noodle's own steps, which draw where ComfyUI does.

    `sampling` is the MODEL's (ModelSamplingDiscrete): its sigma table decides ComfyUI's initial noise scale
    (a zsnr model's sigma_max is about 4518) and the UNet timestep of each call (an LCM model's 50 timesteps).
    """
    require_known(sampler_name, SAMPLER_NAMES, "sampler")
    if uses_kdiffusion(sampler_name, options) or _draws_on(device, sampler_name):
        return _kdiff_plan(sampler_name, scheduler_name, sigmas, seed, sampling, options)
    if options and sampler_name not in KDIFFUSION:
        raise UnfaithfulSampler(f"sampler {sampler_name!r} takes no options in Noodle; got {dict(options)}")
    spec_for(sampler_name)
    try:
        return _plan(sampler_name, scheduler_name, sigmas, seed, sampling)
    except UnfaithfulSampler as err:
        raise UnfaithfulSampler(_refusal(sampler_name, scheduler_name, str(err), max(len(sigmas) - 1, 1))) from None


def _checked_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """A sigma list as float32, refused unless every sigma is finite and >= 0 (both paths step through it)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any()):
        bad = [i for i, sigma in enumerate(sigmas.tolist()) if not (math.isfinite(sigma) and sigma >= 0)]
        shown = ", ".join(f"sigma {i} is {sigmas[i].item():g}" for i in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"sigmas must be finite and >= 0: {shown}{more} (of {len(sigmas)})")
    return sigmas


def _draws_on(device: torch.device | None, sampler_name: str) -> bool:
    """Whether this sampler's step noise must come from a generator on `device` (not the CPU) to be ComfyUI's."""
    off_cpu = device is not None and torch.device(device).type != "cpu"
    spec = SPECS.get(sampler_name)
    return off_cpu and spec is not None and spec.noise == "generator" and sampler_name in KDIFFUSION


def _kdiff_plan(sampler_name: str, scheduler_name: str, sigmas: torch.Tensor, seed: int, sampling: ModelSampling,
                options: Mapping[str, Any] | None) -> SamplerPlan:
    """A plan run by Noodle's own step function: any finite sigma list, as ComfyUI's KSAMPLER takes."""
    require_known(scheduler_name, SCHEDULER_NAMES, "scheduler")
    entry = KDIFFUSION[sampler_name]
    sigmas = _checked_sigmas(sigmas)
    return SamplerPlan(sampler_name=sampler_name, scheduler_name=scheduler_name, sigmas=sigmas,
                       steps=max(len(sigmas) - 1, 0), scheduler=None, calls=(), generator=None, seed=seed,
                       sigma_max=sampling.sigma_max, mechanism="k-diffusion", kdiff=entry,
                       options=entry.options(options), sampling=sampling)


def _refusal(sampler_name: str, scheduler_name: str, reason: str, steps: int) -> str:
    working = ", ".join(supported_schedulers(sampler_name, steps)) or "none"
    return (f"sampler {sampler_name!r} with scheduler {scheduler_name!r} cannot match ComfyUI on diffusers "
            f"({reason}); schedulers that work with {sampler_name!r} at {steps} steps: {working}")


def supported_schedulers(sampler_name: str, steps: int = 20) -> list[str]:
    """The ComfyUI schedulers this sampler runs faithfully at `steps` (full denoise), in ComfyUI's order."""
    if uses_kdiffusion(sampler_name):  # Noodle's own steps take any sigmas
        require_known(sampler_name, SAMPLER_NAMES, "sampler")
        return [name for name in SCHEDULER_NAMES
                if _sigma_problem(sampler_name, name, steps, 1.0) is None]
    spec = spec_for(sampler_name)
    return [name for name in SCHEDULER_NAMES if _choice_problem(spec, sampler_name, name, steps, 1.0) is None]


def check_pair(sampler_name: str, scheduler_name: str, steps: int, denoise: float = 1.0) -> None:
    """Raise UnfaithfulSampler unless Noodle reproduces this KSampler choice; for validation before a run.

    Cheap, because a workflow may hold hundreds of samplers: building a diffusers scheduler takes 3-20 ms
    (KDPM2's most), and doing it for each of 900 KSamplers made a 214 KiB workflow take 2.5 s (euler) to
    14 s (dpm_2) to validate on an idle 2-core machine, 45 s on a busy one; now 0.2 s.
    ComfyUI's sigmas are computed (well under a millisecond) and checked for what the sampler needs; whether
    diffusers steps through a pair's sigmas is asked once per (sampler, scheduler) pair and remembered. The run
    builds its scheduler with `build_scheduler`, which checks the exact sigmas again, so nothing unfaithful
    runs unseen.
    """
    require_known(sampler_name, SAMPLER_NAMES, "sampler")
    require_known(scheduler_name, SCHEDULER_NAMES, "scheduler")
    if uses_kdiffusion(sampler_name):
        problem = _sigma_problem(sampler_name, scheduler_name, steps, denoise)
        if problem is not None:
            raise UnfaithfulSampler(_refusal(sampler_name, scheduler_name, problem, steps))
        return
    spec = spec_for(sampler_name)
    problem = _choice_problem(spec, sampler_name, scheduler_name, steps, denoise)
    if problem is not None:
        raise UnfaithfulSampler(_refusal(sampler_name, scheduler_name, problem, steps))


def _sigma_problem(sampler_name: str, scheduler_name: str, steps: int, denoise: float) -> str | None:
    """Why ComfyUI's sigmas for this choice cannot be computed (e.g. too long a schedule), or None."""
    try:
        ksampler_sigmas(scheduler_name, steps, denoise, model_sigmas(), sampler_name=sampler_name)
    except ValueError as err:
        return str(err)
    return None


def _count_problem(spec: SamplerSpec, steps: int) -> str | None:
    """What a sampler cannot do with this many steps (at least 1), known without building a scheduler."""
    if spec.cls is UniPCMultistepScheduler and steps < 2:  # uni_pc.py's order min(3, steps - 1) is 0
        return "ComfyUI's UniPC does not denoise in a single step"
    return None


def _choice_problem(spec: SamplerSpec, sampler_name: str, scheduler_name: str, steps: int,
                    denoise: float) -> str | None:
    """Why a KSampler choice cannot match ComfyUI, or None; the names are known ones."""
    try:
        sigmas = ksampler_sigmas(scheduler_name, steps, denoise, model_sigmas(), sampler_name=sampler_name)
    except ValueError as err:
        return str(err)
    count = len(sigmas) - 1
    return (_count_problem(spec, count) if count >= 1 else None) or _pair_problem(sampler_name, scheduler_name)


@functools.cache  # at most len(SUPPORTED_SAMPLERS) x len(SCHEDULER_NAMES) entries
def _pair_problem(sampler_name: str, scheduler_name: str) -> str | None:
    """Whether diffusers steps through a pair's sigmas, asked once at 20 full steps: how `_configure` hands a
    scheduler the sigmas depends on the pair, not the step count (test_every_pair_steps_through_comfys_sigmas_
    or_is_refused checks 1 to 20 steps and partial denoises, and finds only UniPC's single step refused)."""
    sigmas = ksampler_sigmas(scheduler_name, 20, 1.0, model_sigmas(), sampler_name=sampler_name)
    try:
        _plan(sampler_name, scheduler_name, sigmas, 0)
    except UnfaithfulSampler as err:
        return str(err)
    return None
