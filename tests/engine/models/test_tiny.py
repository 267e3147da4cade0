"""The tiny-model generator: files, determinism, caching, LoRAs that diffusers accepts, and images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from engine.errors import NodeExecutionError
from engine.executor import Executor
from engine.models.detect import detect_checkpoint
from engine.models.paths import ModelCatalog
from engine.models.single_file import load_checkpoint_pipeline, load_vae
from engine.tiny import FORMAT_VERSION, write_tiny_models
from tests.engine.conftest import txt2img

CPU = torch.device("cpu")
EXPECTED_FILES = {
    "tiny-sd15": "checkpoints/tiny-sd15.safetensors",
    "tiny-sd15-b": "checkpoints/tiny-sd15-b.safetensors",
    "tiny-sdxl": "checkpoints/tiny-sdxl.safetensors",
    "tiny-sd15-inpainting": "checkpoints/tiny-sd15-inpainting.safetensors",
    "tiny-sdxl-inpainting": "checkpoints/tiny-sdxl-inpainting.safetensors",
    "tiny-sd2-v": "checkpoints/tiny-sd2-v.safetensors",
    "tiny-lora-a": "loras/tiny-lora-a.safetensors",
    "tiny-lora-b": "loras/tiny-lora-b.safetensors",
    "tiny-lora-sdxl": "loras/tiny-lora-sdxl.safetensors",
    "tiny-vae": "vae/tiny-vae.safetensors",
    "tiny-embedding": "embeddings/tiny-embedding.safetensors",
    "tiny-esrgan-x4": "upscale_models/tiny-esrgan-x4.safetensors",
    "tiny-realesrgan-x4": "upscale_models/tiny-realesrgan-x4.safetensors",
    "tiny-compact-x2": "upscale_models/tiny-compact-x2.safetensors",
    "tiny-controlnet-sd15": "controlnet/tiny-controlnet-sd15.safetensors",
    "tiny-controlnet-sdxl": "controlnet/tiny-controlnet-sdxl.safetensors",
}


# Stock diffusers pipelines on the tiny files, CPU float32, generator seed 0: the bottom-right 3x3 of the last
# channel, as diffusers' pipeline tests slice `image[0, -3:, -3:, -1]`. The same to 4 decimals in separate
# processes, with 1 and 2 threads, and from a freshly generated folder; 2e-3 leaves room for another CPU's
# summation order.
SD15_STOCK_SLICE = [[0.4972, 0.5672, 0.5063], [0.5163, 0.4728, 0.4817], [0.4666, 0.4281, 0.4560]]
SDXL_STOCK_SLICE = [[0.5238, 0.5478, 0.3784], [0.4751, 0.4486, 0.3584], [0.4543, 0.4599, 0.4137]]


def _bytes(root: Path) -> dict[str, bytes]:
    return {name: (root / rel).read_bytes() for name, rel in EXPECTED_FILES.items()}


@pytest.fixture(scope="module")
def sd15_pipe(tiny_models: Path) -> StableDiffusionPipeline:
    path = tiny_models / "checkpoints" / "tiny-sd15.safetensors"
    return load_checkpoint_pipeline(path, detect_checkpoint(path), CPU, torch.float32)


def test_writes_every_file_and_a_manifest(tiny_models: Path) -> None:
    catalog = ModelCatalog(tiny_models)
    assert {"tiny-sd15-b.safetensors", "tiny-sd15.safetensors", "tiny-sdxl.safetensors",
            "tiny-sd15-inpainting.safetensors", "tiny-sdxl-inpainting.safetensors"} <= set(catalog.list("checkpoints"))
    assert catalog.list("loras") == ["tiny-lora-a.safetensors", "tiny-lora-b.safetensors", "tiny-lora-sdxl.safetensors"]
    assert catalog.list("vae") == ["tiny-vae.safetensors"]
    assert catalog.list("embeddings") == ["tiny-embedding.safetensors"]
    assert catalog.list("upscale_models") == ["tiny-compact-x2.safetensors", "tiny-esrgan-x4.safetensors",
                                              "tiny-realesrgan-x4.safetensors"]
    manifest = json.loads((tiny_models / "tiny-models.json").read_text())
    assert manifest == {"format": FORMAT_VERSION, "files": EXPECTED_FILES}


def test_generation_is_deterministic_and_seeds_differ(tiny_models: Path, tmp_path: Path) -> None:
    paths = write_tiny_models(tmp_path / "one")
    assert {name: path.relative_to(tmp_path / "one").as_posix() for name, path in paths.items()} == EXPECTED_FILES
    first = _bytes(tmp_path / "one")
    write_tiny_models(tmp_path / "one", force=True)
    assert _bytes(tmp_path / "one") == first
    assert _bytes(tiny_models) == first  # the session cache is the same generator's output
    assert first["tiny-sd15"] != first["tiny-sd15-b"]
    assert first["tiny-lora-a"] != first["tiny-lora-b"]


def test_existing_files_are_kept_until_the_format_changes(tmp_path: Path) -> None:
    paths = write_tiny_models(tmp_path)
    marker = paths["tiny-vae"].stat().st_mtime_ns
    paths["tiny-sd15-b"].unlink()
    write_tiny_models(tmp_path)
    assert paths["tiny-sd15-b"].is_file()  # a missing file is written again
    assert paths["tiny-vae"].stat().st_mtime_ns == marker  # the others are kept
    (tmp_path / "tiny-models.json").write_text(json.dumps({"format": FORMAT_VERSION - 1}))
    write_tiny_models(tmp_path)
    assert paths["tiny-vae"].stat().st_mtime_ns != marker


def test_tiny_sd15_makes_a_64px_image_in_four_steps(sd15_pipe: StableDiffusionPipeline) -> None:
    image = sd15_pipe(
        "a red fox in the snow", num_inference_steps=4, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.shape == (64, 64, 3)
    np.testing.assert_allclose(image[-3:, -3:, -1], SD15_STOCK_SLICE, rtol=0, atol=2e-3)


def test_tiny_sdxl_makes_a_64px_image(tiny_models: Path) -> None:
    path = tiny_models / "checkpoints" / "tiny-sdxl.safetensors"
    pipe = load_checkpoint_pipeline(path, detect_checkpoint(path), CPU, torch.float32)
    assert pipe.unet.config.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    image = pipe("a red fox", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)
    np.testing.assert_allclose(image[-3:, -3:, -1], SDXL_STOCK_SLICE, rtol=0, atol=2e-3)


def test_lora_files_use_kohya_names_and_cover_the_attention_layers(tiny_models: Path) -> None:
    state = load_file(str(tiny_models / "loras" / "tiny-lora-a.safetensors"))
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in state}
    for module in modules:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= set(state)
        assert state[f"{module}.lora_down.weight"].shape[0] == 4 and state[f"{module}.alpha"].item() == 4.0
        assert state[f"{module}.lora_up.weight"].abs().max() > 0
    for pattern in [
        r"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        r"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
        r"lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2",
        r"lora_unet_down_blocks_0_attentions_1_proj_in",
        r"lora_unet_up_blocks_1_attentions_0_proj_out",
    ]:
        assert pattern in modules, pattern
    te = {m for m in modules if m.startswith("lora_te_")}
    kinds = {re.sub(r"layers_\d+_", "layers_N_", m) for m in te}
    assert kinds == {f"lora_te_text_model_encoder_layers_N_{k}" for k in
                     ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                      "mlp_fc1", "mlp_fc2")}


def _unet_and_text_outputs(pipe: StableDiffusionPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    ids = pipe.tokenizer("a red fox", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        noise = pipe.unet(latents, 500, encoder_hidden_states=text).sample
    return text, noise


# peft warns whenever a second adapter joins a model; two adapters is what this test is about.
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_lora_files_load_as_peft_adapters_and_change_the_output(tiny_models: Path) -> None:
    path = tiny_models / "checkpoints" / "tiny-sd15.safetensors"
    pipe = load_checkpoint_pipeline(path, detect_checkpoint(path), CPU, torch.float32)
    text0, noise0 = _unet_and_text_outputs(pipe)
    pipe.load_lora_weights(str(tiny_models / "loras" / "tiny-lora-a.safetensors"), adapter_name="a")
    pipe.load_lora_weights(load_file(str(tiny_models / "loras" / "tiny-lora-b.safetensors")), adapter_name="b")
    assert pipe.get_list_adapters() == {"unet": ["a", "b"], "text_encoder": ["a", "b"]}

    outputs = {}
    for name in ("a", "b"):
        pipe.set_adapters([name], [1.0])
        outputs[name] = _unet_and_text_outputs(pipe)
        text, noise = outputs[name]
        assert (text - text0).norm() > 0.1 * text0.norm()  # the text encoder part is active
        assert (noise - noise0).norm() > 0.1 * noise0.norm()  # and so is the UNet part
    assert not torch.allclose(outputs["a"][1], outputs["b"][1])
    pipe.set_adapters(["a"], [0.0])
    assert torch.allclose(_unet_and_text_outputs(pipe)[1], noise0, atol=1e-6)


def test_embedding_is_an_a1111_textual_inversion_file(
    tiny_models: Path, sd15_pipe: StableDiffusionPipeline
) -> None:
    state = load_file(str(tiny_models / "embeddings" / "tiny-embedding.safetensors"))
    assert list(state) == ["emb_params"]
    assert state["emb_params"].shape == (2, sd15_pipe.text_encoder.config.hidden_size) == (2, 32)


def test_tiny_vae_loads_and_differs_from_the_checkpoint_vae(
    tiny_models: Path, sd15_pipe: StableDiffusionPipeline
) -> None:
    vae = load_vae(tiny_models / "vae" / "tiny-vae.safetensors", CPU, torch.float32)
    assert vae.config.block_out_channels == sd15_pipe.vae.config.block_out_channels
    theirs = sd15_pipe.vae.state_dict()
    assert any(not torch.equal(tensor, theirs[key]) for key, tensor in vae.state_dict().items())


def test_the_sdxl_lora_uses_kohya_sdxl_names_and_changes_tiny_sdxls_picture(tiny_models: Path,
                                                                             executor: Executor) -> None:
    state = load_file(str(tiny_models / "loras" / "tiny-lora-sdxl.safetensors"))
    prefixes = {re.match(r"lora_(unet_[a-z]+_blocks?|te\d)", key)[0] for key in state}  # type: ignore[index]
    # sd-scripts names SDXL's UNet in the original layout and its encoders te1 (CLIP-L) and te2 (bigG)
    assert prefixes == {"lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks",
                        "lora_te1", "lora_te2"}
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in state

    def picture(strength: float | None) -> np.ndarray:
        loras = () if strength is None else (("tiny-lora-sdxl.safetensors", strength, strength),)
        [image] = executor.run(txt2img(checkpoint="tiny-sdxl.safetensors", loras=loras)).outputs["9"]["images"]
        return np.asarray(Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"]))

    plain = picture(None)
    assert np.array_equal(picture(0.0), plain)  # strength 0 is the bare model, pixel for pixel
    assert np.abs(picture(1.0).astype(int) - plain).mean() > 1

    # on an SD1.x checkpoint the same layer names have other widths: refused in words, the UNet left as it was
    sd15 = txt2img(loras=(("tiny-lora-sdxl.safetensors", 1.0, 1.0),))
    with pytest.raises(NodeExecutionError, match="LoRA 'tiny-lora-sdxl.safetensors' does not fit checkpoint "
                                                 "'tiny-sd15.safetensors'.*made for another model family"):
        executor.run(sd15)
    assert executor.run(txt2img()).outputs["9"]
