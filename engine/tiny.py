"""Tiny test models: real SD1.x/SDXL architectures at tiny widths, random weights, real CLIP vocabulary.

`write_tiny_models(root)` fills a models folder (`checkpoints/`, `loras/`, `vae/`, `embeddings/`,
`upscale_models/`) offline in a few seconds, deterministically (fixed seeds), in the same file layouts
users drop in: original single-file checkpoints (via `to_original`; SD1.5 and SDXL inpainting ones with a
9-channel UNet too; an SD2 v-prediction one with OpenCLIP ViT-H keys, engine/models/sd2.py), kohya-style LoRAs
(SD1.5, and SDXL in sd-scripts' layout), an SD VAE file,
an A1111 textual-inversion embedding, and upscalers (RRDBNet x4 in the old ESRGAN and the Real-ESRGAN key
layouts, a compact SRVGG x2). Tests, `make run` and benchmarks use them instead of
multi-GB downloads. A manifest with a format version lets a changed generator rewrite the cache.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from engine.models.controlnet.tiny import write_tiny_controlnets
from engine.models.detect import INPAINT_CHANNELS, Arch, Family
from engine.models.sd2 import tiny_sd2_checkpoint
from engine.models.to_original import pipeline_to_original, unet_to_original, vae_file_dict
from engine.models.upscale import UpscalerSpec, build_module
from engine.safetensors_file import save_safetensors

__all__ = ["FORMAT_VERSION", "TinyComponents", "esrgan_keys", "tiny_components", "tiny_lora", "tiny_sdxl_lora",
           "tiny_upscaler", "write_random_checkpoint", "write_tiny_models"]

# Bump when anything below changes what is written: the cache is then rebuilt.
FORMAT_VERSION = 5
MANIFEST = "tiny-models.json"
LORA_RANK = 4

# name -> (family, seed); same architecture, different seeds, so model merges and cache keys differ.
CHECKPOINTS: dict[str, tuple[Family, int]] = {
    "tiny-sd15": ("sd15", 0),
    "tiny-sd15-b": ("sd15", 1),
    "tiny-sdxl": ("sdxl", 2),
}
# 9-channel inpainting UNets (latent + mask + masked-image latent), otherwise the tiny SD1.5 / SDXL
INPAINT_CHECKPOINTS: dict[str, tuple[Family, int]] = {
    "tiny-sd15-inpainting": ("sd15", 4),
    "tiny-sdxl-inpainting": ("sdxl", 5),
}
# SD2.x in the original layout (OpenCLIP ViT-H text encoder keys): a 768-v style v-prediction file
SD2_CHECKPOINTS: dict[str, int] = {"tiny-sd2-v": 6}
VAE_SEED = 3
LORA_SEEDS = {"tiny-lora-a": 10, "tiny-lora-b": 11}
SDXL_LORA_SEEDS = {"tiny-lora-sdxl": 12}
EMBEDDING_SEED = 20
# name -> (architecture, seed). Real ones have 64 features and 23 blocks (RRDBNet) or 16 convs (compact); these
# keep every kind of layer at 8 or 16 features and 1 block, stored in fp16 as many downloads are: 25-450 KB each.
# The dense blocks keep ESRGAN's 32 growth channels: spandrel (ComfyUI's loader) assumes 32, so ComfyUI loads these.
UPSCALERS: dict[str, tuple[UpscalerSpec, int]] = {
    "tiny-esrgan-x4": (UpscalerSpec("rrdb", "esrgan", 4, 3, 3, 8, 1, growth=32, ups=2), 30),
    "tiny-realesrgan-x4": (UpscalerSpec("rrdb", "real-esrgan", 4, 3, 3, 8, 1, growth=32, ups=2), 31),
    "tiny-compact-x2": (UpscalerSpec("compact", "compact", 2, 3, 3, 16, 4), 32),
}

# The layers kohya's LoRA trainer targets in SD1.x: every linear/1x1 in the UNet's transformer
# blocks, and the CLIP attention and MLP projections.
_UNET_TARGET = re.compile(
    r"^(down_blocks|mid_block|up_blocks)\..*attentions\.\d+\."
    r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))$"
)
_TE_TARGET = re.compile(r"^encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


@dataclass
class TinyComponents:
    """A tiny pipeline's models, shaped like a diffusers pipeline for `pipeline_to_original`."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection | None = None


