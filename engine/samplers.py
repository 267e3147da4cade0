"""ComfyUI sampler and scheduler names on diffusers schedulers, with ComfyUI's own sigma schedules.

The KSampler nodes get ComfyUI's exact sigmas (`ksampler_sigmas`, `advanced_sigmas`), a diffusers scheduler
stepping through them (`build_scheduler`, or `UnfaithfulSampler`) and the loop around their CFG + UNet
(`sample`). The math is ComfyUI 0.3.64's: comfy/samplers.py, model_sampling.py, k_diffusion/sampling.py and
extra_samplers/uni_pc.py.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import scipy.stats
import torch
from diffusers.schedulers import (DPMSolverMultistepScheduler, DPMSolverSDEScheduler,
                                  EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                                  KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LMSDiscreteScheduler,
                                  UniPCMultistepScheduler)
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

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
class _Spec:
    """How one ComfyUI sampler runs on diffusers."""

    cls: type[SchedulerMixin]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    two_calls: bool = False  # 2nd order: two model calls a step, one for the step into sigma 0
    vp: bool = False  # steps x/sqrt(sigma^2+1) (DPM-Solver, UniPC) where ComfyUI steps x
    noise: str = ""  # step noise: "generator" (a seeded torch.Generator) or "brownian" (a seeded Brownian tree)


_DPMPP = MappingProxyType({"solver_order": 2, "final_sigmas_type": "zero"})
_SPECS: Mapping[str, _Spec] = MappingProxyType({
    "euler": _Spec(EulerDiscreteScheduler),
    "euler_ancestral": _Spec(EulerAncestralDiscreteScheduler, noise="generator"),
    "heun": _Spec(HeunDiscreteScheduler, two_calls=True),
    "dpm_2": _Spec(KDPM2DiscreteScheduler, two_calls=True),
    "dpm_2_ancestral": _Spec(KDPM2AncestralDiscreteScheduler, two_calls=True, noise="generator"),
    "lms": _Spec(LMSDiscreteScheduler),
    "dpmpp_sde": _Spec(DPMSolverSDEScheduler, two_calls=True, noise="brownian"),
    "dpmpp_2m": _Spec(DPMSolverMultistepScheduler, {**_DPMPP, "algorithm_type": "dpmsolver++"}, vp=True),
    "dpmpp_2m_sde": _Spec(DPMSolverMultistepScheduler, {**_DPMPP, "algorithm_type": "sde-dpmsolver++"},
                          vp=True, noise="brownian"),
    # ComfyUI's "ddim" is sampler_object("euler"); its random inpaint noise only matters with a mask.
    "ddim": _Spec(EulerDiscreteScheduler),
    "uni_pc": _Spec(UniPCMultistepScheduler, {"solver_type": "bh1"}, vp=True),
    "uni_pc_bh2": _Spec(UniPCMultistepScheduler, {"solver_type": "bh2"}, vp=True),
})
SUPPORTED_SAMPLERS: tuple[str, ...] = tuple(name for name in SAMPLER_NAMES if name in _SPECS)
# No step noise: each latent of a batch gets exactly its solo result, so the queue may batch jobs that use these.
DETERMINISTIC_SAMPLERS = frozenset(name for name, spec in _SPECS.items() if not spec.noise)

# KSampler's steps maximum, and so the longest schedule computed for a denoise below 1 (`schedule_problem`).
MAX_SCHEDULE_STEPS = 10_000
# KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS compute steps+1 sigmas and drop the second last one.
_DISCARD_PENULTIMATE = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})
# SD1.x/SDXL training betas; "linspace" because the checkpoint's own "leading" spacing gives another
# picture (COMFY_FACTS: 19.5 dB). The spacing only matters before our sigmas replace diffusers' own.
_SD_CONFIG: Mapping[str, Any] = MappingProxyType({"num_train_timesteps": 1000, "beta_start": 0.00085,
                                                  "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                                  "prediction_type": "epsilon", "timestep_spacing": "linspace"})

EpsFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (x_scaled, timestep, sigma) -> eps, with CFG


def model_sigmas(beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000) -> torch.Tensor:
    """SD's training sigmas in float64, as ModelSamplingDiscrete has them before its float32 copies (bit-exact)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def timestep_for_sigma(sigma: float | torch.Tensor, model_sigmas: torch.Tensor) -> torch.Tensor:
    """The training timestep nearest in log-sigma, as a float: what ComfyUI feeds the UNet for sigma."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    dists = sigma.log().reshape(-1) - model_sigmas.log().float()[:, None]
    return dists.abs().argmin(dim=0).view(sigma.shape).float()


def _known(name: str, names: tuple[str, ...], kind: str) -> None:
    if name not in names:
        raise ValueError(f"unknown {kind} {name!r}; ComfyUI's {kind}s: {', '.join(names)}")


def comfy_sigmas(scheduler: str, steps: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """ComfyUI's float32 sigmas for a scheduler, ending in 0: steps+1 (ddim_uniform: maybe more, beta: fewer)."""
    _known(scheduler, SCHEDULER_NAMES, "scheduler")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    ms, n = model_sigmas.float(), len(model_sigmas)
    sigma_min, sigma_max = float(ms[0]), float(ms[-1])
    if scheduler in ("normal", "sgm_uniform"):  # evenly spaced timesteps; sgm leaves out the last one
        start, end = float(timestep_for_sigma(ms[-1], ms)), float(timestep_for_sigma(ms[0], ms))
        ts = torch.linspace(start, end, steps + 1)[:-1] if scheduler == "sgm_uniform" else torch.linspace(
            start, end, steps)
        log_sigmas, w = model_sigmas.log().float(), ts.frac()  # ModelSamplingDiscrete.sigma: log-linear
        head = ((1 - w) * log_sigmas[ts.floor().long()] + w * log_sigmas[ts.ceil().long()]).exp()
    elif scheduler == "simple":
        head = torch.stack([ms[-(1 + int(x * (n / steps)))] for x in range(steps)])
    elif scheduler == "karras":  # get_sigmas_karras, rho 7
        ramp = torch.linspace(0, 1, steps)
        head = (sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
    elif scheduler == "exponential":
        head = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp()
    elif scheduler == "ddim_uniform":  # every (n // steps)-th training sigma from index 1 up
        head = ms[1::max(n // steps, 1)].flip(0)
    elif scheduler == "beta":  # arXiv 2407.12173, alpha = beta = 0.6; a repeated timestep is dropped
        ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * (n - 1))
        head = torch.stack([ms[int(t)] for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]])
    elif scheduler == "linear_quadratic" and steps == 1:
        head = ms[-1:]
    elif scheduler == "linear_quadratic":  # from Mochi: linear down to 0.025 over steps // 2, then a parabola
        linear, quadratic, threshold = steps // 2, steps - steps // 2, 0.025
        diff = linear - threshold * steps
        quad_coef = diff / (linear * quadratic**2)
        lin_coef, const = threshold / linear - 2 * diff / (quadratic**2), quad_coef * (linear**2)
        fractions = [i * threshold / linear for i in range(linear)]
        fractions += [quad_coef * (i**2) + lin_coef * i + const for i in range(linear, steps)]
        head = torch.tensor([1.0 - x for x in fractions], dtype=torch.float32) * ms[-1]
    else:  # kl_optimal
        if steps == 1:
            raise ValueError("kl_optimal needs at least 2 steps: ComfyUI divides by steps - 1 and gets NaN")
        w = torch.arange(steps, dtype=torch.float32) / (steps - 1)
        head = (w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)).tan()
    return torch.cat([head.float(), torch.zeros(1)])


