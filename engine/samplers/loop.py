"""The sampling loop: a `SamplerPlan` run over the model's CFG'd noise prediction as KSAMPLER.sample runs it.

ComfyUI's start noise and model input scaling (an EPS model's), the diffusers scheduler's steps with the
step noise each sampler draws (a seeded generator or a seeded Brownian tree), and a callback per ComfyUI
step. The math is ComfyUI 0.3.64's: k_diffusion/sampling.py and extra_samplers/uni_pc.py.

A latent with a noise mask (inpainting) is sampled as comfy/samplers.py KSamplerX0Inpaint does: at every model
call the kept area (mask 0) of the model's input is the original latent noised to the call's sigma, and the kept
area of the denoised estimate is the original latent, so each step moves only the masked area.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.schedulers import DPMSolverMultistepScheduler, DPMSolverSDEScheduler, LMSDiscreteScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

from engine.samplers.kdiffusion import Run
from engine.samplers.names import SPECS
from engine.samplers.plan import SamplerPlan

__all__ = ["EpsFn", "lands_on_denoised", "masked_eps", "noise_scaling", "resize_noise_mask", "sample",
           "scale_model_input"]

EpsFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (x_scaled, timestep, sigma) -> eps, with CFG
# An EpsFn may also carry `with_uncond(x_scaled, timestep, sigma) -> (eps, uncond eps)`: the guided prediction and
# the negative side's alone, always computed (cfg 1 included), for the cfg_pp samplers (ComfyUI's post_cfg_function
# with disable_cfg1_optimization). Without it the guided prediction stands for both.


def _brownian_noise(x: torch.Tensor, plan: SamplerPlan) -> Callable[[Any, Any], torch.Tensor]:
    """ComfyUI's SDE noise: a torchsde Brownian tree over the run's sigma range, seeded with the job seed. The tree
    lives on the CPU, as ComfyUI's BrownianTreeNoiseSampler(cpu=True) for these samplers; each draw moves to x."""
    positive = plan.sigmas[plan.sigmas > 0]
    tree = BrownianTreeNoiseSampler(x.cpu(), float(positive.min()), float(positive.max()), plan.seed)
    points = torch.cat([positive, torch.tensor([s for _, s in plan.calls])])

    # DPMSolverSDEScheduler asks at exp(-(-log sigma)), an ulp off, and the tree answers such near misses
    # differently (up to 2.5e-2 in the latent, measured): queries snap to the run's exact sigmas
    def snap(sigma: Any) -> float:
        nearest = float(points[(points - float(sigma)).abs().argmin()])
        return nearest if abs(nearest - float(sigma)) <= 1e-5 * nearest else float(sigma)

    return lambda sigma, sigma_next: tree(snap(sigma), snap(sigma_next)).to(x.device)


def noise_scaling(sigma: float, noise: torch.Tensor, latent: torch.Tensor, *, max_denoise: bool) -> torch.Tensor:
    """ComfyUI's EPS.noise_scaling: the start latent. A full denoise scales by sqrt(1 + sigma^2), not sigma."""
    return noise * (math.sqrt(1.0 + sigma**2) if max_denoise else sigma) + latent


