"""Upscale-model and image-scale nodes on the tiny upscalers, end to end: LoadImage -> UpscaleModelLoader ->
ImageUpscaleWithModel -> SaveImage gives PNGs at the model's scale, sizes past [limits] are refused before
anything runs, the tile follows [limits] upscale_tile_pixels, and a loaded upscaler is reused and budgeted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from engine.cost import LIMIT_EXCEEDED, check_cost, validate_within_limits
from engine.errors import WorkflowInvalid
from engine.executor import Executor
from engine.models.manager import ModelManager
from engine.models.paths import ModelCatalog
from engine.models.upscale import tile_steps
from engine.nodes import catalog
from engine.nodes.base import RunContext, RunMeta
from engine.settings import Limits
from engine.values import ImageBatch
from tests.conftest import tiny_executor

CPU = torch.device("cpu")
SCALES = {"tiny-esrgan-x4.safetensors": 4, "tiny-realesrgan-x4.safetensors": 4, "tiny-compact-x2.safetensors": 2}


@pytest.fixture(scope="module")
def executor(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    """An executor of its own: the model manager's upscaler counters start at zero for this module."""
    return tiny_executor(tiny_models, tmp_path_factory.mktemp("upscale"))


def input_image(executor: Executor, name: str, width: int = 24, height: int = 16, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(executor.settings.input_dir / name)
    return name


def upscale_graph(image: str, model: str, prefix: str = "upscaled") -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }


def saved(executor: Executor, outputs: dict[str, Any], node: str = "9") -> Image.Image:
    [item] = outputs[node]["images"]
    return Image.open(executor.settings.output_dir / item["subfolder"] / item["filename"])


def refused(executor: Executor, workflow: dict[str, Any], limits: Limits) -> dict[str, Any]:
    with pytest.raises(WorkflowInvalid) as caught:
        validate_within_limits(workflow, catalog(), executor.models, limits)
    assert caught.value.body["error"]["type"] == LIMIT_EXCEEDED
    return caught.value.body["node_errors"]


@pytest.mark.parametrize("model", list(SCALES))
def test_a_tiny_upscaler_runs_end_to_end_at_its_scale(executor: Executor, model: str) -> None:
    image = input_image(executor, "fox-24x16.png")
    result = executor.run(upscale_graph(image, model, prefix=model.removesuffix(".safetensors")))
    png = saved(executor, result.outputs)
    scale = SCALES[model]
    assert png.size == (24 * scale, 16 * scale)
    values = np.asarray(png, dtype=np.float32)
    assert values.std() > 5  # a picture, not a flat or clamped-black square
    assert result.meta["models"]["upscale_models"][model]["scale"] == scale