def _sampler_sigmas(sampler_name: str, scheduler: str, steps: int, ms: torch.Tensor) -> torch.Tensor:
    """KSampler.calculate_sigmas: dpm_2(_ancestral) and uni_pc(_bh2) compute steps+1 and drop the penultimate."""
    if sampler_name not in _DISCARD_PENULTIMATE:
        return comfy_sigmas(scheduler, steps, ms)
    sigmas = comfy_sigmas(scheduler, steps + 1, ms)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def schedule_problem(steps: int, denoise: float) -> str | None:
    """Why KSampler's schedule for `steps` at `denoise` is too long to compute, or None.

    With denoise < 1 ComfyUI computes steps / denoise sigmas and runs the last `steps`: denoise 0.0001 at 150
    steps made 1.5 million ("simple" took 4.3 s for them, at validation and again at the run), and a smaller
    denoise is unbounded. ComfyUI's own steps maximum bounds the whole schedule here.
    """
    if denoise > 0.9999 or denoise <= 0.0 or steps / denoise <= MAX_SCHEDULE_STEPS:
        return None
    return (f"denoise {denoise:g} with {steps} steps needs a schedule of {steps / denoise:,.0f} steps (steps / "
            f"denoise, of which the last {steps} run); at most {MAX_SCHEDULE_STEPS:,}: use a denoise of at least "
            f"{math.ceil(steps / MAX_SCHEDULE_STEPS * 1e4) / 1e4:g}, or fewer steps")


