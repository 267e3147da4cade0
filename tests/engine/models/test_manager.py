"""The model manager's budget: what a refused checkpoint leaves loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engine.errors import NodeExecutionError
from engine.executor import create_executor
from engine.settings import EngineSettings, Limits, ModelsSettings
from tests.engine.conftest import txt2img

GOOD = "tiny-sd15.safetensors"


def test_a_checkpoint_whose_header_lacks_weights_is_refused_before_anything_is_evicted(
        tiny_models: Path, tmp_path: Path) -> None:
    checkpoints = tmp_path / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copyfile(tiny_models / "checkpoints" / GOOD, checkpoints / GOOD)
    state = load_file(str(checkpoints / GOOD))
    save_file({k: v for k, v in state.items() if not k.startswith("first_stage_model.decoder.")},
              str(checkpoints / "no-decoder.safetensors"))
    # room for one tiny checkpoint (12 MB), not for it and the broken file's size
    settings = EngineSettings(output_dir=tmp_path / "output", input_dir=tmp_path / "input", device="cpu",
                              model_memory_bytes=20_000_000)
    executor = create_executor(ModelsSettings(dir=tmp_path / "models"), settings, Limits())
    executor.run(txt2img(steps=1))

    with pytest.raises(NodeExecutionError, match=r"'no-decoder.safetensors'.*weights missing \(first_stage_model"):
        executor.run(txt2img(steps=1, checkpoint="no-decoder.safetensors"))
    assert executor.models.loaded_names() == [GOOD]
    assert executor.models.stats.evictions == 0

    executor.run(txt2img(steps=1, seed=7))
    assert executor.models.stats.misses == 2  # the good one and the refused one: no reload
