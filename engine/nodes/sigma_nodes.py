"""The rest of ComfyUI 0.3.64's SIGMAS nodes: the table schedules (AlignYourStepsScheduler, GITSScheduler,
OptimalStepsScheduler), the formula ones (LaplaceScheduler, VPScheduler, BetaSamplingScheduler), the nodes that
cut or reshape a schedule (SplitSigmasDenoise, SetFirstSigma, ExtendIntermediateSigmas) and SamplingPercentToSigma.

Names, inputs, defaults, ranges, categories and math are those of comfy_extras/nodes_custom_sampler.py,
nodes_align_your_steps.py, nodes_gits.py and nodes_optimalsteps.py, with comfy/k_diffusion/sampling.py
get_sigmas_laplace / get_sigmas_vp and comfy/samplers.py beta_scheduler; the fixed levels live in sigma_tables.py.
Every output is a float32 SIGMAS list on the CPU, as custom_sampling.py's schedulers make them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import scipy.stats
import torch
from pydantic import Field

from engine.nodes.base import Choice, Node, RunContext, Socket, register
from engine.nodes.sigma_tables import (AYS_LEVELS, GITS_COEFFS, GITS_TABLE_STEPS, OPTIMAL_LEVELS, gits_levels,
                                       loglinear_interp)
from engine.samplers.model_sampling import ModelSampling, percent_to_sigma
from engine.settings import Limits
from engine.values import ModelRef, Sigmas

__all__ = ["SPACINGS", "beta_sigmas", "extended_length_bound", "extend_sigmas", "split_by_denoise",
           "table_sigmas", "table_steps"]

_SCHEDULERS = "sampling/custom_sampling/schedulers"
_SIGMAS = "sampling/custom_sampling/sigmas"
_SIGMA_MAX, _SIGMA_MIN = 14.614642, 0.0291675  # SD1.x's training sigma_max and sigma_min, as KarrasScheduler's
# ExtendIntermediateSigmas' spacings, under ComfyUI's names ("cosine" is the sine ease, "sine" the cosine one)
SPACINGS: tuple[str, ...] = ("linear", "cosine", "sine")


def _float(default: float, low: float, high: float, step: float) -> Any:
    return Field(default, ge=low, le=high, json_schema_extra={"step": step, "round": False})


def _denoise_field() -> Any:
    return Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})


def table_steps(steps: int, denoise: float) -> int | None:
    """The steps a table schedule keeps for `denoise`: round(steps * denoise) below 1 (Python's round, as ComfyUI),
    all of them at 1; None for a denoise of 0 or less (an empty schedule)."""
    if denoise >= 1.0:
        return steps
    return None if denoise <= 0.0 else round(steps * denoise)


def table_sigmas(levels: Sequence[float] | np.ndarray, steps: int, denoise: float) -> torch.Tensor:
    """The shared ending of AlignYourSteps, GITS and OptimalSteps: `levels` (steps + 1 of them) cut to the last
    round(steps * denoise) + 1, the final one set to 0."""
    kept = table_steps(steps, denoise)
    if kept is None:
        return torch.zeros(0)
    tail = [float(s) for s in levels[-(kept + 1):]]
    tail[-1] = 0.0
    return torch.tensor(tail, dtype=torch.float32)


def _stretched(levels: tuple[float, ...], steps: int) -> Sequence[float] | np.ndarray:
    """The table itself when it has steps + 1 levels, else its log-linear stretch to steps + 1."""
    return levels if len(levels) == steps + 1 else loglinear_interp(levels, steps + 1)


@register
class AlignYourStepsScheduler(Node):
    """NVIDIA's Align Your Steps schedule for SD1.x, SDXL or SVD, stretched log-linearly to `steps`."""

    CATEGORY: ClassVar[str] = _SCHEDULERS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    model_type: str = Choice(tuple(AYS_LEVELS))
    steps: int = Field(10, ge=1, le=10_000)
    denoise: float = _denoise_field()

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        if table_steps(self.steps, self.denoise) is None:
            return (Sigmas(torch.zeros(0)),)
        levels = _stretched(AYS_LEVELS[self.model_type], self.steps)
        return (Sigmas(table_sigmas(levels, self.steps, self.denoise)),)


def _gits_coeff_problem(coeff: float) -> str | None:
    # ComfyUI looks round(coeff, 2) up in its table and fails with a KeyError on any other value
    if round(coeff, 2) in GITS_COEFFS:
        return None
    return f"coeff {coeff} has no GITS table; use a multiple of 0.05 from 0.80 to 1.50"


@register
class GITSScheduler(Node):
    """The GITS paper's searched SD1.x schedule for a coefficient and steps (past 20: the 20-step one stretched)."""

    CATEGORY: ClassVar[str] = _SCHEDULERS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    coeff: float = Field(1.20, ge=0.80, le=1.50, json_schema_extra={"step": 0.05})
    steps: int = Field(10, ge=2, le=1000)
    denoise: float = _denoise_field()

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        problem = _gits_coeff_problem(float(values.get("coeff", 1.20)))
        return [("coeff", problem)] if problem else []

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        problem = _gits_coeff_problem(self.coeff)
        if problem:  # a linked coeff is not checked at validation
            raise ValueError(problem)
        if table_steps(self.steps, self.denoise) is None:
            return (Sigmas(torch.zeros(0)),)
        coeff = round(self.coeff, 2)
        if self.steps <= GITS_TABLE_STEPS:
            levels: Sequence[float] | np.ndarray = gits_levels(coeff, self.steps)
        else:
            levels = loglinear_interp(gits_levels(coeff, GITS_TABLE_STEPS), self.steps + 1)
        return (Sigmas(table_sigmas(levels, self.steps, self.denoise)),)


@register
class OptimalStepsScheduler(Node):
    """The OptimalSteps paper's schedule for FLUX, Wan or Chroma (flow models, sigmas 1 to 0), stretched to steps."""

    CATEGORY: ClassVar[str] = _SCHEDULERS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    model_type: str = Choice(tuple(OPTIMAL_LEVELS))
    steps: int = Field(20, ge=3, le=1000)
    denoise: float = _denoise_field()

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        if table_steps(self.steps, self.denoise) is None:
            return (Sigmas(torch.zeros(0)),)
        levels = _stretched(OPTIMAL_LEVELS[self.model_type], self.steps)
        return (Sigmas(table_sigmas(levels, self.steps, self.denoise)),)


@register
class LaplaceScheduler(Node):
    """Tiankai et al. (2024)'s schedule: log sigma Laplace-spaced around mu, within [sigma_min, sigma_max].

    As ComfyUI's, it ends at sigma_min, not 0: no final step to sigma 0."""

    CATEGORY: ClassVar[str] = _SCHEDULERS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    steps: int = Field(20, ge=1, le=10_000)
    sigma_max: float = _float(_SIGMA_MAX, 0.0, 5000.0, 0.01)
    sigma_min: float = _float(_SIGMA_MIN, 0.0, 5000.0, 0.01)
    mu: float = _float(0.0, -10.0, 10.0, 0.1)
    beta: float = _float(0.5, 0.0, 10.0, 0.1)

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        x = torch.linspace(0, 1, self.steps)
        # get_sigmas_laplace: 1e-5 keeps log() finite at the ends
        lmb = self.mu - self.beta * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)
        return (Sigmas(torch.clamp(torch.exp(lmb), min=self.sigma_min, max=self.sigma_max)),)