def ksampler_sigmas(scheduler: str, steps: int, denoise: float, model_sigmas: torch.Tensor, *,
                    sampler_name: str) -> torch.Tensor:
    """KSampler's sigmas: with denoise < 1 the tail of a longer schedule; empty (latent as is) if denoise <= 0."""
    if denoise > 0.9999:
        return _sampler_sigmas(sampler_name, scheduler, steps, model_sigmas)
    if denoise <= 0.0:
        return torch.zeros(0)
    problem = schedule_problem(steps, denoise)
    if problem is not None:
        raise ValueError(problem)
    return _sampler_sigmas(sampler_name, scheduler, int(steps / denoise), model_sigmas)[-(steps + 1):]


def advanced_sigmas(scheduler: str, steps: int, start_at_step: int, end_at_step: int, force_full_denoise: bool,
                    model_sigmas: torch.Tensor, *, sampler_name: str) -> torch.Tensor:
    """KSamplerAdvanced's sigmas (force_full_denoise: leftover noise "disable"); empty: the latent comes back."""
    sigmas = _sampler_sigmas(sampler_name, scheduler, steps, model_sigmas)
    if end_at_step < len(sigmas) - 1:
        sigmas = sigmas[: end_at_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_at_step >= len(sigmas) - 1:
        return torch.zeros(0)
    return sigmas[start_at_step:]


@dataclass(frozen=True, eq=False)
class SamplerPlan:
    """A diffusers scheduler set up to step through one ComfyUI sigma list. Single use: it holds state."""

    sampler_name: str
    scheduler_name: str
    sigmas: torch.Tensor  # ComfyUI's sigmas; fewer than 2: nothing to sample
    steps: int  # ComfyUI's total_steps, len(sigmas) - 1
    scheduler: SchedulerMixin | None
    calls: tuple[tuple[int, float], ...]  # (UNet timestep, sigma) of each model call, in order
    generator: torch.Generator | None  # step noise of the ancestral samplers, seeded with the job seed
    seed: int
    sigma_max: float  # the model's largest training sigma: decides ComfyUI's initial noise scale
    mechanism: str  # how diffusers got the sigmas: "sigmas=", "sigma array" or "sigma hook"

    @property
    def effective_sigmas(self) -> torch.Tensor:
        """The sigmas the diffusers scheduler's steps go between."""
        return self.sigmas if self.scheduler is None else _boundaries(self.scheduler)[: self.steps + 1]


def _spec(sampler_name: str) -> _Spec:
    _known(sampler_name, SAMPLER_NAMES, "sampler")
    if sampler_name not in _SPECS:
        raise UnfaithfulSampler(f"sampler {sampler_name!r} has no faithful diffusers equivalent in Noodle; "
                                f"use one of: {', '.join(SUPPORTED_SAMPLERS)}")
    return _SPECS[sampler_name]


@functools.cache
def _pristine(cls: type[SchedulerMixin], kwargs: tuple[tuple[str, Any], ...]) -> SchedulerMixin:
    """One scheduler per configuration, handed out as copies: KDPM2's constructor alone takes 0.2 s."""
    return cls(**_SD_CONFIG, **dict(kwargs))


def _configure(spec: _Spec, target: torch.Tensor) -> tuple[str, SchedulerMixin]:
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


def _plan(sampler_name: str, scheduler_name: str, sigmas: torch.Tensor, seed: int) -> SamplerPlan:
    """build_scheduler, refusing without the list of alternatives."""
    spec, ms = _spec(sampler_name), model_sigmas()
    _known(scheduler_name, SCHEDULER_NAMES, "scheduler")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any()):
        raise ValueError(f"sigmas must be finite and >= 0, got {sigmas.tolist()}")
    n = len(sigmas) - 1
    plan = dict(sampler_name=sampler_name, scheduler_name=scheduler_name, sigmas=sigmas, steps=max(n, 0), seed=seed,
                sigma_max=float(ms.float()[-1]))
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
    calls = tuple(zip(timestep_for_sigma(torch.tensor(call_sigmas), ms).int().tolist(), call_sigmas))
    generator = torch.Generator("cpu").manual_seed(seed) if spec.noise == "generator" else None
    return SamplerPlan(**plan, scheduler=scheduler, calls=calls, generator=generator, mechanism=mechanism)


