"""How a model's output becomes the denoised estimate, and the sigma table it was trained on: ComfyUI's model sampling.

A MODEL value carries a `ModelSampling` (the checkpoint's own, or ModelSamplingDiscrete's override). It answers
what ComfyUI 0.3.64's comfy/model_sampling.py and comfy_extras/nodes_model_advanced.py answer for discrete SD
models: the sigma table (SD's betas; `zsnr` rescaled to zero terminal SNR; `lcm` the 50 sigmas of an LCM
distilled model), the UNet timestep for a sigma, and the prediction type's `calculate_denoised`. `ContinuousEDM`
answers the same for ModelSamplingContinuousEDM: a continuous sigma range (1000 log-spaced sigmas stand in for the
table, as ComfyUI's buffer does for its schedulers), the timestep 0.25 * log(sigma), and EDM's sigma_data.

The diffusers schedulers step on a noise prediction (they form the denoised estimate as x - sigma * eps), so
`to_eps` hands them the eps that gives ComfyUI's denoised estimate: eps' = (x - D) / sigma, with D computed as
ComfyUI computes it from the model output and the model input.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_SAMPLING", "EDM_PREDICTIONS", "PREDICTIONS", "ContinuousEDM", "ModelSampling", "discrete_sigmas",
           "percent_to_sigma", "rescale_zero_terminal_snr"]

# ModelSamplingDiscrete's `sampling` choices, in ComfyUI's order.
PREDICTIONS: tuple[str, ...] = ("eps", "v_prediction", "lcm", "x0", "img_to_img")
# ModelSamplingDiscreteDistilled: an LCM model was distilled onto 50 of the 1000 training timesteps.
_LCM_TIMESTEPS = 50
_LCM_SIGMA_DATA, _LCM_TIMESTEP_SCALING = 0.5, 10.0
# ModelSamplingContinuousEDM's `sampling` choices, in ComfyUI 0.3.64's order, and why Noodle refuses some of them.
EDM_PREDICTIONS: tuple[str, ...] = ("v_prediction", "edm", "edm_playground_v2.5", "eps", "cosmos_rflow")
EDM_REFUSED: dict[str, str] = {
    "edm_playground_v2.5": "it also swaps in Playground v2.5's latent format (a per-channel mean and std around "
                           "the sampler), which Noodle's samplers do not apply",
    "cosmos_rflow": "Cosmos' rectified-flow model sampling (its own input scaling, noise scaling and "
                    "x * (1 - s) - out * s denoising, with s = sigma / (sigma + 1)) is not one Noodle's samplers "
                    "run: they step on SD's x + sigma * noise",
}


def discrete_sigmas(beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                    *, zsnr: bool = False) -> torch.Tensor:
    """SD's training sigmas in float64, as ModelSamplingDiscrete has them before its float32 copies (bit-exact)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return rescale_zero_terminal_snr(sigmas) if zsnr else sigmas


def rescale_zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """ComfyUI's rescale_zero_terminal_snr_sigmas (arXiv 2305.08891): sqrt(alphas_cumprod) shifted to end at 0 and
    rescaled to keep its first value; the last alphas_cumprod is then set to ComfyUI's 4.8973451890853435e-08
    rather than 0, so the largest sigma is finite (about 4518)."""
    alphas_bar_sqrt = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas_bar[-1] = 4.8973451890853435e-08
    return ((1 - alphas_bar) / alphas_bar) ** 0.5


@functools.cache
def _table(lcm: bool, zsnr: bool) -> torch.Tensor:
    sigmas = discrete_sigmas(zsnr=zsnr)
    if not lcm:
        return sigmas  # float64: the functions reading it take ComfyUI's float32 copies (sigmas, log_sigmas)
    # ModelSamplingDiscreteDistilled.sigmas: every 20th float32 sigma from index 19 up; its log_sigmas are the
    # logs of these float32 values, so the table stays float32
    skip = len(sigmas) // _LCM_TIMESTEPS
    return sigmas.float()[skip - 1::skip].clone()