def tiny_components(family: Family, seed: int, *, tiny: bool = True, device: str = "cpu",
                    in_channels: int = 4) -> TinyComponents:
    """Randomly initialised UNet, VAE and text encoder(s) of a family, from `torch.manual_seed(seed)`.

    Tiny widths by default; `tiny=False` builds the real, full-size architecture (for benchmarks and
    GPU checks at real size), on `device` so that a GPU does the initialisation. Default
    initialisation is used as is: PyTorch's for the UNet and VAE, CLIP's normal(0, 0.02) for the text
    encoders; it gives finite, non-constant images.
    """
    config_dir = Arch.of(family, tiny).config_dir
    # fork_rng: seed a private copy of the global generator, leaving the caller's state as it was.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"),
                                                in_channels=in_channels)  # 9: an inpainting UNet
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
        te2 = None
        if family == "sdxl":
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2"))
    for module in (unet, vae, te, te2):
        if module is not None:
            module.eval()
    return TinyComponents(unet, vae, te, te2)


def write_random_checkpoint(path: Path, family: Family, *, device: str = "cpu", seed: int = 0) -> Path:
    """A full-size SD1.5 or SDXL single-file checkpoint with random weights, in fp16 as most downloads are.

    Kept when the file exists. 2.1 GB for SD1.5, 6.9 GB for SDXL: for benchmarks and GPU checks at real
    size (`noodle bench engine --real-size`), never for tests.
    """
    path = Path(path)
    if not path.is_file():
        with torch.no_grad():
            state = pipeline_to_original(tiny_components(family, seed, tiny=False, device=device), family)
        _save({key: tensor.half() if tensor.is_floating_point() else tensor for key, tensor in state.items()}, path)
    return path