def build_scheduler(sampler_name: str, scheduler_name: str, sigmas: torch.Tensor, seed: int) -> SamplerPlan:
    """A diffusers scheduler (SD1.5 betas) stepping through `sigmas`; UnfaithfulSampler if it cannot."""
    _spec(sampler_name)
    try:
        return _plan(sampler_name, scheduler_name, sigmas, seed)
    except UnfaithfulSampler as err:
        raise UnfaithfulSampler(_refusal(sampler_name, scheduler_name, str(err), max(len(sigmas) - 1, 1))) from None


def _refusal(sampler_name: str, scheduler_name: str, reason: str, steps: int) -> str:
    working = ", ".join(supported_schedulers(sampler_name, steps)) or "none"
    return (f"sampler {sampler_name!r} with scheduler {scheduler_name!r} cannot match ComfyUI on diffusers "
            f"({reason}); schedulers that work with {sampler_name!r} at {steps} steps: {working}")


def supported_schedulers(sampler_name: str, steps: int = 20) -> list[str]:
    """The ComfyUI schedulers this sampler runs faithfully at `steps` (full denoise), in ComfyUI's order."""
    spec = _spec(sampler_name)
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
    spec = _spec(sampler_name)
    _known(scheduler_name, SCHEDULER_NAMES, "scheduler")
    problem = _choice_problem(spec, sampler_name, scheduler_name, steps, denoise)
    if problem is not None:
        raise UnfaithfulSampler(_refusal(sampler_name, scheduler_name, problem, steps))


def _count_problem(spec: _Spec, steps: int) -> str | None:
    """What a sampler cannot do with this many steps (at least 1), known without building a scheduler."""
    if spec.cls is UniPCMultistepScheduler and steps < 2:  # uni_pc.py's order min(3, steps - 1) is 0
        return "ComfyUI's UniPC does not denoise in a single step"
    return None


def _choice_problem(spec: _Spec, sampler_name: str, scheduler_name: str, steps: int, denoise: float) -> str | None:
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


