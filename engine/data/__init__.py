"""Data files the engine ships: ComfyUI 0.3.64's own node list, read from its source.

`comfyui_nodes.json` is written by `extract_comfy_nodes.py` (run it on a ComfyUI git directory when Noodle
follows a newer release) and says, per node class_type, whether stock ComfyUI has it built in (`nodes.py` and
the `comfy_extras/` files it loads) or as one of its paid API nodes, with its category and the model folders
its inputs list. Validation uses it to tell a built-in Noodle lacks from a custom node pack's node;
`noodle coverage` also reads the model folders.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Literal

__all__ = ["COMFYUI_VERSION", "ComfyNode", "comfyui_node", "comfyui_nodes"]

COMFYUI_VERSION = "0.3.64"


@dataclass(frozen=True)
class ComfyNode:
    """One node type of stock ComfyUI."""

    class_type: str
    kind: Literal["builtin", "api"]
    category: str  # ComfyUI's menu path, "conditioning/controlnet"; "" where the node declares none
    folders: tuple[str, ...]  # model folders its inputs list ("controlnet", "upscale_models" ...)
    source: str  # the ComfyUI file that defines it

    @property
    def python_module(self) -> str:
        """What ComfyUI's /object_info names as the node's python_module: "nodes" for nodes.py, else the
        comfy_extras module's dotted name ("comfy_extras.nodes_custom_sampler")."""
        stem = self.source.removesuffix(".py").replace("/", ".")
        return "nodes" if stem == "nodes" else stem

    @property
    def family(self) -> str:
        """How a person names what the node belongs to: its category, else its source file."""
        return self.category or self.source


@functools.cache
def comfyui_nodes() -> Mapping[str, ComfyNode]:
    """Every node type of ComfyUI 0.3.64, built-in and API, by class_type."""
    data = json.loads(resources.files(__package__).joinpath("comfyui_nodes.json").read_text(encoding="utf-8"))
    nodes: dict[str, ComfyNode] = {}
    for kind in ("builtin", "api"):
        for name, entry in data[kind].items():
            nodes[name] = ComfyNode(name, kind, entry["category"], tuple(entry["folders"]), entry["source"])
    return MappingProxyType(nodes)


def comfyui_node(class_type: str) -> ComfyNode | None:
    """The stock ComfyUI node of that class_type; None for a custom node pack's (or an unknown) name."""
    return comfyui_nodes().get(class_type)