@dataclass(frozen=True)
class ModelSampling:
    """A discrete SD model's sampling: its prediction type (ComfyUI's `sampling`) and zero terminal SNR."""

    prediction: str = "eps"
    zsnr: bool = False

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown model sampling {self.prediction!r}; ComfyUI's are {', '.join(PREDICTIONS)}")

    @property
    def label(self) -> str:
        """For metadata and messages: "v_prediction", "eps+zsnr"."""
        return self.prediction + ("+zsnr" if self.zsnr else "")

    @property
    def skip_steps(self) -> int:
        """Training timesteps per table entry: 20 for an LCM model's 50 sigmas, else 1."""
        return 1000 // _LCM_TIMESTEPS if self.prediction == "lcm" else 1

    @property
    def table(self) -> torch.Tensor:
        """The model's sigmas, smallest first (float64 for the 1000 training sigmas, float32 for LCM's 50)."""
        return _table(self.prediction == "lcm", self.zsnr)

    @property
    def sigma_min(self) -> float:
        return float(self.table.float()[0])

    @property
    def sigma_max(self) -> float:
        return float(self.table.float()[-1])

    @property
    def continuous(self) -> bool:
        """Whether timesteps are a function of sigma (ContinuousEDM) rather than table indices."""
        return False

    def percent_to_sigma(self, percent: float) -> float:
        """The model's percent_to_sigma (module function `percent_to_sigma`)."""
        return _discrete_percent_to_sigma(percent, self)

    def timestep(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """ModelSampling.timestep: the table entry nearest in log-sigma, as a training timestep (float)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log().reshape(-1) - self.table.log().float()[:, None]
        index = dists.abs().argmin(dim=0).view(sigma.shape)
        return (index * self.skip_steps + (self.skip_steps - 1)).float()

    def model_input(self, scaled: torch.Tensor, sigma: float) -> torch.Tensor:
        """What the UNet sees, given x / sqrt(sigma^2 + 1) (EPS.calculate_input, which every type but
        img_to_img keeps; IMG_TO_IMG feeds x itself)."""
        return scaled * math.sqrt(sigma**2 + 1.0) if self.prediction == "img_to_img" else scaled

    def to_eps(self, output: torch.Tensor, scaled: torch.Tensor, sigma: float) -> torch.Tensor:
        """The noise prediction whose x - sigma * eps is ComfyUI's calculate_denoised of `output`.

        `scaled` is the sampler's x / sqrt(sigma^2 + 1) (broadcast against `output`), `sigma` the call's sigma.
        """
        if self.prediction == "eps":
            return output  # EPS.calculate_denoised is x - output * sigma: the output is the eps, unchanged
        root = math.sqrt(sigma**2 + 1.0)
        if self.prediction == "v_prediction":
            # V_PREDICTION (sigma_data 1): D = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1); with
            # x = scaled * sqrt(sigma^2 + 1), (x - D) / sigma simplifies to (sigma * scaled + v) / sqrt(sigma^2 + 1)
            return (scaled * sigma + output) / root
        x = scaled * root
        if self.prediction == "lcm":
            # LCM.calculate_denoised: the consistency boundary condition on the EPS x0, at the distilled timestep
            t = float(self.timestep(sigma)) * _LCM_TIMESTEP_SCALING
            c_skip = _LCM_SIGMA_DATA**2 / (t**2 + _LCM_SIGMA_DATA**2)
            c_out = t / (t**2 + _LCM_SIGMA_DATA**2) ** 0.5
            denoised = c_out * (x - output * sigma) + c_skip * x
        else:  # x0, img_to_img: the output is the denoised estimate
            denoised = output
        return (x - denoised) / sigma


@functools.lru_cache(maxsize=16)
def _edm_table(sigma_min: float, sigma_max: float) -> torch.Tensor:
    # ModelSamplingContinuousEDM.set_parameters: 1000 float32 sigmas, log-spaced ("for compatibility with some
    # schedulers"), the same numbers as ComfyUI's buffer
    return torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000).exp()


@dataclass(frozen=True)
class ContinuousEDM(ModelSampling):
    """ModelSamplingContinuousEDM: a continuous sigma range [sigma_low, sigma_high], the UNet timestep
    0.25 * log(sigma), and the prediction type's denoised estimate with EDM's sigma_data (0.5 for "edm", else 1).

    Every reader of a ModelSampling works on it: `.table` is ComfyUI's 1000 log-spaced sigmas (the "simple",
    "beta", "ddim_uniform" schedulers read them), `sigma_min` / `sigma_max` its ends (float32, as ComfyUI's
    buffer), `timestep` / `sigma_at` the continuous maps the "normal" and "sgm_uniform" schedulers step through.
    The inputs are the node's sigma_min / sigma_max (the names `sigma_min` / `sigma_max` are the table's ends).
    """

    prediction: str = "v_prediction"
    sigma_low: float = 0.002
    sigma_high: float = 120.0

    def __post_init__(self) -> None:
        if self.prediction not in EDM_PREDICTIONS:
            raise ValueError(f"unknown continuous EDM sampling {self.prediction!r}; ComfyUI's are "
                             f"{', '.join(EDM_PREDICTIONS)}")
        if self.prediction in EDM_REFUSED:
            raise ValueError(f"ModelSamplingContinuousEDM sampling {self.prediction!r} is not supported: "
                             f"{EDM_REFUSED[self.prediction]}; use one of "
                             f"{', '.join(p for p in EDM_PREDICTIONS if p not in EDM_REFUSED)}")
        if not (0.0 < self.sigma_low < self.sigma_high and math.isfinite(self.sigma_high)):
            raise ValueError(f"ModelSamplingContinuousEDM needs 0 < sigma_min < sigma_max (its sigmas are "
                             f"log-spaced between them), got sigma_min {self.sigma_low:g} and sigma_max "
                             f"{self.sigma_high:g}")

    @property
    def sigma_data(self) -> float:
        return 0.5 if self.prediction == "edm" else 1.0

    @property
    def label(self) -> str:
        return f"{self.prediction} (continuous EDM {self.sigma_low:g}..{self.sigma_high:g})"

    @property
    def skip_steps(self) -> int:
        return 1

    @property
    def table(self) -> torch.Tensor:
        return _edm_table(self.sigma_low, self.sigma_high)

    @property
    def continuous(self) -> bool:
        return True

    def timestep(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """ModelSamplingContinuousEDM.timestep: 0.25 * log(sigma), a float (negative below sigma 1)."""
        return 0.25 * torch.as_tensor(sigma, dtype=torch.float32).log()

    def sigma_at(self, timestep: float | torch.Tensor) -> torch.Tensor:
        """ModelSamplingContinuousEDM.sigma: exp(timestep / 0.25)."""
        return (torch.as_tensor(timestep, dtype=torch.float32) / 0.25).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """ModelSamplingContinuousEDM.percent_to_sigma: log-linear between the table's ends."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        low = math.log(self.sigma_min)
        return math.exp((math.log(self.sigma_max) - low) * (1.0 - percent) + low)

    def model_input(self, scaled: torch.Tensor, sigma: float) -> torch.Tensor:
        """EPS.calculate_input with this sigma_data: x / sqrt(sigma^2 + sigma_data^2), from x / sqrt(sigma^2 + 1)."""
        if self.sigma_data == 1.0:
            return scaled
        return scaled * (math.sqrt(sigma**2 + 1.0) / math.sqrt(sigma**2 + self.sigma_data**2))

    def to_eps(self, output: torch.Tensor, scaled: torch.Tensor, sigma: float) -> torch.Tensor:
        if self.prediction == "eps":
            return output
        if self.prediction == "v_prediction":  # sigma_data 1: ModelSampling's own v-prediction conversion
            return super().to_eps(output, scaled, sigma)
        # EDM.calculate_denoised: x * sd^2 / (sigma^2 + sd^2) + out * sigma * sd / sqrt(sigma^2 + sd^2)
        data = self.sigma_data
        x = scaled * math.sqrt(sigma**2 + 1.0)
        denoised = x * (data**2 / (sigma**2 + data**2)) + output * (sigma * data / math.sqrt(sigma**2 + data**2))
        return (x - denoised) / sigma


