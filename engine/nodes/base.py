"""The node base class and catalog: a node is one small typed class, and the class is the single source.

A node's pydantic fields are its inputs, with ComfyUI's names, defaults and ranges; `@register`
puts the class in `Node.registry` under its ComfyUI `class_type`. Validation, the executor and
`noodle nodes` (an `/object_info`-shaped export) all read `Node.input_specs()`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import annotated_types
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import JobCancelled
from engine.input_folder import INPUT_FOLDERS

if TYPE_CHECKING:
    import torch

    from engine.models.manager import ModelManager
    from engine.models.paths import FolderLookup
    from engine.settings import Limits

# ComfyUI's MAX_RESOLUTION; config.toml's limits are checked separately and are tighter.
MAX_RESOLUTION = 16384
SEED_MAX = 2**64 - 1
PRIMITIVE_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
# Folders a COMBO input can list: the models folders plus the input folder's two listings (engine/input_folder.py).
CHOICE_FOLDERS = ("checkpoints", "loras", "vae", "embeddings", *INPUT_FOLDERS)


def Socket(type_name: str, *, optional: bool = False, description: str = "") -> Any:  # noqa: N802
    """A linked input carrying a value of ComfyUI type `type_name` (MODEL, CLIP, LATENT ...)."""
    return Field(None if optional else ..., description=description, json_schema_extra={"socket": type_name})


def Choice(options: Sequence[str] | str, default: str | None = None, *, description: str = "") -> Any:  # noqa: N802
    """A COMBO input: a fixed list of options, or the name of a folder whose files are the options."""
    extra: dict[str, Any] = {"choices_from": options} if isinstance(options, str) else {"choices": list(options)}
    return Field(... if default is None else default, description=description, json_schema_extra=extra)


def Text(default: str = "", *, multiline: bool = False, description: str = "") -> Any:  # noqa: N802
    """A STRING input; multiline ones are prompt boxes in ComfyUI's UI."""
    return Field(default, description=description, json_schema_extra={"multiline": multiline})


@dataclass(frozen=True)
class InputSpec:
    """One input of a node, read off its pydantic field."""

    name: str
    type: str  # INT, FLOAT, STRING, BOOLEAN, COMBO or a socket type such as MODEL
    required: bool
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None
    choices_from: str | None = None
    multiline: bool = False
    description: str = ""

    @property
    def is_socket(self) -> bool:
        return self.type not in PRIMITIVE_TYPES and self.type != "COMBO"

    def comfy_entry(self, choices: Sequence[str] | None = None) -> tuple[Any, ...]:
        """This input as ComfyUI's INPUT_TYPES writes it: `("INT", {"default": 20, "min": 1})`."""
        if self.type == "COMBO":
            return (list(choices if choices is not None else self.choices or ()),)
        if self.is_socket:
            return (self.type,)
        options: dict[str, Any] = {}
        if self.default is not None:
            options["default"] = self.default
        for key in ("min", "max", "step"):
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
        if self.multiline:
            options["multiline"] = True
        return (self.type, options)


@dataclass(frozen=True)
class Output:
    """What an output node returns: its socket values and the `ui` entry of ComfyUI's history."""

    values: tuple[Any, ...] = ()
    ui: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunMeta:
    """What a run reports beside its outputs: seeds, token usage, timings, cache hits."""

    seeds: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)
    models: dict[str, Any] = field(default_factory=dict)
    # per text-encode node: "hit" when the prompt encoder's cache served it, else "miss"
    encoder_cache: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seeds": dict(self.seeds),
            "tokens": dict(self.tokens),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "cached": list(self.cached),
            "models": dict(self.models),
            "encoder_cache": dict(self.encoder_cache),
        }


@dataclass
class RunContext:
    """Everything a node may touch while it runs: models, device, folders, progress, cancel flag."""

    node_id: str
    prompt_id: str
    prompt: dict[str, Any]
    models: ModelManager
    device: torch.device
    dtype: torch.dtype
    input_dir: Path
    output_dir: Path
    meta: RunMeta
    limits: Limits
    temp_dir: Path
    report_progress: Callable[[str, int, int], None] = lambda node, value, total: None
    is_cancelled: Callable[[], bool] = lambda: False
    prompt_weighting: str = "comfy"
    prompt_syntax: str = "noodle"

    def check_cancelled(self) -> None:
        """Raise JobCancelled when an interrupt was asked for; called at every sampler step."""
        if self.is_cancelled():
            raise JobCancelled(f"interrupted at node {self.node_id}")

    def progress(self, value: int, total: int) -> None:
        """Report a step of the current node, then honour an interrupt."""
        self.report_progress(self.node_id, value, total)
        self.check_cancelled()


