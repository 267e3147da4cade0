"""HypernetworkLoader: an A1111 hypernetwork from the `hypernetworks` models folder on a MODEL, at a strength,
as ComfyUI 0.3.64's comfy_extras/nodes_hypernetwork.py (the file format: engine/models/hypernetwork.py).

Only .safetensors loads; a .pt is refused by the models catalog with how to convert it (`noodle convert`). The
patch joins the MODEL's UNet patches and is hooked into the shared UNet only while that MODEL samples.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from engine.models.hypernetwork import read_hypernetwork
from engine.models.paths import FolderLookup, file_fingerprint
from engine.nodes.base import Choice, Node, RunContext, Socket, register
from engine.values import ModelRef


@register
class HypernetworkLoader(Node):
    """Shift the UNet's attention keys and values with an A1111 hypernetwork, at a strength."""

    CATEGORY: ClassVar[str] = "loaders"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)

    model: ModelRef = Socket("MODEL")
    hypernetwork_name: str = Choice("hypernetworks")
    strength: float = Field(1.0, ge=-10.0, le=10.0, json_schema_extra={"step": 0.01})

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], lookup: FolderLookup) -> str | None:
        # a file replaced under the same name must not be served from the cache
        return file_fingerprint(lookup.resolve("hypernetworks", inputs["hypernetwork_name"]))

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        path = ctx.models.resolve("hypernetworks", self.hypernetwork_name)
        patch = read_hypernetwork(path, self.hypernetwork_name, self.strength)
        ctx.meta.models.setdefault("hypernetworks", {})[self.hypernetwork_name] = {"strength": self.strength}
        patches = self.model.patches
        return (self.model.with_patches(patches.replace(unet=(*patches.unet, patch))),)