@register
class VPScheduler(Node):
    """The continuous variance-preserving schedule (Song et al.) from t = 1 down to eps_s, then 0."""

    CATEGORY: ClassVar[str] = _SCHEDULERS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    steps: int = Field(20, ge=1, le=10_000)
    beta_d: float = _float(19.9, 0.0, 5000.0, 0.01)
    beta_min: float = _float(0.1, 0.0, 5000.0, 0.01)
    eps_s: float = _float(0.001, 0.0, 1.0, 0.0001)

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        t = torch.linspace(1, self.eps_s, self.steps)
        head = torch.sqrt(torch.special.expm1(self.beta_d * t**2 / 2 + self.beta_min * t))
        if not bool(torch.isfinite(head[0])):  # ComfyUI samples on with it and draws NaN: a black picture
            raise ValueError(f"VPScheduler: beta_d / 2 + beta_min = {self.beta_d / 2 + self.beta_min:g} makes its "
                             f"first sigma sqrt(e^{self.beta_d / 2 + self.beta_min:g} - 1), past float32's range "
                             "(the exponent must stay under 88); the usual values are beta_d 19.9, beta_min 0.1")
        return (Sigmas(torch.cat([head, torch.zeros(1)])),)


def beta_sigmas(sampling: ModelSampling, steps: int, alpha: float, beta: float) -> torch.Tensor:
    """comfy/samplers.py beta_scheduler: the model's training sigmas at the Beta(alpha, beta) quantiles of the
    timesteps, a timestep repeated by rounding kept once, then 0."""
    table = sampling.table.float()  # ComfyUI reads model_sampling.sigmas, its float32 buffer
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    timesteps = np.rint(scipy.stats.beta.ppf(quantiles, alpha, beta) * (len(table) - 1))
    kept = [float(table[int(t)]) for i, t in enumerate(timesteps) if i == 0 or t != timesteps[i - 1]]
    return torch.tensor([*kept, 0.0], dtype=torch.float32)


