"""ModelSamplingDiscrete: override how a MODEL's output is read (eps, v_prediction, lcm, x0, img_to_img) and its
sigma table (zsnr), as ComfyUI 0.3.64's comfy_extras/nodes_model_advanced.py does, on every architecture.

The node changes no weight: it returns the MODEL with a `ModelSampling` (engine/samplers/model_sampling.py) that the
KSamplers read for their sigmas, their UNet timesteps and the output's conversion. The override is part of the
ModelRef, so a sampler after it is a different node-cache entry, and the queue never batches such a graph with
one without it (engine/queue/batching.py runs any graph holding this node alone).
"""

from __future__ import annotations

from typing import ClassVar

from engine.nodes.base import Choice, Node, RunContext, Socket, register
from engine.samplers.model_sampling import PREDICTIONS, ModelSampling
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
