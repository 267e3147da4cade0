"""LoRA adapters on loaded modules: which adapter a job runs after a refused load, and how many are kept."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from engine.errors import NodeExecutionError
from engine.executor import Executor
from engine.models.lora import MAX_ADAPTERS
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


def lora_folder_executor(tiny_models: Path, root: Path, copies: int) -> Executor:
    """An executor over the tiny checkpoints and a loras folder of `copies` copies of tiny-lora-a, lora-0 ..."""
    models = root / "models"
    (models / "loras").mkdir(parents=True)
    (models / "checkpoints").symlink_to(tiny_models / "checkpoints", target_is_directory=True)
    for i in range(copies):
        shutil.copyfile(tiny_models / "loras" / "tiny-lora-a.safetensors", models / "loras" / f"lora-{i}.safetensors")
    return tiny_executor(models, root / "run")


def weights_bytes(modules: list[torch.nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def test_a_resaved_lora_replaces_its_adapter_and_the_budget_counts_adapters(tiny_models: Path,
                                                                              tmp_path: Path) -> None:
    executor = lora_folder_executor(tiny_models, tmp_path, copies=1)
    executor.run(txt2img(steps=1))
    checkpoint = executor.models.checkpoint("tiny-sd15.safetensors")
    bare = checkpoint.nbytes
    path = executor.models.resolve("loras", "lora-0.safetensors")
    for i in range(4):
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the owner saves it again
        executor.run(txt2img(steps=1, seed=i, loras=(("lora-0.safetensors", 1.0, 1.0),)))
        pipe = checkpoint.pipe
        # the earlier states' adapters can never be asked for again: only the current one stays
        assert list(pipe.unet.peft_config) == [executor.models.lora_key("lora-0.safetensors")]
        assert len(pipe.text_encoder.peft_config) == 1
        modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
        assert checkpoint.nbytes == weights_bytes(modules) > bare
        assert executor.models.resident_bytes() == checkpoint.nbytes
    assert executor.models.stats_snapshot()["lora_removals"] == 2 * 3  # UNet and text encoder, three re-saves


def test_adapters_kept_per_module_are_bounded_least_recently_used_first(tiny_models: Path, tmp_path: Path) -> None:
    executor = lora_folder_executor(tiny_models, tmp_path, copies=MAX_ADAPTERS + 2)
    names = [f"lora-{i}.safetensors" for i in range(MAX_ADAPTERS + 2)]
    for name in names:
        executor.run(txt2img(steps=1, loras=((name, 1.0, 1.0),)))
    unet = executor.models.checkpoint("tiny-sd15.safetensors").pipe.unet
    assert list(unet.peft_config) == [executor.models.lora_key(n) for n in names[2:]]
    # a removed LoRA loads again when asked for, and gives the picture it gave before it was removed
    first = picture(executor, steps=1, seed=9, loras=((names[0], 1.0, 1.0),))
    fresh = picture(lora_folder_executor(tiny_models, tmp_path / "fresh", copies=1), steps=1, seed=9,
                    loras=((names[0], 1.0, 1.0),))
    assert np.array_equal(first, fresh)


def test_text_encoder_keys_that_name_no_layer_are_refused_in_words(tiny_models: Path, tmp_path: Path) -> None:
    executor = lora_folder_executor(tiny_models, tmp_path, copies=0)
    state = load_file(str(tiny_models / "loras" / "tiny-lora-a.safetensors"))
    # the UNet's keys as they were, the text encoder's naming no layer of it
    save_file({k.replace("lora_te_", "lora_te_zzz_"): v for k, v in state.items()},
              str(tmp_path / "models" / "loras" / "half.safetensors"))
    with pytest.raises(NodeExecutionError, match="LoRA 'half.safetensors' does not fit checkpoint 'tiny-sd15.safetensors'"
                                                 ": the LoRA matched no layer of the text encoder"):
        executor.run(txt2img(steps=1, loras=(("half.safetensors", 1.0, 1.0),)))
    assert executor.run(txt2img(steps=1)).outputs["9"]