def esrgan_reference(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ESRGAN's original `model.N` sequence run straight off an old-layout file's keys: conv, trunk of RRDBs and
    its closing conv (+ skip), [nearest x2, conv, lrelu] per stage, conv, lrelu, conv; LeakyReLU 0.2 and residual
    scales 0.2, as ESRGAN's architecture (and spandrel's, ComfyUI's loader) define them."""
    def conv(key: str, h: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, state[f"{key}.weight"].float(), state[f"{key}.bias"].float(), padding=1)

    def lrelu(h: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(h, 0.2)

    top = sorted({int(key.split(".")[1]) for key in state if key.count(".") == 2})
    ups = (top[-1] + 1 - 5) // 3
    blocks = max(int(key.split(".")[3]) for key in state if key.startswith("model.1.sub."))
    feat = conv("model.0", x)
    trunk = feat
    for i in range(blocks):
        block_in = trunk
        for j in (1, 2, 3):
            seen = [trunk]
            for k in range(1, 6):
                out = conv(f"model.1.sub.{i}.RDB{j}.conv{k}.0", torch.cat(seen, 1))
                seen.append(lrelu(out))
            trunk = out * 0.2 + seen[0]
        trunk = trunk * 0.2 + block_in
    feat = feat + conv(f"model.1.sub.{blocks}", trunk)
    for n in range(1, ups + 1):
        feat = lrelu(conv(f"model.{3 * n}", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return conv(f"model.{3 * ups + 4}", lrelu(conv(f"model.{3 * ups + 2}", feat)))


def test_the_upscaled_png_has_esrgans_own_pixels(executor: Executor, tiny_models: Path) -> None:
    image = input_image(executor, "reference-20x12.png", 20, 12, seed=4)
    result = executor.run(upscale_graph(image, "tiny-esrgan-x4.safetensors", "reference"))
    got = np.asarray(saved(executor, result.outputs), dtype=np.int16)
    x = torch.from_numpy(np.asarray(Image.open(executor.settings.input_dir / image), dtype=np.float32) / 255)
    state = load_file(str(tiny_models / "upscale_models" / "tiny-esrgan-x4.safetensors"))
    with torch.inference_mode():
        reference = esrgan_reference(state, x.movedim(-1, 0)[None]).clamp(0, 1)[0].movedim(0, -1)
    expected = (255 * reference.numpy()).clip(0, 255).astype(np.uint8)  # SaveImage truncates, as ComfyUI's
    assert got.shape == (48, 80, 3)
    assert np.abs(got - expected).max() <= 1  # float summation order may move a pixel across one level


def test_old_and_real_esrgan_layouts_load_as_the_same_architecture(executor: Executor) -> None:
    old = executor.models.upscale_model("tiny-esrgan-x4.safetensors")
    new = executor.models.upscale_model("tiny-realesrgan-x4.safetensors")
    assert (old.spec.layout, new.spec.layout) == ("esrgan", "real-esrgan")
    assert old.spec.describe() == "RRDBNet x4 (old ESRGAN layout, 1 block, 8 features)"
    assert type(old.module) is type(new.module)
    assert old.module.state_dict().keys() == new.module.state_dict().keys()


def test_image_scale_by_rounds_each_side_as_comfyui(executor: Executor) -> None:
    image = input_image(executor, "scale-25x15.png", 25, 15)
    # Python's round, as ComfyUI's: halves go to the even side (37.5 -> 38, 22.5 -> 22, 12.5 -> 12)
    for scale_by, size in ((1.5, (38, 22)), (0.5, (12, 8)), (2.0, (50, 30))):
        graph = {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
                 "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bicubic",
                                                                "scale_by": scale_by}},
                 "9": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "scaled"}}}
        cost = check_cost(executor.validate(graph), executor.limits, executor.models, catalog())
        assert cost.side == max(25, *size)  # the cost check predicts the size the node makes (or the input's)
        assert saved(executor, executor.run(graph).outputs).size == size


def test_an_upscale_past_max_side_is_refused_before_running(executor: Executor) -> None:
    image = input_image(executor, "wide-40x16.png", 40, 16)
    errors = refused(executor, upscale_graph(image, "tiny-esrgan-x4.safetensors"), Limits(max_side=128))
    [error] = errors["3"]["errors"]
    assert errors["3"]["class_type"] == "ImageUpscaleWithModel"
    assert error["details"].startswith("makes images of 160x64 pixels; this server's limit is 128 a side "
                                       "(limits.max_side in config.toml)")
    # the x2 model fits, and an ImageScaleBy first brings the x4 one within the limit
    validate_within_limits(upscale_graph(image, "tiny-compact-x2.safetensors"), catalog(), executor.models,
                           Limits(max_side=128))
    shrunk = upscale_graph(image, "tiny-esrgan-x4.safetensors")
    shrunk["4"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "area",
                                                           "scale_by": 0.5}}
    shrunk["3"]["inputs"]["image"] = ["4", 0]
    validate_within_limits(shrunk, catalog(), executor.models, Limits(max_side=128))
    shrunk["4"]["inputs"]["scale_by"] = 8.0
    assert refused(executor, shrunk, Limits(max_side=128)).keys() == {"4"}


def test_a_second_run_reuses_the_loaded_model(executor: Executor) -> None:
    model = "tiny-compact-x2.safetensors"
    stats = executor.models.stats
    first = executor.run(upscale_graph(input_image(executor, "reuse-a.png", seed=1), model, "reuse"))
    loads, hits = stats.upscale_loads, stats.upscale_hits
    loaded = executor.models.upscale_model(model)
    assert stats.upscale_hits == hits + 1 and stats.upscale_loads == loads
    # another picture, the same model: the loader's output comes from the node cache
    second = executor.run(upscale_graph(input_image(executor, "reuse-b.png", seed=2), model, "reuse"))
    assert "2" in second.meta["cached"] and "3" not in second.meta["cached"]
    assert second.meta["models"]["upscale_models"][model]["scale"] == 2  # replayed from the cached loader
    # with the node cache emptied the loader runs again, and the manager serves the model from memory
    executor.cache.clear()
    executor.run(upscale_graph("reuse-a.png", model, "reuse-again"))
    assert stats.upscale_loads == loads and stats.upscale_hits == hits + 2
    assert executor.models.upscale_model(model) is loaded
    assert saved(executor, first.outputs).size == (48, 32)


