"""ModelSamplingDiscrete: override how a MODEL's output is read (eps, v_prediction, lcm, x0, img_to_img) and its
sigma table (zsnr), as ComfyUI 0.3.64's comfy_extras/nodes_model_advanced.py does, on every architecture; and
ModelSamplingContinuousEDM: a continuous sigma range with EDM's timestep and denoising (v_prediction, edm, eps).

The node changes no weight: it returns the MODEL with a `ModelSampling` (engine/samplers/model_sampling.py) that the
KSamplers read for their sigmas, their UNet timesteps and the output's conversion. The override is part of the
ModelRef, so a sampler after it is a different node-cache entry, and the queue never batches such a graph with
one without it (engine/queue/batching.py runs any graph holding this node alone).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from engine.nodes.base import Choice, Node, RunContext, Socket, register
from engine.samplers.model_sampling import EDM_PREDICTIONS, PREDICTIONS, ContinuousEDM, ModelSampling
from engine.settings import Limits
from engine.values import ModelRef


@register
class ModelSamplingDiscrete(Node):
    """Sample the model as eps, v-prediction, LCM, x0 or img_to_img, optionally with zero terminal SNR."""

    CATEGORY: ClassVar[str] = "advanced/model"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)

    model: ModelRef = Socket("MODEL")
    sampling: str = Choice(PREDICTIONS)
    zsnr: bool = False

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        sampling = ModelSampling(self.sampling, self.zsnr)
        ctx.meta.models.setdefault("model_sampling", {})[ctx.node_id] = sampling.label
        return (self.model.with_sampling(sampling),)


@register
class ModelSamplingContinuousEDM(Node):
    """Sample the model over a continuous sigma range (EDM's timestep 0.25 * log(sigma)) as v-prediction, EDM or
    eps; edm_playground_v2.5 and cosmos_rflow are refused with the reason."""

    CATEGORY: ClassVar[str] = "advanced/model"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)

    model: ModelRef = Socket("MODEL")
    sampling: str = Choice(EDM_PREDICTIONS)
    sigma_max: float = Field(120.0, ge=0.0, le=1000.0, json_schema_extra={"step": 0.001, "round": False})
    sigma_min: float = Field(0.002, ge=0.0, le=1000.0, json_schema_extra={"step": 0.001, "round": False})

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        known = [values.get(name) for name in ("sampling", "sigma_min", "sigma_max")]
        if any(value is None for value in known):
            return []  # a linked input: checked when the node runs
        try:
            cls._sampling(*known)
        except ValueError as err:
            return [("sampling" if "is not supported" in str(err) else "sigma_min", str(err))]
        return []

    @staticmethod
    def _sampling(sampling: str, sigma_min: float, sigma_max: float) -> ContinuousEDM:
        return ContinuousEDM(prediction=sampling, sigma_low=sigma_min, sigma_high=sigma_max)

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        sampling = self._sampling(self.sampling, self.sigma_min, self.sigma_max)
        ctx.meta.models.setdefault("model_sampling", {})[ctx.node_id] = sampling.label
        return (self.model.with_sampling(sampling),)
