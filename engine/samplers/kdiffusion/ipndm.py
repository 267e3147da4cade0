"""Improved PNDM: Adams-Bashforth steps in sigma over the last few ODE derivatives (ipndm, ipndm_v).

ipndm weighs the history with the fixed Adams-Bashforth weights (as if the steps were equal); ipndm_v with the
variable-step weights of zju-pi/diff-sampler, which follow the actual sigma spacing. Both warm up from Euler,
one order more per step up to `max_order`, keep the derivatives of this run only, and end a step into sigma 0
on the denoised estimate, as comfy/k_diffusion/sampling.py 0.3.64 has them. Neither draws noise.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch

from engine.samplers.kdiffusion.base import Denoiser, Run, register, to_d

# Adams-Bashforth weights for [d_now, d_prev1, d_prev2, d_prev3] by order (equal steps)
_AB_WEIGHTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}

Weights = Callable[[torch.Tensor, int, int], Sequence[torch.Tensor | float]]  # (sigmas, i, order) -> weights


def _check_order(max_order: int) -> None:
    if not 1 <= max_order <= 4:
        raise ValueError(f"max_order {max_order!r} is out of range; ipndm and ipndm_v take 1 to 4 (ComfyUI's "
                         "default is 4)")


def _fixed_weights(sigmas: torch.Tensor, i: int, order: int) -> Sequence[float]:
    return _AB_WEIGHTS[order]


def _variable_weights(sigmas: torch.Tensor, i: int, order: int) -> Sequence[torch.Tensor | float]:
    """ipndm_v's weights for [d_now, d_prev1, ...]: the Adams-Bashforth weights for the steps h_n (this one) and
    h_n_1.. (the previous ones, newest first), from diff-sampler's iPNDM_v."""
    if order == 1:
        return (1.0,)
    h = [sigmas[i + 1] - sigmas[i]] + [sigmas[i - k] - sigmas[i - k - 1] for k in range(order - 1)]
    h0, h1 = h[0], h[1]
    w = [(2 + h0 / h1) / 2, -(h0 / h1) / 2]
    if order == 2:
        return w
    h2 = h[2]
    a = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
    w = [w[0] + a, w[1] - (1 + h1 / h2) * a, a * h1 / h2]
    if order == 3:
        return w
    h3 = h[3]
    ratio = h1 * (h1 + h2) / (h2 * (h2 + h3))
    b = ((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2))) \
        * (h0 * (h0 + h1) * (h0 + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    return [w[0] + b, w[1] - (1 + h1 / h2 + ratio) * b, w[2] + (h1 / h2 + ratio * (1 + h2 / h3)) * b,
            -b * ratio * h1 / h2]


def _adams_bashforth(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, max_order: int,
                     weights: Weights) -> torch.Tensor:
    _check_order(max_order)
    history: deque[torch.Tensor] = deque(maxlen=max(max_order - 1, 1))  # newest last, as ComfyUI's buffer_model
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        run.report(i, x, denoised)
        d = to_d(x, sigma, denoised)
        order = min(max_order, i + 1)
        if sigma_next == 0:
            x_next = denoised
        else:
            w = weights(sigmas, i, order)
            slope = w[0] * d
            for k in range(1, order):
                slope = slope + w[k] * history[-k]
            x_next = x + (sigma_next - sigma) * slope
        history.append(d)
        x = x_next
    return x


@register("ipndm", stochastic=False, max_order=4)
def ipndm(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, max_order: int) -> torch.Tensor:
    return _adams_bashforth(model, x, sigmas, run, max_order, _fixed_weights)


@register("ipndm_v", stochastic=False, max_order=4)
def ipndm_v(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, max_order: int) -> torch.Tensor:
    return _adams_bashforth(model, x, sigmas, run, max_order, _variable_weights)
