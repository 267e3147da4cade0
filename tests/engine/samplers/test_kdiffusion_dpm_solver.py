"""heunpp2, dpm_fast, dpm_adaptive and lms at any order (engine/samplers/kdiffusion/{heunpp2,dpm_solver,lms}.py)
against ComfyUI 0.3.64's algorithms, rewritten compactly here: comfy/k_diffusion/sampling.py sample_heunpp2,
DPMSolver with PIDStepSizeController, sample_lms, and comfy/samplers.py ksampler()'s dpm_fast / dpm_adaptive
wrappers (sigma_min is the last sigma, or the one before a final 0). On the analytic model of sampler_support any
slip in the math shows up as a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from engine import samplers as S
from engine.errors import LimitExceeded
from engine.samplers.kdiffusion import KDIFFUSION, Run
from engine.samplers.kdiffusion import dpm_solver
from engine.samplers.plan import _kdiff_plan
from tests.engine.samplers.sampler_support import MS, gaussian_eps, latents, run, sampling_cases

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SCHEDULERS = ("normal", "karras", "beta", "exponential")


def denoiser() -> tuple[Model, list[float]]:
    """ComfyUI's model(x, sigma) on the analytic eps, and the sigmas it was called at."""
    called: list[float] = []

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma)
        called.append(s)
        return x - gaussian_eps(x / math.sqrt(s * s + 1), torch.tensor(0.0), s) * sigma
    return model, called


