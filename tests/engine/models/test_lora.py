"""LoRA adapters on loaded modules: which adapter a job runs after a refused load, and how many are kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import NodeExecutionError
from engine.executor import Executor
from tests.conftest import tiny_executor
from tests.engine.conftest import txt2img

LORA_A = ("tiny-lora-a.safetensors", 1.0, 1.0)
LORA_B = ("tiny-lora-b.safetensors", 1.0, 1.0)
LORA_SDXL = ("tiny-lora-sdxl.safetensors", 1.0, 1.0)


def picture(executor: Executor, **overrides: object) -> np.ndarray:
    [image] = executor.run(txt2img(**overrides)).outputs["9"]["images"]
    return np.asarray(Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"]))


def test_a_refused_lora_leaves_the_next_job_on_the_adapter_it_asked_for(tiny_models: Path, tmp_path: Path) -> None:
    used = tiny_executor(tiny_models, tmp_path / "used")
    picture(used, seed=1, loras=(LORA_B,))
    picture(used, seed=2, loras=(LORA_A,))
    # diffusers rolls the failed load back and peft then activates whichever adapter sorts first
    with pytest.raises(NodeExecutionError, match="made for another model family"):
        used.run(txt2img(seed=5, loras=(LORA_SDXL,)))
    again = picture(used, seed=3, loras=(LORA_A,))

    fresh = picture(tiny_executor(tiny_models, tmp_path / "fresh"), seed=3, loras=(LORA_A,))
    assert np.array_equal(again, fresh)
