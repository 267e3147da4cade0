"""The Sampler* nodes with options: each makes a SAMPLER for SamplerCustom / SamplerCustomAdvanced, a ComfyUI sampler
name with the options its inputs set (eta, s_noise, solver_type, order, ...).

Names, inputs, defaults, ranges, categories and the sampler each picks are comfy_extras/nodes_custom_sampler.py
0.3.64's: noise_device "gpu" (the first choice, so ComfyUI's default) picks the `_gpu` twin, which draws its
Brownian noise on the model's device. The options are the keyword names of the sampler's step function
(engine/samplers/kdiffusion/, registered with ComfyUI's defaults), and SamplerCustom hands them to it; options equal
to the defaults of a sampler diffusers runs (euler_ancestral at eta 1, s_noise 1) stay on diffusers' scheduler.
Where ComfyUI hands a sampler a function (SamplerER_SDE's noise scaler, SamplerSASolver's tau), the options hold
the numbers that pick it, so a SAMPLER stays plain data that caches and compares by value.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from engine.nodes.base import Choice, Node, RunContext, Socket, register
from engine.samplers.kdiffusion import KDIFFUSION
from engine.samplers.kdiffusion.dpm_solver import adaptive_problems
from engine.samplers.kdiffusion.er_sde import SOLVER_TYPES as ER_SDE_SOLVER_TYPES
from engine.samplers.kdiffusion.er_sde import er_sde_options
from engine.settings import Limits
from engine.values import ModelRef, Sampler

__all__ = ["OptionsSampler"]

_CATEGORY = "sampling/custom_sampling/samplers"
_NOISE_DEVICES = ("gpu", "cpu")


def _amount(default: float, high: float = 100.0, *, description: str = "") -> Any:
    """A FLOAT option as ComfyUI declares eta and its kin: 0 up to `high`, step 0.01, no rounding."""
    return Field(default, ge=0.0, le=high, description=description, json_schema_extra={"step": 0.01, "round": False})


def _on(name: str, noise_device: str) -> str:
    return name if noise_device == "cpu" else f"{name}_gpu"


class OptionsSampler(Node):
    """A Sampler* node: `pick` turns its inputs into a sampler name and options, for `run` and for validation."""

    CATEGORY: ClassVar[str] = _CATEGORY
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("SAMPLER",)

    @classmethod
    def pick(cls, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def extra_problems(cls, name: str, options: dict[str, Any]) -> list[tuple[str, str]]:
        """What the options would do wrong that their ranges do not catch, as (input, message)."""
        return []

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        constants = {}
        for spec in cls.input_specs():
            if spec.is_socket:
                continue
            if spec.name not in values:
                return []  # a linked option: checked when the sampler runs
            constants[spec.name] = values[spec.name]
        name, options = cls.pick(constants)
        first = next(spec.name for spec in cls.input_specs() if not spec.is_socket)
        chooser = "noise_device" if "noise_device" in constants else first
        if name not in KDIFFUSION:
            return [(chooser, f"{cls.__name__} picks sampler {name!r}, which Noodle does not run")]
        try:
            KDIFFUSION[name].options(options)
        except ValueError as err:
            return [(first, str(err))]
        return cls.extra_problems(name, options)

    def run(self, ctx: RunContext) -> tuple[Sampler]:
        values = {name: getattr(self, name) for name in type(self).model_fields}
        name, options = self.pick(values)
        return (Sampler(name, tuple(sorted(options.items()))),)


@register
class SamplerDPMPP_3M_SDE(OptionsSampler):  # noqa: N801  (ComfyUI's class_type)
    """DPM-Solver++(3M) SDE with its eta and s_noise; noise_device picks where its Brownian noise is drawn."""

    eta: float = _amount(1.0)
    s_noise: float = _amount(1.0)
    noise_device: str = Choice(_NOISE_DEVICES)

    @classmethod
    def pick(cls, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return _on("dpmpp_3m_sde", values["noise_device"]), {"eta": values["eta"], "s_noise": values["s_noise"]}


@register
class SamplerDPMPP_2M_SDE(OptionsSampler):  # noqa: N801
    """DPM-Solver++(2M) SDE with its solver_type (midpoint or heun), eta and s_noise; noise on the gpu or the cpu."""

    solver_type: str = Choice(("midpoint", "heun"))
    eta: float = _amount(1.0)
    s_noise: float = _amount(1.0)
    noise_device: str = Choice(_NOISE_DEVICES)

    @classmethod
    def pick(cls, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        # heun is an option of dpmpp_2m_sde here, not the dpmpp_2m_sde_heun name, as ComfyUI's node has it
        return _on("dpmpp_2m_sde", values["noise_device"]), {
            "eta": values["eta"], "s_noise": values["s_noise"], "solver_type": values["solver_type"]}


@register
class SamplerDPMPP_SDE(OptionsSampler):  # noqa: N801
    """DPM-Solver++ SDE with its eta, s_noise and midpoint r, on the gpu's noise or the cpu's."""

    eta: float = _amount(1.0)
    s_noise: float = _amount(1.0)
    r: float = _amount(0.5)
    noise_device: str = Choice(_NOISE_DEVICES)

    @classmethod
    def pick(cls, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return _on("dpmpp_sde", values["noise_device"]), {
            "eta": values["eta"], "s_noise": values["s_noise"], "r": values["r"]}


@register
class SamplerDPMPP_2S_Ancestral(OptionsSampler):  # noqa: N801
    """DPM-Solver++(2S) ancestral with its eta and s_noise."""

    eta: float = _amount(1.0)
    s_noise: float = _amount(1.0)

    @classmethod
    def pick(cls, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "dpmpp_2s_ancestral", {"eta": values["eta"], "s_noise": values["s_noise"]}


@register
class SamplerEulerAncestral(OptionsSampler):
    """Euler ancestral with its eta and s_noise."""

    eta: float = _amount(1.0)
    s_noise: float = _amount(1.0)

    @classmethod
    def pick(cls, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "euler_ancestral", {"eta": values["eta"], "s_noise": values["s_noise"]}


@register
class SamplerEulerAncestralCFGPP(OptionsSampler):
    """Euler ancestral CFG++ with its eta (up to 1) and s_noise (up to 10)."""

    eta: float = _amount(1.0, 1.0)
    s_noise: float = _amount(1.0, 10.0)

    @classmethod
    def pick(cls, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "euler_ancestral_cfg_pp", {"eta": values["eta"], "s_noise": values["s_noise"]}


@register
class SamplerLMS(OptionsSampler):
    """Linear multistep over the last `order` steps' slopes (KSampler's lms is order 4)."""

    order: int = Field(4, ge=1, le=100)

    @classmethod
    def pick(cls, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "lms", {"order": values["order"]}


@register
class SamplerDPMAdaptative(OptionsSampler):
    """DPM-Solver-23 (or -12) with adaptive step sizes: as many model calls as its error tolerances ask for."""

    order: int = Field(3, ge=2, le=3)
    rtol: float = _amount(0.05)
    atol: float = _amount(0.0078)
    h_init: float = _amount(0.05)
    pcoeff: float = _amount(0.0)
    icoeff: float = _amount(1.0)
    dcoeff: float = _amount(0.0)
    accept_safety: float = _amount(0.81)
    eta: float = _amount(0.0)
    s_noise: float = _amount(1.0)

    @classmethod
    def pick(cls, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "dpm_adaptive", {name: values[name] for name in cls.model_fields}

    @classmethod
    def extra_problems(cls, name: str, options: dict[str, Any]) -> list[tuple[str, str]]:
        # ComfyUI loops forever on these; Noodle would stop at its model-call budget, so say it before the run
        return adaptive_problems(options["order"], options["rtol"], options["atol"], options["h_init"],
                                 options["accept_safety"])


@register
class SamplerER_SDE(OptionsSampler):  # noqa: N801
    """ER-SDE-Solver: the ER-SDE noise scaler, the reverse-time SDE's at eta, or the ODE; up to max_stage stages."""

    solver_type: str = Choice(ER_SDE_SOLVER_TYPES)
    max_stage: int = Field(3, ge=1, le=3)
    eta: float = _amount(1.0, description="Stochastic strength of reverse-time SDE.\nWhen eta=0, it reduces to "
                                          "deterministic ODE. This setting doesn't apply to ER-SDE solver type.")
    s_noise: float = _amount(1.0)

    @classmethod
    def pick(cls, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "er_sde", er_sde_options(values["solver_type"], values["max_stage"], values["eta"], values["s_noise"])


@register
class SamplerSASolver(OptionsSampler):
    """SA-Solver, stochastic Adams predictor-corrector: eta inside the sde window of percents, 0 outside it."""

    model: ModelRef = Socket("MODEL")
    eta: float = _amount(1.0, 10.0)
    sde_start_percent: float = Field(0.2, ge=0.0, le=1.0, json_schema_extra={"step": 0.001})
    sde_end_percent: float = Field(0.8, ge=0.0, le=1.0, json_schema_extra={"step": 0.001})
    s_noise: float = _amount(1.0)
    predictor_order: int = Field(3, ge=1, le=6)
    corrector_order: int = Field(4, ge=0, le=6)
    use_pece: bool = Field(...)
    simple_order_2: bool = Field(...)

    @classmethod
    def pick(cls, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        # ComfyUI turns the percents into sigmas with this node's model; the step does it with the sampled model's
        # sampling, the same one wherever this MODEL is also the one sampled
        names = ("eta", "sde_start_percent", "sde_end_percent", "s_noise", "predictor_order", "corrector_order",
                 "use_pece", "simple_order_2")
        return "sa_solver", {name: values[name] for name in names}
