"""The shapes the cost check follows through a graph (engine/cost/): what a LATENT, IMAGE, CONDITIONING or
UPSCALE_MODEL value will be, and `Step`, one node's view while its rule (engine/cost/rules.py) makes its outputs'.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.nodes.base import Node
from engine.settings import Limits

__all__ = ["LIMIT_EXCEEDED", "Cond", "GuiderConds", "Pictures", "Shape", "SigmaCount", "Step", "Upscaler"]

LIMIT_EXCEEDED = "limit_exceeded"  # our error type, beside ComfyUI's (engine.validate.ERROR_TYPES)


@dataclass(frozen=True)
class Pictures:
    """The shape of a LATENT, IMAGE or MASK value: `batch` items of width x height pixels (a latent's cells x 8)."""

    kind: str  # "LATENT", "IMAGE" or "MASK"
    batch: int
    width: int
    height: int


@dataclass(frozen=True)
class Cond:
    """The shape of a CONDITIONING value: its items, the first one's tokens, and every item length in it."""

    items: int
    first: int  # ConditioningConcat appends the first item of its `conditioning_from`
    lengths: frozenset[int]


@dataclass(frozen=True)
class Upscaler:
    """The shape of an UPSCALE_MODEL value: how many times it grows each side (read from the file's header)."""

    scale: int


@dataclass(frozen=True)
class SigmaCount:
    """The shape of a SIGMAS value: how many sigmas it holds (a sampler along it runs one step fewer)."""

    length: int


@dataclass(frozen=True)
class GuiderConds:
    """The shape of a GUIDER value: the item lengths of the conds its model calls take (cfg 1: the positive's)."""

    lengths: frozenset[int]


Shape = Pictures | Cond | Upscaler | SigmaCount | GuiderConds | None  # None: no shape (MODEL, VAE ...), not known, or already over a limit


@dataclass
class Step:
    """One node while the shapes are followed: its constants, its linked inputs' shapes, what it adds."""

    cls: type[Node]
    constants: Mapping[str, Any]
    inputs: Mapping[str, Shape]
    limits: Limits
    steps: int = 0  # sampler steps this node runs
    writes: int = 0  # images this node writes
    context: int = 0  # a sampler's text context, in tokens
    errors: list[dict[str, Any]] = field(default_factory=list)

    def const(self, name: str) -> Any:
        """A constant input, or the node's default for it."""
        return self.constants[name] if name in self.constants else self.cls.model_fields[name].default

    def pictures(self, name: str) -> Pictures | None:
        value = self.inputs.get(name)
        return value if isinstance(value, Pictures) else None

    def cond(self, name: str) -> Cond | None:
        value = self.inputs.get(name)
        return value if isinstance(value, Cond) else None

    def refuse_empty(self, what: str, fix: str) -> None:
        """Add a refusal of a shape too small to compute on: not a server's limit (nothing could run it), so it is
        ComfyUI's type for a node's own check of its inputs."""
        self.errors.append({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                            "details": f"{what}: {fix}", "extra_info": {}})

    def refuse(self, limit: str, got: int, what: str, fix: str, input_name: str | None = None, per: str = "") -> None:
        """Add a refusal: `what` the node does, then the limit (`per` side, job ...), then `fix`."""
        allowed = getattr(self.limits, limit)
        self.errors.append({
            "type": LIMIT_EXCEEDED, "message": "Over this server's limits",
            "details": f"{what}; this server's limit is {allowed:,}{per} (limits.{limit} in config.toml): {fix}",
            "extra_info": {"input_name": input_name, "limit": limit, "limit_value": allowed, "received_value": got}})