def start(sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The loop's start latent to the last bit (test_loop checks it is ComfyUI's): dpm_adaptive's last step on the
    beta schedule is h = 7.6 in log sigma, where float32 rounding grows e^h / h = 260 times, so a start rounded
    otherwise ends 3e-4 away with the same math (and both 1e-3 from a float64 run)."""
    full = math.isclose(float(MS.float()[-1]), float(sigmas[0]), rel_tol=1e-5)
    return S.noise_scaling(float(sigmas[0]), noise, latent, max_denoise=full)


def heunpp2_reference(model: Model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    d_of = lambda x, s: (x - model(x, s)) / s  # noqa: E731
    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        d = d_of(x, s)
        if s1 == sigmas[-1]:
            x = x + d * (s1 - s)
        elif sigmas[i + 2] == sigmas[-1]:
            x2 = x + d * (s1 - s)
            w2 = s1 / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_of(x2, s1) * w2) * (s1 - s)
        else:
            s2 = sigmas[i + 2]
            x2 = x + d * (s1 - s)
            d2 = d_of(x2, s1)
            x3 = x2 + d2 * (s2 - s1)
            w2, w3 = s1 / (3 * sigmas[0]), s2 / (3 * sigmas[0])
            x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * d_of(x3, s2)) * (s1 - s)
    return x


def dpm_step(model: Model, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, order: int,
             eps0: torch.Tensor, r1: float | None = None) -> torch.Tensor:
    """DPMSolver.dpm_solver_{1,2,3}_step with sigma = exp(-t) (a fresh model call at each inner point)."""
    sig = lambda t: (-t).exp()  # noqa: E731
    eps = lambda x, t: (x - model(x, sig(t))) / sig(t)  # noqa: E731
    h = t_next - t
    if order == 1:
        return x - sig(t_next) * h.expm1() * eps0
    if order == 2:
        r1 = 0.5 if r1 is None else r1
        u1 = x - sig(t + r1 * h) * (r1 * h).expm1() * eps0
        return x - sig(t_next) * h.expm1() * eps0 - sig(t_next) / (2 * r1) * h.expm1() * (eps(u1, t + r1 * h) - eps0)
    r1, r2 = 1 / 3, 2 / 3
    u1 = x - sig(t + r1 * h) * (r1 * h).expm1() * eps0
    e1 = eps(u1, t + r1 * h)
    u2 = x - sig(t + r2 * h) * (r2 * h).expm1() * eps0 - sig(t + r2 * h) * (r2 / r1) * (
        (r2 * h).expm1() / (r2 * h) - 1) * (e1 - eps0)
    e2 = eps(u2, t + r2 * h)
    return x - sig(t_next) * h.expm1() * eps0 - sig(t_next) / r2 * (h.expm1() / h - 1) * (e2 - eps0)


def ends(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low = sigmas[-1] if sigmas[-1] != 0 else sigmas[-2]
    return -torch.tensor(float(sigmas[0])).log(), -torch.tensor(float(low)).log()


def dpm_fast_reference(model: Model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    n = len(sigmas) - 1
    t_start, t_end = ends(sigmas)
    m = n // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        sig = (-ts[i]).exp()
        eps0 = (x - model(x, sig)) / sig
        x = dpm_step(model, x, ts[i], ts[i + 1], order, eps0)
    return x


def dpm_adaptive_reference(model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int, order: int = 3,
                           rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0,
                           icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
                           eta: float = 0.0, s_noise: float = 1.0) -> tuple[torch.Tensor, int]:
    """dpm_solver_adaptive with PIDStepSizeController (forward only, as from a sigma list); and its accepted steps."""
    t_start, t_end = ends(sigmas)
    generator = torch.Generator().manual_seed(seed)
    p_order = 1.5 if eta else order
    b = ((pcoeff + icoeff + dcoeff) / p_order, -(pcoeff + 2 * dcoeff) / p_order, dcoeff / p_order)
    errs: list[float] = []
    h, s, x_prev, accepted = h_init, t_start, x, 0
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + h)
        sig_s, sig_t = (-s).exp(), (-t).exp()
        if eta:
            up = torch.minimum(sig_t, eta * (sig_t**2 * (sig_s**2 - sig_t**2) / sig_s**2) ** 0.5)
            t_ = torch.minimum(t_end, -((sig_t**2 - up**2) ** 0.5).log())
            su = (sig_t**2 - (-t_).exp() ** 2) ** 0.5
        else:
            t_, su = t, 0.0
        eps0 = (x - model(x, sig_s)) / sig_s
        low = dpm_step(model, x, s, t_, order - 1, eps0, r1=1 / 3 if order == 3 else None)
        high = dpm_step(model, x, s, t_, order, eps0)  # calls at the low order's inner point again: same eps
        delta = torch.maximum(torch.tensor(atol), rtol * torch.maximum(low.abs(), x_prev.abs()))
        error = float(torch.linalg.norm((low - high) / delta) / x.numel() ** 0.5)
        inv = 1 / (error + 1e-8)
        errs = errs or [inv] * 3
        errs[0] = inv
        factor = 1 + math.atan(errs[0] ** b[0] * errs[1] ** b[1] * errs[2] ** b[2] - 1)
        if factor >= accept_safety:
            errs[2], errs[1] = errs[1], errs[0]
            x_prev = low
            x = high + su * s_noise * torch.randn(x.shape, generator=generator) if eta else high
            s, accepted = t, accepted + 1
        h *= factor
    return x, accepted


def lms_reference(model: Model, x: torch.Tensor, sigmas: torch.Tensor, order: int) -> torch.Tensor:
    from tests.engine.samplers.test_against_comfyui import lms_coefficient
    ds: list[torch.Tensor] = []
    t = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        ds = (ds + [(x - denoised) / sigmas[i]])[-order:]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            current = min(i + 1, order)
            x = x + sum(lms_coefficient(current, t, i, j) * d for j, d in enumerate(reversed(ds)))
    return x


def cases(scheduler: str, sampler: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return sampling_cases(sampler, scheduler)


def ours(sampler: str, sigmas: torch.Tensor, latent: torch.Tensor, options: dict | None = None,
         seed: int = 99, callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    _, noise = latents(11)
    plan = S.build_scheduler(sampler, "normal", sigmas, seed, options=options)
    assert plan.kdiff is not None and plan.kdiff.name == sampler
    return S.sample(plan, gaussian_eps, latent, noise, callback=callback)


def theirs(sampler: str, sigmas: torch.Tensor, latent: torch.Tensor, **options: float) -> torch.Tensor:
    _, noise = latents(11)
    model, _ = denoiser()
    x = start(sigmas, latent, noise)
    if sampler == "heunpp2":
        return heunpp2_reference(model, x, sigmas)
    if sampler == "dpm_fast":
        return dpm_fast_reference(model, x, sigmas)
    if sampler == "dpm_adaptive":
        return dpm_adaptive_reference(model, x, sigmas, 99, **options)[0]
    return lms_reference(model, x, sigmas, int(options["order"]))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("sampler", ["heunpp2", "dpm_fast", "dpm_adaptive"])
def test_matches_comfys_algorithm(sampler: str, scheduler: str) -> None:
    for sigmas, latent in cases(scheduler, sampler):
        torch.testing.assert_close(ours(sampler, sigmas, latent), theirs(sampler, sigmas, latent),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("order", [1, 2, 3, 6])
def test_lms_at_another_order_matches_comfys_sample_lms(order: int, scheduler: str) -> None:
    for sigmas, latent in cases(scheduler, "lms"):
        torch.testing.assert_close(ours("lms", sigmas, latent, {"order": order}),
                                   theirs("lms", sigmas, latent, order=order), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_lms_order_4_on_noodles_steps_agrees_with_the_diffusers_scheduler(scheduler: str) -> None:
    _, noise = latents(11)
    assert not S.uses_kdiffusion("lms", {"order": 4}) and S.uses_kdiffusion("lms", {"order": 3})
    for sigmas, latent in cases(scheduler, "lms"):
        own = S.sample(_kdiff_plan("lms", scheduler, sigmas, 99, S.DEFAULT_SAMPLING, {"order": 4}), gaussian_eps,
                       latent, noise)
        torch.testing.assert_close(own, run("lms", scheduler, sigmas, latent, noise, seed=99), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [
    {"order": 2}, {"rtol": 0.01, "atol": 0.002, "h_init": 0.2}, {"pcoeff": 0.3, "icoeff": 0.6, "dcoeff": 0.1},
    {"eta": 0.7, "s_noise": 0.9}, {"eta": 1.0, "order": 2, "accept_safety": 0.95}])
def test_dpm_adaptive_options_match_comfys(options: dict) -> None:
    sigmas = S.ksampler_sigmas("karras", 10, 1.0, MS, sampler_name="dpm_adaptive")
    latent = torch.zeros_like(latents(11)[0])
    mine = ours("dpm_adaptive", sigmas, latent, options)
    torch.testing.assert_close(mine, theirs("dpm_adaptive", sigmas, latent, **options), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(mine, ours("dpm_adaptive", sigmas, latent))  # the options changed the run


def test_dpm_fast_spends_one_model_call_per_step_between_the_ends() -> None:
    for n in (1, 2, 3, 4, 5, 6, 10):
        sigmas = S.ksampler_sigmas("karras", n, 1.0, MS, sampler_name="dpm_fast")
        model, called = denoiser()
        x = start(sigmas, torch.zeros(1, 4, 4, 4), latents(11, (1, 4, 4, 4))[1])
        KDIFFUSION["dpm_fast"].fn(model, x, sigmas, Run(0))
        assert len(called) == n
        low = sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]
        assert max(called) == pytest.approx(float(sigmas[0]), rel=1e-5)
        assert min(called) >= float(low) * (1 - 1e-5)  # never into 0: the run ends at sigma_min


def test_progress_counts_to_the_sigmas_steps_and_ends_on_the_last() -> None:
    sigmas = S.ksampler_sigmas("normal", 9, 1.0, MS, sampler_name="dpm_adaptive")
    latent = torch.zeros_like(latents(11)[0])
    for sampler in ("dpm_fast", "dpm_adaptive", "heunpp2", "lms"):
        seen: list[tuple[int, int]] = []
        ours(sampler, sigmas, latent, {"order": 3} if sampler == "lms" else None,
             callback=lambda i, total, x: seen.append((i, total)))
        indices = [i for i, _ in seen]
        assert indices == sorted(indices) and indices[-1] == 8 and indices.count(8) == 1, sampler
        assert all(total == 9 and 0 <= i < 8 for i, total in seen[:-1]), sampler


def test_dpm_adaptive_stops_with_a_message_past_its_model_call_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    sigmas = S.ksampler_sigmas("karras", 10, 1.0, MS, sampler_name="dpm_adaptive")
    model, called = denoiser()
    x = start(sigmas, torch.zeros(1, 4, 4, 4), latents(11, (1, 4, 4, 4))[1])
    options = KDIFFUSION["dpm_adaptive"].options({"rtol": 1e-4, "atol": 1e-5})
    monkeypatch.setattr(dpm_solver, "MAX_MODEL_CALLS", 60)
    with pytest.raises(LimitExceeded, match=r"dpm_adaptive made \d+ model calls and is at sigma .* would go past "
                                            "60, Noodle's cap for one run"):
        KDIFFUSION["dpm_adaptive"].fn(model, x, sigmas, Run(0), **options)
    assert len(called) <= 60


def test_dpm_adaptive_refuses_options_that_could_never_finish() -> None:
    sigmas = S.ksampler_sigmas("karras", 4, 1.0, MS, sampler_name="dpm_adaptive")
    for options, word in (({"h_init": 0.0}, "h_init 0"), ({"accept_safety": 3.0}, "would ever be accepted"),
                          ({"rtol": 0.0, "atol": 0.0}, "rtol and atol both 0"), ({"order": 4}, "use 2 or 3")):
        with pytest.raises(ValueError, match=word):
            ours("dpm_adaptive", sigmas, torch.zeros(2, 4, 8, 8), options)


def test_dpm_adaptive_coefficients_past_floats_range_grow_the_step_instead_of_overflowing() -> None:
    # ComfyUI's errs ** b1 raises OverflowError for coefficients of 100 on a tiny error; the factor is then
    # read from its logs, and atan caps any huge factor at 1 + pi / 2 as it caps a finite one
    control = dpm_solver._StepSize(0.05, 100.0, 100.0, 100.0, 3, 0.81)
    assert control.propose(1e-9) and control.propose(1e-9)
    assert control.h == pytest.approx(0.05 * (1 + math.pi / 2) ** 2)
    plain = dpm_solver._StepSize(0.05, 0.0, 1.0, 0.0, 3, 0.81)
    plain.propose(0.5)
    assert plain.h == 0.05 * (1 + math.atan((1 / (0.5 + 1e-8)) ** (1 / 3) - 1))  # ComfyUI's arithmetic, exactly


def test_classification_for_the_queue() -> None:
    assert S.is_deterministic("heunpp2") and S.is_deterministic("dpm_fast") and S.is_deterministic("lms", {"order": 2})
    # no step noise at eta 0, but its step sizes come from the whole batch's error: never batched
    assert not S.is_deterministic("dpm_adaptive") and not S.is_deterministic("dpm_adaptive", {"eta": 0.5})
    assert {"heunpp2", "dpm_fast", "dpm_adaptive"} <= set(S.SUPPORTED_SAMPLERS)