class Node(BaseModel):
    """Base of every node; subclasses declare inputs as fields and implement `run`."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="ignore", frozen=True)

    CATEGORY: ClassVar[str] = ""
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ()
    RETURN_NAMES: ClassVar[tuple[str, ...]] = ()
    OUTPUT_NODE: ClassVar[bool] = False
    DESCRIPTION: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Node]]] = {}

    def run(self, ctx: RunContext) -> tuple[Any, ...] | Output:
        raise NotImplementedError

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], ctx_paths: FolderLookup) -> str | None:
        """Something that changes when a file this node reads changes (ComfyUI's IS_CHANGED)."""
        return None

    @classmethod
    def check_linked(cls, name: str, value: Any) -> None:
        """Hold a number another node made (a FLOAT output linked into a FLOAT input) to this input's range, as
        validation holds a constant: raises ValueError naming both. ComfyUI checks only constants, so a linked 0
        blur sigma drew a NaN picture there and a 1e9 area percentage failed in the sampler."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return  # a socket's value (MODEL, LATENT ...), a string, a bool: nothing to hold to a range
        spec = next((s for s in cls.input_specs() if s.name == name), None)
        if spec is None or spec.type not in ("INT", "FLOAT"):
            return
        if not math.isfinite(value) or (spec.min is not None and value < spec.min) \
                or (spec.max is not None and value > spec.max):
            low = "" if spec.min is None else f" from {spec.min:g}"
            high = "" if spec.max is None else f" up to {spec.max:g}"
            raise ValueError(f"{name}: the linked value {value:g} is outside what {cls.__name__} takes (finite"
                             f"{low}{high}); change the node that makes it")

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        """Checks across constant inputs beyond ranges (config limits, sampler pairs): (input, message)."""
        return []

    @classmethod
    def input_specs(cls) -> list[InputSpec]:
        """The inputs in declaration order, from the pydantic fields."""
        return _specs_of(cls)


NodeT = TypeVar("NodeT", bound=type[Node])


def register(cls: NodeT) -> NodeT:
    """Put a node class into the catalog under its class name (ComfyUI's class_type)."""
    if cls.run is Node.run:
        raise TypeError(f"node {cls.__name__} must implement run()")
    if not cls.RETURN_TYPES and not cls.OUTPUT_NODE:
        raise TypeError(f"node {cls.__name__} returns nothing and is not an output node")
    if cls.__name__ in Node.registry:
        raise TypeError(f"node {cls.__name__} is registered twice")
    Node.registry[cls.__name__] = cls
    _specs_of(cls)  # fail at import, not at the first run, on a field we cannot describe
    return cls


_SPEC_CACHE: dict[type[Node], list[InputSpec]] = {}
_PRIMITIVE_OF = {int: "INT", float: "FLOAT", str: "STRING", bool: "BOOLEAN"}


def _specs_of(cls: type[Node]) -> list[InputSpec]:
    if cls in _SPEC_CACHE:
        return _SPEC_CACHE[cls]
    specs = []
    for name, info in cls.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        default = None if info.is_required() else info.default
        if "socket" in extra:
            specs.append(InputSpec(name, str(extra["socket"]), info.is_required(), description=info.description or ""))
            continue
        if "choices" in extra or "choices_from" in extra:
            choices = tuple(extra["choices"]) if "choices" in extra else None  # type: ignore[arg-type]
            specs.append(InputSpec(name, "COMBO", True, default, choices=choices,
                                   choices_from=extra.get("choices_from"), description=info.description or ""))  # type: ignore[arg-type]
            continue
        kind = _PRIMITIVE_OF.get(info.annotation)  # type: ignore[arg-type]
        if kind is None:
            raise TypeError(f"{cls.__name__}.{name}: annotate inputs as int, float, str or bool, or use Socket/Choice")
        low = high = None
        for item in info.metadata:
            if isinstance(item, annotated_types.Ge):
                low = item.ge
            elif isinstance(item, annotated_types.Le):
                high = item.le
        # {"optional": True}: ComfyUI declares the input under "optional" (an older export may leave it out)
        specs.append(InputSpec(name, kind, not extra.get("optional"), default, low, high,  # type: ignore[arg-type]
                               extra.get("step"),  # type: ignore[arg-type]
                               multiline=bool(extra.get("multiline")), description=info.description or ""))
    _SPEC_CACHE[cls] = specs
    return specs