def scale_model_input(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """ComfyUI's EPS.calculate_input: what the UNet sees of x at noise level sigma."""
    return x / math.sqrt(sigma**2 + 1.0)


def resize_noise_mask(mask: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A LATENT's noise mask fitted to latents of `shape` [B, C, h, w], as comfy/utils.py reshape_mask does:
    bilinear to the latent's size (whatever size the mask had), repeated over the channels and the batch."""
    batch, channels, height, width = shape
    mask = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    mask = F.interpolate(mask, size=(height, width), mode="bilinear").repeat(1, channels, 1, 1)
    if mask.shape[0] < batch:  # comfy.utils.repeat_to_batch_size: repeat whole, then cut
        mask = mask.repeat(math.ceil(batch / mask.shape[0]), 1, 1, 1)
    return mask[:batch]


def masked_eps(eps_fn: EpsFn, latent: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
               mask_function: Callable[[float, torch.Tensor], torch.Tensor] | None = None) -> EpsFn:
    """`eps_fn` seen through KSamplerX0Inpaint: only the area where `mask` is 1 is denoised.

    `mask_function(sigma, mask)` is a MODEL's denoise_mask_function (DifferentialDiffusion's): the mask each
    call uses, computed from the whole mask at that call's sigma, as KSamplerX0Inpaint calls it.

    With x the sampler's latent at sigma (k-diffusion's, not divided by sqrt(sigma^2 + 1)), L the original latent,
    N the run's noise and A = L + N*sigma, ComfyUI calls the model on x_in = x*m + A*(1 - m) and hands the
    sampler D = (x_in - sigma*eps)*m + L*(1 - m) as the denoised estimate. A diffusers scheduler takes a noise
    prediction instead and forms x - sigma*eps' from the x it holds, so the prediction returned is
    eps' = (x - D)/sigma, written as eps*m + (1 - m)*(x*(1 + m) - A*m - L)/sigma: the model's own eps where m
    is 1 and (x - L)/sigma where m is 0, with no rounding added in either.
    """
    def mask_at(sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask if mask_function is None else mask_function(sigma, mask)
        return m, 1.0 - m

    def blend(scaled: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        mask, keep = mask_at(sigma)
        scale = math.sqrt(sigma**2 + 1.0)
        kept = latent + noise * sigma  # EPS.noise_scaling of the original latent at this sigma
        return scaled * mask + (kept / scale) * keep, kept

    def masked(predicted: torch.Tensor, scaled: torch.Tensor, kept: torch.Tensor, sigma: float) -> torch.Tensor:
        mask, keep = mask_at(sigma)
        x = scaled * math.sqrt(sigma**2 + 1.0)  # every scheduler hands the model x / sqrt(sigma^2 + 1)
        return predicted * mask + keep * (x * (1.0 + mask) - kept * mask - latent) / sigma

    def eps(scaled: torch.Tensor, timestep: torch.Tensor, sigma: float) -> torch.Tensor:
        x_in, kept = blend(scaled, sigma)
        return masked(eps_fn(x_in, timestep, sigma), scaled, kept, sigma)

    both = getattr(eps_fn, "with_uncond", None)
    if both is not None:
        def with_uncond(scaled: torch.Tensor, timestep: torch.Tensor, sigma: float) -> tuple[torch.Tensor, ...]:
            # the uncond estimate is ComfyUI's post-CFG one: of the blended input, not masked afterwards
            x_in, kept = blend(scaled, sigma)
            guided, uncond = both(x_in, timestep, sigma)
            x = scaled * math.sqrt(sigma**2 + 1.0)
            return masked(guided, scaled, kept, sigma), uncond + (x - x_in * math.sqrt(sigma**2 + 1.0)) / sigma
        eps.with_uncond = with_uncond  # type: ignore[attr-defined]
    return eps


def sample(plan: SamplerPlan, eps_fn: EpsFn, latent: torch.Tensor, noise: torch.Tensor, *,
           callback: Callable[[int, int, torch.Tensor], None] | None = None,
           denoise_mask: torch.Tensor | None = None, device: torch.device | None = None,
           preview: Callable[[int, torch.Tensor], None] | None = None,
           denoise_mask_function: Callable[[float, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
           ) -> torch.Tensor:
    """Run the plan as KSAMPLER.sample does. callback(step_index, total_steps, x) follows each ComfyUI step.

    The latent and the noise (drawn on the CPU, as ComfyUI draws them) move to `device` once, and the whole run
    stays there: every step's math is on the device and the loop never waits for it (no `.item()`, no copy
    between host and device; tests/engine/samplers/test_host_syncs.py holds it to that), so a GPU queues the next
    UNet call while the last one runs. The sigmas stay on the host: a step reads them as Python numbers or CPU
    scalars, as diffusers' schedulers keep theirs. The result comes back on `device`. Only the SDE samplers'
    Brownian tree lives on the CPU (ComfyUI's cpu=True), so their step noise crosses once a step, as in ComfyUI.

    `denoise_mask` (a LATENT's noise mask, any size) limits the change to where it is 1: see `masked_eps`.
    `device` is the model's (where ComfyUI draws the k-diffusion samplers' step noise); `preview(step_index,
    denoised)` gets each step's denoised estimate, as k-diffusion's callback hands it out (with a noise mask, the
    original latent where the mask is 0: KSamplerX0Inpaint's blend), on either path.
    `denoise_mask_function(sigma, mask, sigmas)` (DifferentialDiffusion's) turns the mask per model call; it is
    handed the run's sigmas, as KSamplerX0Inpaint's extra_options["sigmas"].
    """
    scheduler, sigmas = plan.scheduler, plan.sigmas
    if not plan.runs:
        return latent  # CFGGuider.sample: no sigmas, the latent comes back untouched
    if scheduler is not None and scheduler.step_index is not None:
        raise ValueError("this SamplerPlan has already run; build a new one for each run")
    n, s0 = plan.steps, float(sigmas[0])
    device = device or latent.device
    latent, noise = latent.to(device), noise.to(device)
    if denoise_mask is not None:
        mask = resize_noise_mask(denoise_mask, latent.shape).to(latent.device, latent.dtype)
        per_call = None if denoise_mask_function is None else (
            lambda sigma, whole: denoise_mask_function(sigma, whole, plan.sigmas))
        eps_fn = masked_eps(eps_fn, latent, _inpaint_noise(plan, noise), mask, per_call)
    max_denoise = math.isclose(plan.sigma_max, s0, rel_tol=1e-5) or s0 > plan.sigma_max  # Sampler.max_denoise
    x = noise_scaling(s0, noise, latent, max_denoise=max_denoise)
    if plan.kdiff is not None:
        return _sample_kdiff(plan, eps_fn, x, callback, device, preview)
    spec = SPECS[plan.sampler_name]
    to_ve = lambda x, i: x * math.sqrt(float(scheduler.sigmas[i]) ** 2 + 1) if spec.vp else x  # noqa: E731
    if spec.vp:
        x = scale_model_input(x, s0)
    brownian = _brownian_noise(x, plan) if spec.noise == "brownian" else None
    if isinstance(scheduler, DPMSolverSDEScheduler):
        scheduler.noise_sampler = brownian  # in place of the unseeded one its step() would build
    done = 0
    for k, (timestep, sigma) in enumerate(plan.calls):
        t = scheduler.timesteps[k]
        starts_step = getattr(scheduler, "state_in_first_order", True)  # read before step() moves it on
        # VE schedulers divide by sqrt(sigma^2 + 1) here; VP ones already hold that quotient
        scaled = scheduler.scale_model_input(x, t)
        eps = eps_fn(scaled, torch.tensor(float(timestep)), sigma)
        if preview is not None and starts_step:  # k-diffusion calls back with each step's first call's estimate
            preview(done, scaled.float() * math.sqrt(sigma**2 + 1.0) - sigma * eps.float())
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


def _sample_kdiff(plan: SamplerPlan, eps_fn: EpsFn, x: torch.Tensor,
                  callback: Callable[[int, int, torch.Tensor], None] | None, device: torch.device,
                  preview: Callable[[int, torch.Tensor], None] | None) -> torch.Tensor:
    """Run Noodle's own k-diffusion step function: k-diffusion's model(x, sigma) is the denoised estimate
    x - sigma * eps of the guided prediction at x / sqrt(sigma^2 + 1) (an EPS model's calculate_input)."""
    assert plan.kdiff is not None
    both = getattr(eps_fn, "with_uncond", None) if plan.kdiff.wants_uncond else None

    def report(i: int, x_now: torch.Tensor, denoised: torch.Tensor) -> None:
        if preview is not None:
            preview(i, denoised)
        if callback is not None:
            callback(i, plan.steps, x_now)

    run = Run(plan.seed, device, plan.sampling, report)

    def model(x_now: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma)
        scaled = x_now / math.sqrt(s * s + 1.0)
        timestep = plan.sampling.timestep(s)
        if plan.kdiff.wants_uncond:
            eps, uncond = both(scaled, timestep, s) if both is not None else (eps_fn(scaled, timestep, s),) * 2
            run.uncond_denoised = x_now - s * uncond.to(x_now.dtype)
        else:
            eps = eps_fn(scaled, timestep, s)
        return x_now - s * eps.to(x_now.dtype)

    # the sigmas stay on the CPU: on the device, each float(sigma) and `if sigma_next > 0` would wait for the GPU
    return plan.kdiff.fn(model, x, plan.sigmas.cpu(), run, **plan.options)


def lands_on_denoised(plan: SamplerPlan) -> bool:
    """Whether the run's last step goes into sigma 0, so that it ends on the denoised estimate: with a noise
    mask, the original latent where the mask is 0 (up to float rounding). Not when it stops above 0
    (KSamplerAdvanced's leftover noise, UniPC's 0.001): the kept area then still carries its noise."""
    return plan.runs and float(plan.effective_sigmas[-1]) == 0.0


def _inpaint_noise(plan: SamplerPlan, noise: torch.Tensor) -> torch.Tensor:
    """The noise the kept area is noised with: the run's own, or for "ddim" (ComfyUI's euler with
    inpaint_options random) a fresh draw from seed + 1."""
    if plan.sampler_name != "ddim":
        return noise
    if plan.seed + 1 > 2**64 - 1:
        raise ValueError(f"the ddim sampler draws its inpainting noise from seed + 1, and seed {plan.seed} is the "
                         "largest there is (ComfyUI fails here too); use a smaller seed")
    generator = torch.Generator("cpu").manual_seed(plan.seed + 1)
    return torch.randn(noise.shape, generator=generator, device="cpu").to(noise.device, noise.dtype)
