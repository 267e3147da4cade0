"""Nodes shaped like ComfyUI's core nodes in a local registry, and helpers, for the validation tests."""

from __future__ import annotations

import copy
import json
import math
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field

from engine.errors import WorkflowInvalid
from engine.graph import topological_order, upstream
from engine.nodes.base import SEED_MAX, Choice, Node, Socket, Text
from engine.settings import Limits
from engine.validate import ERROR_TYPES, ValidatedPrompt, validate

SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m"]


class CheckpointLoaderSimple(Node):
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL", "CLIP", "VAE")
    ckpt_name: str = Choice("checkpoints")


class CLIPTextEncode(Node):
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)
    text: str = Text(multiline=True)
    clip: Any = Socket("CLIP")


class EmptyLatentImage(Node):
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)
    width: int = Field(512, ge=16, le=16384, json_schema_extra={"step": 8})
    height: int = Field(512, ge=16, le=16384, json_schema_extra={"step": 8})
    batch_size: int = Field(1, ge=1, le=4096)

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        # reads values["width"] unguarded: it must only be called once every constant passed
        return [(side, f"{values[side]} is above this server's limit of {limits.max_side}")
                for side in ("width", "height") if values[side] > limits.max_side]


class KSampler(Node):
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)
    model: Any = Socket("MODEL")
    seed: int = Field(0, ge=0, le=SEED_MAX)
    steps: int = Field(20, ge=1, le=10000)
    cfg: float = Field(8.0, ge=0.0, le=100.0, json_schema_extra={"step": 0.1})
    sampler_name: str = Choice(SAMPLERS)
    scheduler: str = Choice(["normal", "karras", "simple"])
    positive: Any = Socket("CONDITIONING")
    negative: Any = Socket("CONDITIONING")
    latent_image: Any = Socket("LATENT")
    denoise: float = Field(1.0, ge=0.0, le=1.0)


class VAEDecode(Node):
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)
    samples: Any = Socket("LATENT")
    vae: Any = Socket("VAE")


class VAELoader(Node):
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("VAE",)
    vae_name: str = Choice("vae")


class SaveImage(Node):
    OUTPUT_NODE: ClassVar[bool] = True
    images: Any = Socket("IMAGE")
    filename_prefix: str = Text("ComfyUI")


class PreviewImage(Node):
    OUTPUT_NODE: ClassVar[bool] = True
    images: Any = Socket("IMAGE")


class Flaky(Node):
    """A node whose own check raises, as a buggy custom node's VALIDATE_INPUTS would."""

    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE", "LATENT,IMAGE")
    images: Any = Socket("IMAGE")
    mode: str = Text("fine")
    flag: bool = False
    optional_latent: Any = Socket("LATENT", optional=True)

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        if values.get("mode") == "explode":
            raise ValueError("mode exploded")
        return []


REGISTRY: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, VAELoader, SaveImage,
    PreviewImage, Flaky)}
FOLDERS = {"checkpoints": ["sd15.safetensors", "sdxl.safetensors"], "vae": [f"vae{i:02}.safetensors" for i in range(25)]}
LIMITS = Limits(max_side=1024)

TXT2IMG: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 42, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "fox"}},
}
KSAMPLER_STEPS = ["INT", {"default": 20, "min": 1, "max": 10000}]
KSAMPLER_CFG = ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}]


def run(workflow: Any) -> ValidatedPrompt:
    return validate(workflow, REGISTRY, FOLDERS.__getitem__, LIMITS)


DROP = object()


def edited(**changes: dict[str, Any]) -> dict[str, Any]:
    """TXT2IMG with some inputs replaced: edited(**{"3": {"steps": 0}}); DROP removes the input."""
    workflow = copy.deepcopy(TXT2IMG)
    for node_id, inputs in changes.items():
        for name, value in inputs.items():
            if value is DROP:
                workflow[node_id]["inputs"].pop(name)
            else:
                workflow[node_id]["inputs"][name] = value
    return workflow


def flaky(images: list[Any], mode: str = "fine", **inputs: Any) -> dict[str, Any]:
    return {"class_type": "Flaky", "inputs": {"images": images, "mode": mode, "flag": False, **inputs}}


def refused(workflow: Any) -> dict[str, Any]:
    with pytest.raises(WorkflowInvalid) as caught:
        run(workflow)
    assert_body_shape(caught.value.body)
    return caught.value.body


def failed_on(workflow: Any, node_id: str, outputs: list[str] | None = None) -> list[dict[str, Any]]:
    """The errors of one node, after checking the top-level error ComfyUI sends with them."""
    body = refused(workflow)
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["error"]["message"] == "Prompt outputs failed validation"
    assert list(body["node_errors"]) == [node_id]
    entry = body["node_errors"][node_id]
    assert entry["dependent_outputs"] == (outputs or ["9"])
    assert entry["class_type"] == workflow[node_id]["class_type"]
    return entry["errors"]


ERROR_KEYS = {"type", "message", "details", "extra_info"}
PROMPT_TYPES = {"invalid_prompt", "prompt_no_outputs", "prompt_outputs_failed_validation"}


def assert_node_errors_shape(node_errors: Any, workflow_outputs: set[str] | None = None) -> None:
    assert isinstance(node_errors, dict)
    for node_id, entry in node_errors.items():
        assert isinstance(node_id, str)
        assert set(entry) == {"errors", "dependent_outputs", "class_type"}
        assert isinstance(entry["class_type"], str)
        assert entry["errors"] and entry["dependent_outputs"]
        assert workflow_outputs is None or set(entry["dependent_outputs"]) <= workflow_outputs
        for error in entry["errors"]:
            assert set(error) == ERROR_KEYS
            assert error["type"] in ERROR_TYPES - PROMPT_TYPES
            assert isinstance(error["message"], str) and isinstance(error["details"], str)
            assert isinstance(error["extra_info"], dict)


def assert_body_shape(body: Any) -> None:
    assert set(body) == {"error", "node_errors"}
    assert set(body["error"]) == ERROR_KEYS
    assert body["error"]["type"] in PROMPT_TYPES
    assert isinstance(body["error"]["details"], str) and body["error"]["extra_info"] == {}
    assert_node_errors_shape(body["node_errors"])
    assert bool(body["node_errors"]) == (body["error"]["type"] == "prompt_outputs_failed_validation")
    json.dumps(body)  # what the API sends back