def test_upscalers_count_in_the_model_budget(tiny_models: Path, tmp_path: Path) -> None:
    one = ModelManager(ModelCatalog(tiny_models), device=CPU, dtype=torch.float32, memory_budget=10**9,
                       input_dir=tmp_path)
    size = one.upscale_model("tiny-esrgan-x4.safetensors").nbytes
    assert one.resident_bytes() == size
    # room for one RRDBNet only: loading the second evicts the first and tells the node cache to let go
    manager = ModelManager(ModelCatalog(tiny_models), device=CPU, dtype=torch.float32, memory_budget=size + 1000,
                           input_dir=tmp_path)
    dropped: list[str] = []
    manager.on_unload(dropped.append)
    first = manager.upscale_model("tiny-esrgan-x4.safetensors")
    manager.upscale_model("tiny-realesrgan-x4.safetensors")
    assert manager.upscaler_names() == ["tiny-realesrgan-x4.safetensors"]
    assert dropped == [first.model_key] and manager.stats.evictions == 1
    assert manager.keys_held_by([first]) == {first.model_key}
    manager.unload_all()
    assert manager.resident_bytes() == 0 and manager.upscaler_names() == []


def test_the_tile_follows_the_configured_limit(executor: Executor) -> None:
    model = executor.models.upscale_model("tiny-compact-x2.safetensors")
    pixels = torch.rand(1, 300, 200, 3)
    progress: list[tuple[int, int]] = []

    def upscale(limits: Limits) -> torch.Tensor:
        ctx = RunContext.__new__(RunContext)  # the node touches models, limits, device and progress only
        ctx.models, ctx.limits, ctx.device, ctx.node_id, ctx.meta = executor.models, limits, CPU, "3", RunMeta()
        ctx.report_progress, ctx.is_cancelled = (lambda node, value, total: progress.append((value, total))), (
            lambda: False)
        node = catalog()["ImageUpscaleWithModel"].model_construct(upscale_model=model, image=ImageBatch(pixels))
        return node.run(ctx)[0].pixels

    whole = upscale(Limits())
    assert progress == [(1, 1)]  # 300x200 fits in ComfyUI's 512 tile
    progress.clear()
    tiled = upscale(Limits(upscale_tile_pixels=128 * 128))
    assert progress[-1] == (6, 6) == (tile_steps(200, 300, 128),) * 2
    assert tiled.shape == whole.shape == (1, 600, 400, 3)
    assert float((tiled - whole).abs().mean()) < 0.01  # seams blended: a few hundredths of a level on average


def test_a_file_replaced_on_disk_is_loaded_again(tiny_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "upscale_models"
    folder.mkdir(parents=True)
    target = folder / "mine.safetensors"
    target.write_bytes((tiny_models / "upscale_models" / "tiny-compact-x2.safetensors").read_bytes())
    manager = ModelManager(ModelCatalog(tmp_path / "models"), device=CPU, dtype=torch.float32, memory_budget=10**9,
                           input_dir=tmp_path)
    dropped: list[str] = []
    manager.on_unload(dropped.append)
    before = manager.upscale_model("mine.safetensors")
    assert before.scale == 2
    target.write_bytes((tiny_models / "upscale_models" / "tiny-esrgan-x4.safetensors").read_bytes())
    after = manager.upscale_model("mine.safetensors")
    assert after.scale == 4 and manager.stats.upscale_loads == 2
    assert dropped == [before.model_key] and manager.upscaler_names() == ["mine.safetensors"]


def test_a_hires_fix_through_an_upscale_model_draws_at_the_upscaled_size(executor: Executor) -> None:
    # the shape of ComfyUI's "2 pass" examples: decode, upscale with a model, scale down, encode, sample again
    sampler = {"model": ["1", 0], "seed": 5, "steps": 3, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal",
               "positive": ["2", 0], "negative": ["3", 0]}
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {**sampler, "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "tiny-realesrgan-x4.safetensors"}},
        "8": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["7", 0], "image": ["6", 0]}},
        "10": {"class_type": "ImageScaleBy", "inputs": {"image": ["8", 0], "upscale_method": "bilinear",
                                                        "scale_by": 0.5}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "KSampler", "inputs": {**sampler, "latent_image": ["11", 0], "denoise": 0.5}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "hires-model"}},
    }
    cost = check_cost(executor.validate(graph), executor.limits, executor.models, catalog())
    # the x4 image is the largest; at denoise 0.5 the second sampler runs the last 3 of 6 steps, as ComfyUI's
    assert (cost.side, cost.steps) == (256, 3 + 3)
    assert saved(executor, executor.run(graph).outputs).size == (128, 128)