@register
class BetaSamplingScheduler(Node):
    """The model's sigmas at Beta(alpha, beta)-spaced timesteps: the `beta` scheduler with its own alpha and beta."""

    CATEGORY: ClassVar[str] = _SCHEDULERS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    model: ModelRef = Socket("MODEL")
    steps: int = Field(20, ge=1, le=10_000)
    alpha: float = _float(0.6, 0.0, 50.0, 0.01)
    beta: float = _float(0.6, 0.0, 50.0, 0.01)

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        # the Beta distribution is defined for alpha, beta > 0; at 0 its quantiles are NaN and ComfyUI fails mid-run
        return [(name, f"{name} 0 gives no Beta distribution; use a value above 0")
                for name in ("alpha", "beta") if values.get(name, 0.6) == 0]

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        return (Sigmas(beta_sigmas(self.model.model_sampling, self.steps, self.alpha, self.beta)),)


def split_by_denoise(values: torch.Tensor, denoise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SplitSigmasDenoise: the last round(steps * denoise) steps are the low part; the high part is what comes
    before (both hold the sigma between). A denoise that keeps no step gives an empty high part, as ComfyUI's
    sigmas[:-0] does."""
    kept = round(max(len(values) - 1, 0) * denoise)
    return values[:-kept] if kept else values[:0], values[-(kept + 1):]


@register
class SplitSigmasDenoise(Node):
    """Cut a schedule where a denoise would start: low_sigmas are its last round(steps * denoise) steps."""

    CATEGORY: ClassVar[str] = _SIGMAS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS", "SIGMAS")
    RETURN_NAMES: ClassVar[tuple[str, ...]] = ("high_sigmas", "low_sigmas")

    sigmas: Sigmas = Socket("SIGMAS")
    denoise: float = _denoise_field()

    def run(self, ctx: RunContext) -> tuple[Sigmas, Sigmas]:
        high, low = split_by_denoise(self.sigmas.values, self.denoise)
        return Sigmas(high), Sigmas(low)


@register
class SetFirstSigma(Node):
    """Replace the first sigma of a schedule (a higher start for a model trained past its table's sigma_max)."""

    CATEGORY: ClassVar[str] = _SIGMAS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    sigmas: Sigmas = Socket("SIGMAS")
    sigma: float = _float(136.0, 0.0, 20000.0, 0.001)

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        if len(self.sigmas.values) == 0:
            raise ValueError("SetFirstSigma got an empty schedule (a scheduler at denoise 0 makes one): it has no "
                             "first sigma to set; give it a schedule with at least one sigma")
        values = self.sigmas.values.clone()  # the input value stays as it was
        values[0] = self.sigma
        return (Sigmas(values),)


def extend_sigmas(values: torch.Tensor, steps: int, start_at_sigma: float, end_at_sigma: float,
                  spacing: str) -> torch.Tensor:
    """ExtendIntermediateSigmas: steps - 1 more sigmas between each pair whose upper sigma lies in
    [end_at_sigma, start_at_sigma] (start below 0: no upper bound), spaced by `spacing`, in ComfyUI's float32."""
    start = math.inf if start_at_sigma < 0 else start_at_sigma
    x = torch.linspace(0, 1, steps + 1)[1:-1]
    if spacing == "linear":
        ease = x
    elif spacing == "cosine":
        ease = torch.sin(x * math.pi / 2)
    else:  # "sine"
        ease = 1 - torch.cos(x * math.pi / 2)
    out: list[float] = []
    for current, following in zip(values[:-1], values[1:]):
        out.append(float(current))
        if end_at_sigma <= current <= start:
            out.extend((ease * (following - current) + current).tolist())
    if len(values) > 0:
        out.append(float(values[-1]))
    return torch.tensor(out, dtype=torch.float32)


def extended_length_bound(length: int, steps: int, start_at_sigma: float, end_at_sigma: float) -> int:
    """The most sigmas ExtendIntermediateSigmas can make from `length`: every pair extended, unless the window
    [end_at_sigma, start_at_sigma] is empty."""
    if steps <= 1 or length < 2 or 0 <= start_at_sigma < end_at_sigma:
        return length
    return length + (length - 1) * (steps - 1)


@register
class ExtendIntermediateSigmas(Node):
    """Put steps - 1 sigmas between each pair of a schedule within a sigma window: more steps where it matters."""

    CATEGORY: ClassVar[str] = _SIGMAS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SIGMAS",)

    sigmas: Sigmas = Socket("SIGMAS")
    steps: int = Field(2, ge=1, le=100)
    start_at_sigma: float = _float(-1.0, -1.0, 20000.0, 0.01)
    end_at_sigma: float = _float(12.0, 0.0, 20000.0, 0.01)
    spacing: str = Choice(SPACINGS)

    def run(self, ctx: RunContext) -> tuple[Sigmas]:
        return (Sigmas(extend_sigmas(self.sigmas.values.float().cpu(), self.steps, self.start_at_sigma,
                                     self.end_at_sigma, self.spacing)),)


@register
class SamplingPercentToSigma(Node):
    """The model's sigma `sampling_percent` of the way through its schedule (as timestep windows read a percent)."""

    CATEGORY: ClassVar[str] = _SIGMAS
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("FLOAT",)
    RETURN_NAMES: ClassVar[tuple[str, ...]] = ("sigma_value",)

    model: ModelRef = Socket("MODEL")
    sampling_percent: float = Field(0.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.0001})
    return_actual_sigma: bool = Field(False, description="Return the actual sigma value instead of the value used "
                                                         "for interval checks.\nThis only affects results at 0.0 "
                                                         "and 1.0.")

    def run(self, ctx: RunContext) -> tuple[float]:
        sampling = self.model.model_sampling
        if self.return_actual_sigma and self.sampling_percent == 0.0:
            return (sampling.sigma_max,)
        if self.return_actual_sigma and self.sampling_percent == 1.0:
            return (sampling.sigma_min,)
        # 0 gives 999999999.9 and 1 gives 0: the bounds an interval check takes as "every sigma"
        return (percent_to_sigma(self.sampling_percent, sampling),)