def _brownian_noise(x: torch.Tensor, plan: SamplerPlan) -> Callable[[Any, Any], torch.Tensor]:
    """ComfyUI's SDE noise: a torchsde Brownian tree over the run's sigma range, seeded with the job seed."""
    positive = plan.sigmas[plan.sigmas > 0]
    tree = BrownianTreeNoiseSampler(x, float(positive.min()), float(positive.max()), plan.seed)
    points = torch.cat([positive, torch.tensor([s for _, s in plan.calls])])

    # DPMSolverSDEScheduler asks at exp(-(-log sigma)), an ulp off, and the tree answers such near misses
    # differently (up to 2.5e-2 in the latent, measured): queries snap to the run's exact sigmas
    def snap(sigma: Any) -> float:
        nearest = float(points[(points - float(sigma)).abs().argmin()])
        return nearest if abs(nearest - float(sigma)) <= 1e-5 * nearest else float(sigma)

    return lambda sigma, sigma_next: tree(snap(sigma), snap(sigma_next))


def noise_scaling(sigma: float, noise: torch.Tensor, latent: torch.Tensor, *, max_denoise: bool) -> torch.Tensor:
    """ComfyUI's EPS.noise_scaling: the start latent. A full denoise scales by sqrt(1 + sigma^2), not sigma."""
    return noise * (math.sqrt(1.0 + sigma**2) if max_denoise else sigma) + latent


def scale_model_input(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """ComfyUI's EPS.calculate_input: what the UNet sees of x at noise level sigma."""
    return x / math.sqrt(sigma**2 + 1.0)


def sample(plan: SamplerPlan, eps_fn: EpsFn, latent: torch.Tensor, noise: torch.Tensor, *,
           callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the plan as KSAMPLER.sample does. callback(step_index, total_steps, x) follows each ComfyUI step."""
    scheduler, sigmas = plan.scheduler, plan.sigmas
    if scheduler is None:
        return latent  # CFGGuider.sample: no sigmas, the latent comes back untouched
    if scheduler.step_index is not None:
        raise ValueError("this SamplerPlan has already run; build a new one for each run")
    spec, n, s0 = _SPECS[plan.sampler_name], plan.steps, float(sigmas[0])
    max_denoise = math.isclose(plan.sigma_max, s0, rel_tol=1e-5) or s0 > plan.sigma_max  # Sampler.max_denoise
    x = noise_scaling(s0, noise, latent, max_denoise=max_denoise)
    to_ve = lambda x, i: x * math.sqrt(float(scheduler.sigmas[i]) ** 2 + 1) if spec.vp else x  # noqa: E731
    if spec.vp:
        x = scale_model_input(x, s0)
    brownian = _brownian_noise(x, plan) if spec.noise == "brownian" else None
    if isinstance(scheduler, DPMSolverSDEScheduler):
        scheduler.noise_sampler = brownian  # in place of the unseeded one its step() would build
    done = 0
    for k, (timestep, sigma) in enumerate(plan.calls):
        t = scheduler.timesteps[k]
        # VE schedulers divide by sqrt(sigma^2 + 1) here; VP ones already hold that quotient
        eps = eps_fn(scheduler.scale_model_input(x, t), torch.tensor(float(timestep)), sigma)
        if isinstance(scheduler, LMSDiscreteScheduler) and done == n - 1 and sigmas[n] == 0:
            x = x - sigma * eps  # sample_lms: the step into sigma 0 returns the denoised estimate
        else:
            extra: dict[str, Any] = {"generator": plan.generator} if plan.generator is not None else {}
            if isinstance(scheduler, DPMSolverMultistepScheduler) and brownian is not None:
                extra["variance_noise"] = (brownian(sigmas[done], sigmas[done + 1]) if sigmas[done + 1] > 0
                                           else torch.zeros_like(x))
            x = scheduler.step(eps, t, x, **extra).prev_sample
        # a 2nd-order step ends with its 2nd call; the last step into 0 has only one
        if getattr(scheduler, "state_in_first_order", True) or k == len(plan.calls) - 1:
            done += 1
            if callback is not None:
                callback(done - 1, n, to_ve(x, done))
    return to_ve(x, n)
