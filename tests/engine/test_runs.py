"""End to end on the tiny models: txt2img (SD1.5, SDXL), img2img, a separate VAE, PNG metadata, determinism.

Each architecture's run is pinned to a stored 3x3 slice of its pixels, as diffusers' pipeline tests pin
`image[0, -3:, -3:, -1]`: the bottom-right corner of the last channel, measured on the CPU in float32. The tiny
models are regenerated bit for bit from engine/tiny.py's seeds, and the slices came out the same in separate
processes, with 1 and 2 threads, and from a freshly generated models folder; the tolerance of 2 levels (of 255)
leaves room for float summation order on another CPU, never for a different picture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import NodeExecutionError, WorkflowInvalid
from engine.executor import Executor
from engine.pngmeta import parse_parameters, read_png_texts
from tests.engine.conftest import txt2img, with_changes


def image_paths(executor: Executor, outputs: dict, node: str = "9") -> list[Path]:
    root = executor.settings.output_dir
    return [root / img["subfolder"] / img["filename"] for img in outputs[node]["images"]]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def fresh_run(executor: Executor, workflow: dict) -> dict:
    executor.cache.clear()
    return executor.run(workflow).to_dict()


def assert_slice(path: Path, expected: list[list[int]]) -> None:
    """The image's bottom-right 3x3 of the last channel is the stored one, within 2 levels."""
    np.testing.assert_allclose(pixels(path)[-3:, -3:, -1], np.array(expected), rtol=0, atol=2)


SD15_SLICE = [[142, 116, 120], [141, 126, 131], [128, 126, 124]]  # txt2img(): seed 42, 4 steps euler, 64x64
SDXL_SLICE = [[114, 124, 115], [105, 120, 112], [107, 118, 113]]  # the same on tiny-sdxl
IMG2IMG_SLICE = [[160, 144, 145], [162, 154, 148], [142, 131, 126]]  # tiny SD1.5 from gradient(), denoise 0.6, seed 5


def gradient() -> Image.Image:
    """A 64x64 start image computed, not sampled: an img2img failure then points at img2img alone."""
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, np.full_like(x, 128)], -1).astype(np.uint8))


def test_sd15_txt2img_writes_a_png_with_its_recipe_and_the_stored_pixels(executor: Executor) -> None:
    result = fresh_run(executor, txt2img(filename_prefix="sd15"))
    [path] = image_paths(executor, result["outputs"])
    assert path.name == "sd15_00001_.png"
    image = Image.open(path)
    assert image.size == (64, 64)
    texts = read_png_texts(path)
    assert json.loads(texts["prompt"])["3"]["class_type"] == "KSampler"
    prompt, negative, fields = parse_parameters(texts["parameters"])
    assert (prompt, negative) == ("a red fox in the snow", "blurry")
    assert fields["Steps"] == "4" and fields["Seed"] == "42" and fields["Size"] == "64x64"
    assert fields["Sampler"] == "Euler" and fields["CFG scale"] == "7.0"
    assert fields["Model"] == "tiny-sd15" and len(fields["Model hash"]) == 10
    assert fields["Token usage"] == "prompt 6/75, negative 1/75"
    assert result["meta"]["seeds"] == {"3": 42}
    assert result["meta"]["tokens"]["6"]["tokens"] == 6  # a red fox in the snow
    assert_slice(path, SD15_SLICE)


def test_same_graph_and_seed_give_identical_pixels(executor: Executor) -> None:
    first = image_paths(executor, fresh_run(executor, txt2img(seed=7))["outputs"])[0]
    second = image_paths(executor, fresh_run(executor, txt2img(seed=7))["outputs"])[0]
    other = image_paths(executor, fresh_run(executor, txt2img(seed=8))["outputs"])[0]
    assert first != second
    assert np.array_equal(pixels(first), pixels(second))
    assert not np.array_equal(pixels(first), pixels(other))


def test_sdxl_txt2img_gives_the_stored_pixels(executor: Executor) -> None:
    result = fresh_run(executor, txt2img(checkpoint="tiny-sdxl.safetensors", filename_prefix="sdxl"))
    [path] = image_paths(executor, result["outputs"])
    assert Image.open(path).size == (64, 64)
    assert_slice(path, SDXL_SLICE)
    assert result["meta"]["models"]["checkpoints"]["tiny-sdxl.safetensors"]["arch"] == "sdxl"


