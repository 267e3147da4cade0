"""What a k-diffusion sampler function is handed, and the registry of them.

ComfyUI 0.3.64 runs most samplers as functions of comfy/k_diffusion/sampling.py: `sample_x(model, x, sigmas,
extra_args, callback, ...)`, where `model(x, sigma)` returns the denoised estimate. Diffusers has no scheduler for
many of them (ipndm, deis, res_multistep, er_sde, seeds, sa_solver, the cfg_pp variants, ...), and none of them
with a Sampler* node's options (eta, s_noise, solver_type), so Noodle writes each step itself, one small module per
family in this package, against this contract:

    fn(model: Denoiser, x: Tensor, sigmas: Tensor, run: Run, **options) -> Tensor

`x` is the start latent (already noise-scaled), `sigmas` ComfyUI's list, `options` the sampler's own (ComfyUI's
keyword defaults unless a Sampler* node set them). `run` stands in for extra_args and the callback: the seed, the
noise samplers (drawn where ComfyUI draws them), the model's sampling, the last call's uncond estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import torch
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

from engine.samplers.model_sampling import DEFAULT_SAMPLING, ModelSampling

__all__ = ["KDIFFUSION", "Denoiser", "KDiffSampler", "NoiseSampler", "Run", "ancestral_step", "register", "to_d"]

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sigma, sigma_next) -> unit noise like x


class Denoiser(Protocol):
    """k-diffusion's model: the denoised estimate of x at sigma (a 0-d tensor), CFG and patches applied."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Run:
    """One sampling run's extra_args and callback, as a sampler function sees them.

    `device` is where the model runs: ComfyUI's samplers hold x there, so its default noise sampler's generator
    and a `_gpu` sampler's Brownian tree live there. Noodle holds x there too (engine/samplers/loop.py), and
    `sigmas` on the host, so that reading a sigma never waits for the device.
    `uncond_denoised` is set by the guidance at each model call when `wants_uncond` (the cfg_pp samplers read it,
    as ComfyUI's post_cfg_function hands it to them).
    """

    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sampling: ModelSampling = DEFAULT_SAMPLING
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None  # (i, x, denoised) per step
    uncond_denoised: torch.Tensor | None = None

    def report(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        """k-diffusion's callback({"i": i, "x": x, "denoised": denoised, ...})."""
        if self.callback is not None:
            self.callback(i, x, denoised)

    def default_noise(self, x: torch.Tensor) -> NoiseSampler:
        """default_noise_sampler(x, seed): a generator seeded once on the model's device, a fresh draw per call.
        The generator is made at the first draw (the same numbers): a sampler that never draws needs none."""
        generators: list[torch.Generator] = []

        def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
            if not generators:
                generators.append(torch.Generator(device=self.device).manual_seed(self.seed))
            return torch.randn(x.shape, dtype=x.dtype, device=self.device, generator=generators[0]).to(x.device)
        return draw

    def brownian(self, x: torch.Tensor, sigmas: torch.Tensor, *, cpu: bool = True) -> NoiseSampler:
        """BrownianTreeNoiseSampler(x, min positive sigma, max sigma, seed, cpu=cpu): the SDE samplers' noise, a
        torchsde Brownian tree on the CPU, or on the model's device for the `_gpu` variants and noise_device gpu."""
        positive = sigmas[sigmas > 0]
        where = torch.device("cpu") if cpu else self.device
        tree = BrownianTreeNoiseSampler(x.to(where), float(positive.min()), float(sigmas.max()), self.seed)

        def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
            return tree(float(sigma), float(sigma_next)).to(x.device, x.dtype)
        return draw

    def lambda_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma_to_half_log_snr: log(alpha / sigma), -log(sigma) for the discrete (VE) models Noodle runs."""
        return sigma.log().neg()

    def sigma_of(self, half_log_snr: torch.Tensor) -> torch.Tensor:
        """half_log_snr_to_sigma, the inverse of `lambda_of`."""
        return half_log_snr.neg().exp()


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The Karras ODE derivative (x - denoised) / sigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor,
                   eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | float]:
    """get_ancestral_step: the sigma to step down to and the noise to add back, for an ancestral step."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


SamplerFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class KDiffSampler:
    """One ComfyUI sampler name written here: its function, the options it takes with ComfyUI's defaults for this
    name, and what the queue and the guidance need to know of it."""

    name: str
    fn: SamplerFn
    defaults: Mapping[str, Any]
    stochastic: bool  # draws step noise (ancestral, SDE): a batch would not give each latent its solo result
    wants_uncond: bool = False  # cfg_pp: reads run.uncond_denoised, and cfg 1 still runs the uncond pass
    # its steps depend on the whole batch (dpm_adaptive's error norm picks one step size for all latents): no step
    # noise, yet a latent batched with others does not get its solo result
    couples_batch: bool = False

    def options(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults overlaid with `given`; an option this sampler does not take is refused by name."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise ValueError(f"sampler {self.name!r} takes no option {', '.join(map(repr, unknown))}; "
                             f"it takes: {', '.join(self.defaults) or 'none'}")
        return {**self.defaults, **given}

    def is_stochastic(self, options: Mapping[str, Any]) -> bool:
        """Whether these options draw step noise: eta 0 or s_noise 0 turn an ancestral/SDE sampler's noise off."""
        if not self.stochastic:
            return False
        return not any(options.get(key, 1.0) == 0 for key in ("eta", "s_noise"))


_REGISTRY: dict[str, KDiffSampler] = {}
KDIFFUSION: Mapping[str, KDiffSampler] = MappingProxyType(_REGISTRY)


def register(name: str, *, stochastic: bool, wants_uncond: bool = False, couples_batch: bool = False,
             **defaults: Any) -> Callable[[SamplerFn], SamplerFn]:
    """Register `fn` as ComfyUI's sampler `name` with its keyword defaults (the options a Sampler* node sets)."""
    def add(fn: SamplerFn) -> SamplerFn:
        if name in _REGISTRY:
            raise ValueError(f"sampler {name!r} is registered twice")
        _REGISTRY[name] = KDiffSampler(name, fn, MappingProxyType(dict(defaults)), stochastic, wants_uncond,
                                       couples_batch)
        return fn
    return add