DEFAULT_SAMPLING = ModelSampling()


def percent_to_sigma(percent: float, sampling: ModelSampling = DEFAULT_SAMPLING) -> float:
    """The sigma `percent` of the way through the model's sampling (its own percent_to_sigma); see
    `_discrete_percent_to_sigma` for a discrete model, ContinuousEDM.percent_to_sigma for a continuous one."""
    return sampling.percent_to_sigma(percent)


def _discrete_percent_to_sigma(percent: float, sampling: ModelSampling) -> float:
    """ModelSamplingDiscrete.percent_to_sigma on the model's own sampling: the sigma `percent` of the way through
    its 1000 training timesteps, interpolated in log-sigma between the table entries around timestep
    (1 - percent) * 999 (an LCM table, one entry per 20 timesteps, as ModelSamplingDiscreteDistilled.sigma).
    ControlNet windows and ConditioningSetTimestepRange's start/end are read through it, as ComfyUI's samplers.py
    reads both; 0 gives 999999999.9 and 1 gives 0, so [0, 1] holds every sigma."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    log_sigmas = sampling.table.log().float()  # ComfyUI's float32 log_sigmas buffer
    skip = sampling.skip_steps
    timestep = torch.tensor((1.0 - percent) * 999.0)
    t = torch.clamp((timestep - (skip - 1)) / skip, min=0, max=len(log_sigmas) - 1)
    w = t.frac()
    return float(((1 - w) * log_sigmas[t.floor().long()] + w * log_sigmas[t.ceil().long()]).exp())