def test_batch_gives_distinct_images_and_item_zero_matches_the_solo_run(executor: Executor) -> None:
    batch = image_paths(executor, fresh_run(executor, txt2img(batch_size=2, seed=3))["outputs"])
    assert len(batch) == 2
    assert not np.array_equal(pixels(batch[0]), pixels(batch[1]))


def test_img2img_starts_from_the_image(executor: Executor) -> None:
    source = image_paths(executor, fresh_run(executor, txt2img(seed=11))["outputs"])[0]
    (executor.settings.input_dir / "fox.png").write_bytes(source.read_bytes())
    low = image_paths(executor, fresh_run(executor, txt2img(init_image="fox.png", denoise=0.3, seed=5))["outputs"])[0]
    high = image_paths(executor, fresh_run(executor, txt2img(init_image="fox.png", denoise=1.0, seed=5))["outputs"])[0]
    start = pixels(source)
    assert np.abs(pixels(low) - start).mean() < np.abs(pixels(high) - start).mean()


def test_img2img_gives_the_stored_pixels(executor: Executor) -> None:
    gradient().save(executor.settings.input_dir / "gradient.png")
    result = fresh_run(executor, txt2img(init_image="gradient.png", denoise=0.6, seed=5, filename_prefix="i2i"))
    [path] = image_paths(executor, result["outputs"])
    assert_slice(path, IMG2IMG_SLICE)


def test_denoise_zero_returns_the_encoded_image(executor: Executor) -> None:
    source = image_paths(executor, fresh_run(executor, txt2img(seed=12))["outputs"])[0]
    (executor.settings.input_dir / "still.png").write_bytes(source.read_bytes())
    sampled = image_paths(executor, fresh_run(executor, txt2img(init_image="still.png", denoise=0.0))["outputs"])[0]
    round_trip = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "12": {"class_type": "LoadImage", "inputs": {"image": "still.png"}},
        "13": {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["4", 2]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "roundtrip"}},
    }
    decoded = image_paths(executor, fresh_run(executor, round_trip)["outputs"])[0]
    # nothing was sampled: the VAE round trip alone, bit for bit
    assert np.array_equal(pixels(sampled), pixels(decoded))


def test_separate_vae_loader_changes_the_decode(executor: Executor) -> None:
    own = image_paths(executor, fresh_run(executor, txt2img(seed=9))["outputs"])[0]
    other = image_paths(executor, fresh_run(executor, txt2img(seed=9, vae="tiny-vae.safetensors"))["outputs"])[0]
    assert not np.array_equal(pixels(own), pixels(other))


@pytest.mark.parametrize("sampler,scheduler", [("euler_ancestral", "normal"), ("dpmpp_2m", "karras"),
                                               ("heun", "normal"), ("uni_pc", "simple")])
def test_other_samplers_run_and_are_deterministic(executor: Executor, sampler: str, scheduler: str) -> None:
    workflow = with_changes(txt2img(seed=21), "3", sampler_name=sampler, scheduler=scheduler)
    first = image_paths(executor, fresh_run(executor, workflow)["outputs"])[0]
    second = image_paths(executor, fresh_run(executor, workflow)["outputs"])[0]
    assert np.array_equal(pixels(first), pixels(second))
    assert pixels(first).std() > 1.0


def test_a_run_that_fails_after_one_saveimage_leaves_none_of_its_pngs(executor: Executor) -> None:
    # SaveImage "9" writes its PNG, then a second branch fails (a 3-frame APNG in LoadImage): all or nothing
    frames = [Image.new("RGB", (64, 64), (40 * i, 0, 0)) for i in range(3)]
    animated = executor.settings.input_dir / "three-frames.png"
    animated.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(animated, save_all=True, append_images=frames[1:])
    workflow = txt2img(seed=11, filename_prefix="all-or-nothing")
    workflow["9"]["inputs"]["filename_prefix"] = "all-or-nothing"
    # a SaveLatent's file goes too (its ui names it under "latents", not "images")
    workflow["10"] = {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "all-or-nothing"}}
    workflow["30"] = {"class_type": "LoadImage", "inputs": {"image": "three-frames.png"}}
    workflow["31"] = {"class_type": "SaveImage", "inputs": {"images": ["30", 0], "filename_prefix": "all-or-nothing"}}
    prompt = executor.validate(workflow)
    assert max(prompt.order.index("9"), prompt.order.index("10")) < prompt.order.index("30")  # written before it
    before = set(executor.settings.output_dir.rglob("all-or-nothing*"))
    with pytest.raises(NodeExecutionError, match="animated PNG of 3 frames"):
        executor.run(prompt)
    assert set(executor.settings.output_dir.rglob("all-or-nothing*")) == before
    # the same graph without the failing branch runs again from the top of SaveImage: its cached output is gone
    del workflow["10"], workflow["30"], workflow["31"]
    result = executor.run(workflow)
    assert "9" not in result.meta["cached"] and len(set(executor.settings.output_dir.rglob("all-or-nothing*"))) == 1