def _lora_pair(module: nn.Module, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random down/up weights for one layer, sized so the update is as large as the layer's own weight.

    lora_down ~ N(0, 1/in) and lora_up ~ N(0, 0.25/rank) give an update with entries of standard
    deviation 0.5/sqrt(in), close to PyTorch's default weight scale (0.58/sqrt(in)): a LoRA at
    strength 1 visibly changes the output, and lora_up is never zero (a freshly trained LoRA's is).
    """
    if isinstance(module, nn.Linear):
        fan_in, fan_out, extra = module.in_features, module.out_features, ()
    elif isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
        fan_in, fan_out, extra = module.in_channels, module.out_channels, (1, 1)
    else:
        raise TypeError(f"no LoRA shape for {type(module).__name__}")
    down = torch.randn((LORA_RANK, fan_in, *extra), generator=generator) / fan_in**0.5
    up = torch.randn((fan_out, LORA_RANK, *extra), generator=generator) * 0.5 / LORA_RANK**0.5
    return down, up


def tiny_lora(seed: int) -> dict[str, Tensor]:
    """A kohya/A1111-style LoRA (rank 4, alpha 4) for the tiny SD1.x UNet and text encoder."""
    components = tiny_components(*CHECKPOINTS["tiny-sd15"])  # only its layer names and shapes are used
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    unet_modules = components.unet.named_modules()
    targets = [("lora_unet_", name, module) for name, module in unet_modules if _UNET_TARGET.match(name)]
    # kohya names CLIP layers from the transformers model root, which has a `text_model.` level.
    targets += [
        ("lora_te_text_model_", name, module)
        for name, module in components.text_encoder.named_modules()
        if _TE_TARGET.match(name.removeprefix("text_model."))
    ]
    for prefix, name, module in targets:
        key = prefix + name.removeprefix("text_model.").replace(".", "_")
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = _lora_pair(module, generator)
        state[f"{key}.alpha"] = torch.tensor(float(LORA_RANK))  # alpha == rank: scale 1 at strength 1
    return state


def tiny_sdxl_lora(seed: int) -> dict[str, Tensor]:
    """A kohya-style SDXL LoRA (rank 4, alpha 4) for the tiny SDXL: sd-scripts names SDXL's UNet layers in the
    original layout (`lora_unet_input_blocks_4_1_...`, `lora_unet_middle_block_1_...`) and its two text encoders
    `lora_te1_` (CLIP-L) and `lora_te2_` (OpenCLIP bigG, from the transformers model root)."""
    components = tiny_components(*CHECKPOINTS["tiny-sdxl"])  # only its layer names and shapes are used
    generator = torch.Generator().manual_seed(seed)
    # a layer's original name, found through the same weight tensor in the single-file layout
    original = {tensor.data_ptr(): key for key, tensor in unet_to_original(components.unet).items()}
    state: dict[str, Tensor] = {}
    targets: list[tuple[str, nn.Module]] = []
    for name, module in components.unet.named_modules():
        if _UNET_TARGET.match(name):
            key = original[module.weight.data_ptr()].removeprefix("model.diffusion_model.").removesuffix(".weight")
            targets.append(("lora_unet_" + key.replace(".", "_"), module))
    for prefix, encoder in (("lora_te1_", components.text_encoder), ("lora_te2_", components.text_encoder_2)):
        targets += [(prefix + "text_model_" + name.removeprefix("text_model.").replace(".", "_"), module)
                    for name, module in encoder.named_modules() if _TE_TARGET.match(name.removeprefix("text_model."))]
    for key, module in targets:
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = _lora_pair(module, generator)
        state[f"{key}.alpha"] = torch.tensor(float(LORA_RANK))
    return state


def tiny_upscaler(spec: UpscalerSpec, seed: int) -> dict[str, Tensor]:
    """An upscaler of `spec`, random from `seed`, keyed in `spec.layout` as files are.

    PyTorch's default initialisation, except that an RRDBNet's last conv is rescaled so that a random picture
    comes out at mean 0.5 and standard deviation 0.15: by default its signal shrinks through the x2 stages to
    a near-black picture, most of it clamped to 0, which would hide a wrong channel or tile in a test.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_module(spec).eval()
        probe = torch.rand(1, spec.in_channels, 32, 32)
    with torch.no_grad():
        if spec.family == "rrdb":
            out = module(probe)
            last = module.get_submodule("conv_last")
            last.weight.mul_(0.15 / out.std())
            last.bias.add_(0.5 - module(probe).mean())
        state = {key: value.half() for key, value in module.state_dict().items()}
    return esrgan_keys(state, spec) if spec.layout == "esrgan" else state


def esrgan_keys(state: dict[str, Tensor], spec: UpscalerSpec) -> dict[str, Tensor]:
    """An RRDBNet state dict (Real-ESRGAN names) in the original ESRGAN layout: one `model.N` sequence of conv,
    trunk (`model.1.sub.N`, its closing conv last), [upsample, conv, act] per x2, conv, act, conv."""
    top = {"conv_first": 0, "conv_hr": 3 * spec.ups + 2, "conv_last": 3 * spec.ups + 4}
    top |= {f"conv_up{n}": 3 * n for n in range(1, spec.ups + 1)}
    renamed: dict[str, Tensor] = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if match := re.fullmatch(r"body\.(\d+)\.rdb(\d)\.conv(\d)", module):
            renamed[f"model.1.sub.{match[1]}.RDB{match[2]}.conv{match[3]}.0.{param}"] = tensor
        elif module == "conv_body":
            renamed[f"model.1.sub.{spec.blocks}.{param}"] = tensor
        else:
            renamed[f"model.{top[module]}.{param}"] = tensor
    return renamed


def _save(state: dict[str, Tensor], path: Path) -> None:
    """Write atomically: parallel test runs may build the same cache at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_safetensors({key: tensor.contiguous() for key, tensor in state.items()}, str(tmp),
                         metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never a 12 MB temp file left beside a failed write
        raise


def _plan(root: Path) -> dict[str, Path]:
    paths = {name: root / "checkpoints" / f"{name}.safetensors" for name in CHECKPOINTS}
    paths |= {name: root / "checkpoints" / f"{name}.safetensors" for name in INPAINT_CHECKPOINTS}
    paths |= {name: root / "checkpoints" / f"{name}.safetensors" for name in SD2_CHECKPOINTS}
    paths |= {name: root / "loras" / f"{name}.safetensors" for name in LORA_SEEDS}
    paths |= {name: root / "loras" / f"{name}.safetensors" for name in SDXL_LORA_SEEDS}
    paths["tiny-vae"] = root / "vae" / "tiny-vae.safetensors"
    paths["tiny-embedding"] = root / "embeddings" / "tiny-embedding.safetensors"
    paths |= {name: root / "upscale_models" / f"{name}.safetensors" for name in UPSCALERS}
    return paths


def _manifest_current(root: Path) -> bool:
    try:
        return json.loads((root / MANIFEST).read_text()).get("format") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def write_tiny_models(root: Path, *, force: bool = False) -> dict[str, Path]:
    """Write the tiny models under `root` and return name -> path; files already there are kept.

    Everything is rewritten when `force` is set or the manifest's format version is not this
    generator's.
    """
    root = Path(root)
    paths = _plan(root)
    rewrite = force or not _manifest_current(root)
    todo = {name for name, path in paths.items() if rewrite or not path.is_file()}
    for name, (family, seed) in CHECKPOINTS.items():
        if name in todo:
            _save(pipeline_to_original(tiny_components(family, seed), family), paths[name])
    for name, (family, seed) in INPAINT_CHECKPOINTS.items():
        if name in todo:
            _save(pipeline_to_original(tiny_components(family, seed, in_channels=INPAINT_CHANNELS), family),
                  paths[name])
    for name, seed in SD2_CHECKPOINTS.items():
        if name in todo:
            _save(tiny_sd2_checkpoint(seed, v_prediction=True), paths[name])
    for name, seed in LORA_SEEDS.items():
        if name in todo:
            _save(tiny_lora(seed), paths[name])
    for name, seed in SDXL_LORA_SEEDS.items():
        if name in todo:
            _save(tiny_sdxl_lora(seed), paths[name])
    if "tiny-vae" in todo:
        _save(vae_file_dict(tiny_components("sd15", VAE_SEED).vae), paths["tiny-vae"])
    if "tiny-embedding" in todo:
        config_dir = Arch.of("sd15", True).config_dir
        width = CLIPTextConfig.from_pretrained(config_dir / "text_encoder").hidden_size
        generator = torch.Generator().manual_seed(EMBEDDING_SEED)
        # Two vectors at CLIP's own token-embedding scale (normal, std 0.02): an in-distribution "word".
        _save({"emb_params": torch.randn((2, width), generator=generator) * 0.02}, paths["tiny-embedding"])
    for name, (spec, seed) in UPSCALERS.items():
        if name in todo:
            _save(tiny_upscaler(spec, seed), paths[name])
    paths |= write_tiny_controlnets(root, force=rewrite)  # controlnet/: engine/models/controlnet/tiny.py

    if todo:
        files = {name: path.relative_to(root).as_posix() for name, path in paths.items()}
        manifest = json.dumps({"format": FORMAT_VERSION, "files": files}, indent=2, sort_keys=True)
        tmp = root / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(manifest + "\n")
        os.replace(tmp, root / MANIFEST)
    return paths
