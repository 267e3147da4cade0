"""ComfyUI's sigma schedules: SD's training sigmas, the nine schedulers, and the KSampler nodes' cuts of them.

`ksampler_sigmas` (denoise) and `advanced_sigmas` (start and end steps) give a node's exact float32
sigmas, as ComfyUI 0.3.64 computes them in comfy/samplers.py and model_sampling.py.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
import torch

from engine.samplers.model_sampling import ModelSampling, discrete_sigmas
from engine.samplers.names import SCHEDULER_NAMES, require_known

__all__ = ["MAX_SCHEDULE_STEPS", "SigmaTable", "advanced_sigmas", "comfy_sigmas", "ksampler_sigmas", "model_sigmas",
           "schedule_problem", "timestep_for_sigma"]

# KSampler's steps maximum, and so the longest schedule computed for a denoise below 1 (`schedule_problem`).
MAX_SCHEDULE_STEPS = 10_000
# KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS compute steps+1 sigmas and drop the second last one.
_DISCARD_PENULTIMATE = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def model_sigmas(beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000) -> torch.Tensor:
    """SD's training sigmas in float64, as ModelSamplingDiscrete has them before its float32 copies (bit-exact)."""
    return discrete_sigmas(beta_start, beta_end, num_train_timesteps)


# A schedule is computed from a model's sigma table: SD's training sigmas as a tensor, or a MODEL's ModelSampling
# (zsnr changes the table, an LCM model has 50 entries a timestep apart of 20).
SigmaTable = torch.Tensor | ModelSampling


def _table(model_sigmas: SigmaTable) -> tuple[torch.Tensor, int]:
    if isinstance(model_sigmas, ModelSampling):
        return model_sigmas.table, model_sigmas.skip_steps
    return model_sigmas, 1


def timestep_for_sigma(sigma: float | torch.Tensor, model_sigmas: torch.Tensor) -> torch.Tensor:
    """The training timestep nearest in log-sigma, as a float: what ComfyUI feeds the UNet for sigma."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    dists = sigma.log().reshape(-1) - model_sigmas.log().float()[:, None]
    return dists.abs().argmin(dim=0).view(sigma.shape).float()


def comfy_sigmas(scheduler: str, steps: int, model_sigmas: SigmaTable) -> torch.Tensor:
    """ComfyUI's float32 sigmas for a scheduler, ending in 0: steps+1 (ddim_uniform: maybe more, beta: fewer)."""
    require_known(scheduler, SCHEDULER_NAMES, "scheduler")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if scheduler in ("normal", "sgm_uniform") and getattr(model_sigmas, "continuous", False):
        return _continuous_normal(model_sigmas, steps, sgm=scheduler == "sgm_uniform")
    model_sigmas, skip = _table(model_sigmas)
    ms, n = model_sigmas.float(), len(model_sigmas)
    sigma_min, sigma_max = float(ms[0]), float(ms[-1])
    if scheduler in ("normal", "sgm_uniform"):  # evenly spaced timesteps; sgm leaves out the last one
        # ModelSampling.timestep of sigma_max and sigma_min: table index * skip + skip - 1 (an LCM model's 999, 19)
        start, end = (float(timestep_for_sigma(s, ms)) * skip + skip - 1 for s in (ms[-1], ms[0]))
        ts = torch.linspace(start, end, steps + 1)[:-1] if scheduler == "sgm_uniform" else torch.linspace(
            start, end, steps)
        if skip > 1:  # ModelSamplingDiscreteDistilled.sigma: back to table indices
            ts = ((ts - (skip - 1)) / skip).clamp(0, n - 1)
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


def _continuous_normal(sampling: ModelSampling, steps: int, *, sgm: bool) -> torch.Tensor:
    """normal_scheduler on a continuous model (ContinuousEDM): timesteps evenly spaced between those of its
    sigma_max and sigma_min, each turned back into a sigma by the model's own map, then 0."""
    start, end = sampling.timestep(sampling.sigma_max), sampling.timestep(sampling.sigma_min)
    ts = torch.linspace(start, end, steps + 1)[:-1] if sgm else torch.linspace(start, end, steps)
    if not sgm and math.isclose(float(sampling.sigma_at(end)), 0, abs_tol=0.00001):  # never for sigma_min > 1e-5
        ts = torch.linspace(start, end, steps + 1)
        return torch.tensor([float(sampling.sigma_at(t)) for t in ts], dtype=torch.float32)
    return torch.tensor([float(sampling.sigma_at(t)) for t in ts] + [0.0], dtype=torch.float32)


def _sampler_sigmas(sampler_name: str, scheduler: str, steps: int, ms: SigmaTable) -> torch.Tensor:
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


def ksampler_sigmas(scheduler: str, steps: int, denoise: float, model_sigmas: SigmaTable, *,
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
                    model_sigmas: SigmaTable, *, sampler_name: str) -> torch.Tensor:
    """KSamplerAdvanced's sigmas (force_full_denoise: leftover noise "disable"); empty: the latent comes back."""
    sigmas = _sampler_sigmas(sampler_name, scheduler, steps, model_sigmas)
    if end_at_step < len(sigmas) - 1:
        sigmas = sigmas[: end_at_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_at_step >= len(sigmas) - 1:
        return torch.zeros(0)
    return sigmas[start_at_step:]