def test_a_linked_number_outside_the_inputs_range_fails_the_node_naming_both(executor: Executor) -> None:
    # ComfyUI holds only constants to their ranges: SamplingPercentToSigma's FLOAT (1e9 at percent 0, 0 at 1)
    # linked into ImageBlur's sigma drew a NaN picture, into the sampler's cfg ran a cfg of a billion
    workflow = txt2img(seed=3)
    workflow["20"] = {"class_type": "SamplingPercentToSigma", "inputs": {"model": ["4", 0], "sampling_percent": 1.0,
                                                                         "return_actual_sigma": False}}
    workflow["31"] = {"class_type": "ImageBlur", "inputs": {"image": ["8", 0], "blur_radius": 3, "sigma": ["20", 0]}}
    workflow["9"]["inputs"]["images"] = ["31", 0]
    with pytest.raises(NodeExecutionError, match=r"node 31 \(ImageBlur\) failed: sigma: the linked value 0 is "
                                                 r"outside what ImageBlur takes \(finite from 0.1 up to 10\)"):
        executor.run(workflow)
    workflow["20"]["inputs"]["sampling_percent"] = 0.0  # 999999999.9
    workflow["9"]["inputs"]["images"] = ["8", 0]
    workflow["3"]["inputs"]["cfg"] = ["20", 0]
    with pytest.raises(NodeExecutionError, match=r"node 3 \(KSampler\) failed: cfg: the linked value 1e\+09"):
        executor.run(workflow)
    workflow["3"]["inputs"]["cfg"] = 7.0  # in range, linked or not, it runs
    workflow["31"]["inputs"]["sigma"], workflow["20"]["inputs"]["sampling_percent"] = ["20", 0], 0.5
    workflow["9"]["inputs"]["images"] = ["31", 0]
    assert executor.run(workflow).outputs["9"]["images"]


@pytest.mark.parametrize(("prefix", "says"), [
    ("\x00evil", "holds a NUL character"), ("", "names no file"), (".", "names no file"),
    ("../../etc/noodle", "leaves the output folder"), ("/tmp/abs", "leaves the output folder"),
    ("sub/../../x", "leaves the output folder"), ("x" * 300, "has a name of 300 bytes")])
def test_a_filename_prefix_that_cannot_name_a_file_is_refused_before_sampling(executor: Executor, prefix: str,
                                                                              says: str) -> None:
    # found by save_path only after sampling, or by the disk with errors of its own (ENAMETOOLONG, a NUL)
    workflow = txt2img(seed=3, filename_prefix=prefix)
    with pytest.raises(WorkflowInvalid, match=rf"node 9 \(SaveImage\).*{says}"):
        executor.validate(workflow)


@pytest.mark.parametrize("prefix", ["..", "  ", "sub/", "%width%/%height%", "a/b/c/d"])
def test_odd_prefixes_comfyui_saves_under_still_save(executor: Executor, prefix: str) -> None:
    assert executor.run(txt2img(seed=3, filename_prefix=prefix)).outputs["9"]["images"]


def test_a_file_where_the_pngs_folder_goes_fails_the_save_instead_of_looping(executor: Executor) -> None:
    # mkdir's FileExistsError was taken for a PNG name another writer took: the counter went up forever
    blocker = executor.settings.output_dir / "blocker"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    try:
        with pytest.raises(NodeExecutionError, match="a file stands where the folder for the PNG goes"):
            executor.run(txt2img(seed=3, filename_prefix="blocker/fox"))
    finally:
        blocker.unlink()
