"""DPM-Solver (Lu et al. 2022, arXiv 2206.00927) in t = -log(sigma): dpm_fast (fixed steps) and dpm_adaptive
(an embedded pair of orders whose step size a PID controller picks).

As comfy/k_diffusion/sampling.py 0.3.64 has them (DPMSolver, PIDStepSizeController, sample_dpm_fast,
sample_dpm_adaptive), called as comfy/samplers.py ksampler() wraps them: they go from sigma_max = sigmas[0] to
sigma_min = the last sigma, or the one before it where the last is 0, and never step into 0 itself (what comes
back still holds sigma_min's noise, as in ComfyUI). dpm_fast spends exactly len(sigmas) - 1 model calls, in
floor(n / 3) + 1 equal steps of order 3, then 2 and 1; the other sigmas of the list are not visited.

dpm_adaptive makes as many model calls as its error control asks for, which ComfyUI does not bound (h_init 0 or
an accept_safety above what the controller can reach loops forever there). Here a run stops with a message at
`MAX_MODEL_CALLS`; progress follows how far in log-sigma the run has come.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from engine.errors import LimitExceeded
from engine.samplers.kdiffusion.base import Denoiser, NoiseSampler, Run, ancestral_step, register

__all__ = ["MAX_MODEL_CALLS", "adaptive_problems"]

# The model calls one dpm_adaptive run may make: the default limits.max_job_steps (engine/settings.py), so a run
# costs at most what a whole job's sampler steps may. At ComfyUI's defaults SD runs take tens to a few hundred.
MAX_MODEL_CALLS = 1000
# PIDStepSizeController.limiter is 1 + atan(x - 1): a step is never grown by this much or more
_MAX_FACTOR = 1 + math.pi / 2


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return -sigma.log()


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


class _Solver:
    """DPMSolver's steps over the eps of the denoised estimate; eps is asked once per point and key."""

    def __init__(self, model: Denoiser) -> None:
        self.model, self.calls = model, 0

    def eps(self, cache: dict[str, torch.Tensor], key: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if key not in cache:
            self.calls += 1
            cache[key] = (x - self.model(x, _sigma(t))) / _sigma(t)
        return cache[key]

    def first(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
              cache: dict[str, torch.Tensor]) -> torch.Tensor:
        h = t_next - t
        return x - _sigma(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def second(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: dict[str, torch.Tensor],
               r1: float = 1 / 2) -> torch.Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def third(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: dict[str, torch.Tensor],
              r1: float = 1 / 3, r2: float = 2 / 3) -> torch.Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - _sigma(s2) * (r2 * h).expm1() * eps
              - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)

    def step(self, order: int, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
             cache: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.first, self.second, self.third)[order - 1](x, t, t_next, cache)


def _ends(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ksampler()'s wrappers: t of sigma_max = sigmas[0] and of sigma_min, the last sigma above 0 of the two last."""
    sigma_min = sigmas[-1] if sigmas[-1] != 0 else sigmas[-2]
    if sigma_min <= 0 or sigmas[0] <= 0:
        raise ValueError(f"dpm_fast and dpm_adaptive step between two sigmas above 0 (ComfyUI: 'sigma_min and "
                         f"sigma_max must not be 0'); these sigmas start at {float(sigmas[0]):g} and end at "
                         f"{float(sigma_min):g}")
    return _t(sigmas[0].clone()), _t(sigma_min.clone())


def _ancestral_target(t: torch.Tensor, t_next: torch.Tensor, t_end: torch.Tensor,
                      eta: float) -> tuple[torch.Tensor, torch.Tensor | float]:
    """With eta, step to the ancestral step's sigma_down (not past t_end) and add noise back up to t_next."""
    if not eta:
        return t_next, 0.0
    down, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_down = torch.minimum(t_end, _t(down))
    return t_down, (_sigma(t_next) ** 2 - _sigma(t_down) ** 2) ** 0.5


@register("dpm_fast", stochastic=False)
def dpm_fast(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run) -> torch.Tensor:
    """DPM-Solver-Fast: len(sigmas) - 1 model calls in equal steps of t; ComfyUI's wrapper passes no options
    (eta 0)."""
    if len(sigmas) <= 1:
        return x
    t_start, t_end = _ends(sigmas)
    calls = len(sigmas) - 1
    m = calls // 3 + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1)  # on the host with the sigmas: no sync per call
    orders = [3] * (m - 2) + [2, 1] if calls % 3 == 0 else [3] * (m - 1) + [calls % 3]
    solver, done = _Solver(model), 0
    for i, order in enumerate(orders):
        cache: dict[str, torch.Tensor] = {}
        t, t_next = ts[i], ts[i + 1]
        denoised = x - _sigma(t) * solver.eps(cache, "eps", x, t)
        x = solver.step(order, x, t, t_next, cache)
        done += order
        # progress in model calls: the n calls are the n steps the sigmas promise, the last one ends the run
        run.report(done - 1, x, denoised)
    return x


def adaptive_problems(order: int, rtol: float, atol: float, h_init: float,
                      accept_safety: float) -> list[tuple[str, str]]:
    """Why these dpm_adaptive options could never finish (ComfyUI loops forever on the last three), as
    (option, message) pairs for SamplerDPMAdaptative's validation; empty when the run can end."""
    problems = []
    if order not in (2, 3):
        problems.append(("order", f"order {order}: dpm_adaptive pairs orders 1 and 2 or 2 and 3; use 2 or 3"))
    if h_init == 0:
        problems.append(("h_init", "h_init 0: the first step would be of size 0, and so would every later one; "
                                   "use a value above 0"))
    if accept_safety >= _MAX_FACTOR:
        problems.append(("accept_safety", f"accept_safety {accept_safety:g}: the step size control never grows a "
                                          f"step by {_MAX_FACTOR:.4f} or more, so no step would ever be accepted; "
                                          "use less than that"))
    if rtol == 0 and atol == 0:
        problems.append(("atol", "rtol and atol both 0: no error could be small enough; set one of them above 0"))
    return problems


_MAX_LOG = 700.0  # math.exp overflows past about 709.8; atan makes any factor past e^700 the same anyway


class _StepSize:
    """PIDStepSizeController: grows or shrinks h by the error history, accepts a step when the factor is high
    enough."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float, eps: float = 1e-8) -> None:
        self.h, self.accept_safety, self.eps = h, accept_safety, eps
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        inv_error = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv_error] * 3
        self.errs[0] = inv_error
        try:
            factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        except OverflowError:  # a power past float's range (coefficients of 100 on a tiny error): its logs add up
            logged = sum(b * math.log(e) for b, e in zip((self.b1, self.b2, self.b3), self.errs, strict=True))
            factor = math.exp(min(logged, _MAX_LOG))
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@register("dpm_adaptive", stochastic=True, couples_batch=True, order=3, rtol=0.05, atol=0.0078, h_init=0.05,
          pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0)
def dpm_adaptive(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, order: int, rtol: float,
                 atol: float, h_init: float, pcoeff: float, icoeff: float, dcoeff: float, accept_safety: float,
                 eta: float, s_noise: float) -> torch.Tensor:
    """DPM-Solver-12 or -23: each try makes `order` model calls; the error between the two orders, over the whole
    batch (one step size for every latent: batched, a latent does not get its solo result), picks the next h."""
    if len(sigmas) <= 1:
        return x
    problems = adaptive_problems(order, rtol, atol, h_init, accept_safety)
    if problems:
        raise ValueError(f"dpm_adaptive cannot run with {'; '.join(message for _, message in problems)}")
    t_start, t_end = _ends(sigmas)
    forward = bool(t_end > t_start)
    if not forward and eta:
        raise ValueError(f"dpm_adaptive with eta {eta} cannot sample towards higher noise (the sigmas rise from "
                         f"{float(sigmas[0]):g}); use eta 0")
    noise: NoiseSampler | None = run.default_noise(x) if eta else None
    tolerance = torch.tensor(atol, device=x.device), torch.tensor(rtol, device=x.device)
    control = _StepSize(abs(h_init) * (1 if forward else -1), pcoeff, icoeff, dcoeff, 1.5 if eta else order,
                        accept_safety)
    solver, s, x_prev = _Solver(model), t_start, x
    steps = len(sigmas) - 1
    position = _progress(t_start, t_end, steps)
    while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
        if solver.calls + order > MAX_MODEL_CALLS:
            raise LimitExceeded(
                f"dpm_adaptive made {solver.calls} model calls and is at sigma {float(_sigma(s)):.4g} of "
                f"{float(_sigma(t_end)):.4g}: its step size control (rtol {rtol:g}, atol {atol:g}, h_init {h_init:g}, "
                f"accept_safety {accept_safety:g}) would go past {MAX_MODEL_CALLS}, Noodle's cap for one run (ComfyUI "
                "has none); raise rtol or atol, or use dpm_fast or another sampler")
        cache: dict[str, torch.Tensor] = {}
        t = torch.minimum(t_end, s + control.h) if forward else torch.maximum(t_end, s + control.h)
        t_down, up = _ancestral_target(s, t, t_end, eta)
        denoised = x - _sigma(s) * solver.eps(cache, "eps", x, s)
        if order == 2:
            x_low, x_high = solver.first(x, s, t_down, cache), solver.second(x, s, t_down, cache)
        else:
            x_low, x_high = solver.second(x, s, t_down, cache, r1=1 / 3), solver.third(x, s, t_down, cache)
        atol_t, rtol_t = tolerance
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = float(torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5)
        if not math.isfinite(error):
            # atol 0 divides by zero where the latent is 0; otherwise the step size control took h out of range
            fix = "raise atol above 0" if atol == 0 else (
                f"its step size control (pcoeff {pcoeff:g}, icoeff {icoeff:g}, dcoeff {dcoeff:g}) took the step out "
                "of range: use smaller coefficients (ComfyUI's defaults are 0, 1 and 0)")
            raise ValueError(f"dpm_adaptive's error estimate is {error} at sigma {float(_sigma(s)):.4g} (rtol "
                             f"{rtol:g}, atol {atol:g}): {fix}")
        if control.propose(error):
            x_prev = x_low
            x = x_high if noise is None else x_high + up * s_noise * noise(_sigma(s), _sigma(t))
            s = t
        finished = not (s < t_end - 1e-5 if forward else s > t_end + 1e-5)
        run.report(steps - 1 if finished else position(s), x, denoised)
    return x


def _progress(t_start: torch.Tensor, t_end: torch.Tensor, steps: int) -> Callable[[torch.Tensor], int]:
    """The step index to report at t: the share of the way from t_start to t_end, in the sigma list's steps; the
    last index is kept for the try that ends the run, which also hands out the run's last denoised estimate."""
    span = float(t_end - t_start)

    def index(t: torch.Tensor) -> int:
        share = float(t - t_start) / span if span else 1.0
        return max(0, min(int(share * steps), steps - 2))
    return index
