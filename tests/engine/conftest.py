"""Engine fixtures: one executor over the tiny models for the whole session (models load once)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from engine.executor import Executor
from engine.templates import LoraChoice, WorkflowParams, build_workflow
from tests.conftest import tiny_executor


@pytest.fixture(scope="session")
def executor(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    return tiny_executor(tiny_models, tmp_path_factory.mktemp("engine"))


def txt2img(**overrides: Any) -> dict[str, Any]:
    """The template's txt2img graph on tiny SD1.5: 64x64, 4 steps."""
    loras = tuple(LoraChoice(*l) if isinstance(l, tuple) else l for l in overrides.pop("loras", ()))
    base = {"checkpoint": "tiny-sd15.safetensors", "prompt": "a red fox in the snow", "negative": "blurry",
            "seed": 42, "steps": 4, "cfg": 7.0, "width": 64, "height": 64, "loras": loras}
    return build_workflow(WorkflowParams(**{**base, **overrides}))


def with_changes(workflow: dict[str, Any], node: str, **inputs: Any) -> dict[str, Any]:
    changed = copy.deepcopy(workflow)
    changed[node]["inputs"].update(inputs)
    return changed
