"""Load single-file SD1.x / SDXL checkpoints (plain or 9-channel inpainting) and standalone VAEs through diffusers,
offline and strictly.

diffusers' `from_single_file` does the key conversion; Noodle adds what it lacks for a server:
- offline: `config=` points at Noodle's config folder and the tokenizers are built from
  `prompts/clip_tokenizer`, so nothing is fetched from a hub;
- strict: the file's header is checked against the full key/shape layout the config implies
  (from `to_original` on an empty "meta" model) before any weight is read, and after loading no
  parameter may still be on the meta device. diffusers loads CLIP weights into an empty model and
  skips keys it does not find, so without these checks a file with a missing or misnamed CLIP
  weight would load with garbage in it;
- errors: whatever diffusers raises becomes UnsupportedModel naming the file.

The config folders (`engine/models/configs/{sd15,sd2,sdxl}` and their `tiny-*`) hold the real
diffusers configs without weights or tokenizers; SD1.5's model_index.json lists no safety checker
or feature extractor, since Noodle runs none and ships no such folder.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import is_accelerate_available
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from engine.errors import NoodleError, UnsupportedModel
from engine.models.detect import SUPPORTED, Arch, Family, read_shapes
from engine.models.to_original import text_encoders_to_original, unet_to_original, vae_file_dict, vae_to_original

__all__ = ["check_checkpoint_layout", "clip_tokenizer", "expected_shapes", "load_checkpoint_pipeline", "load_vae",
           "missing_weights", "unet_config"]

SDPipeline = StableDiffusionPipeline | StableDiffusionXLPipeline
_SHOWN = 5  # how many offending keys a message lists


def clip_tokenizer(*, pad_token: str | None = None) -> CLIPTokenizer:
    """A fresh CLIP tokenizer from `prompts/clip_tokenizer` (fresh: textual inversion adds tokens to it).

    SDXL's second tokenizer pads with "!" (id 0) where the first pads with the end token.
    """
    folder = resources.files("prompts") / "clip_tokenizer"
    extra = {"pad_token": pad_token} if pad_token is not None else {}
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)


class _EmptyPipeline:
    """The components of a pipeline as meta-device modules: shapes without memory."""

    def __init__(self, arch: Arch) -> None:
        with init_empty_weights():
            self.unet = UNet2DConditionModel.from_config(unet_config(arch))
            self.vae = AutoencoderKL.from_config(AutoencoderKL.load_config(arch.config_dir / "vae"))
            self.text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(arch.config_dir / "text_encoder"))
            if arch.family == "sdxl":
                config_2 = CLIPTextConfig.from_pretrained(arch.config_dir / "text_encoder_2")
                self.text_encoder_2 = CLIPTextModelWithProjection(config_2)


def unet_config(arch: Arch) -> dict[str, Any]:
    """The diffusers UNet config of `arch`: its folder's, with an inpainting UNet's 9 input channels."""
    config = dict(UNet2DConditionModel.load_config(arch.config_dir / "unet"))
    config["in_channels"] = arch.in_channels
    return config


def _inpainting_unet(path: Path, arch: Arch, dtype: torch.dtype) -> UNet2DConditionModel:
    """The 9-channel UNet of an inpainting single file, converted by diffusers from the plain config folder.

    The pipeline loader passes its extra arguments to every component, and in_channels would reach the VAE
    too: the UNet is loaded alone (a second read of the file) and handed to the pipeline.
    """
    return UNet2DConditionModel.from_single_file(
        str(path), config=str(arch.config_dir), subfolder="unet", local_files_only=True, torch_dtype=dtype,
        in_channels=arch.in_channels,
    )


@functools.lru_cache(maxsize=8)
def expected_shapes(arch: Arch) -> Mapping[str, tuple[int, ...]]:
    """Every key and shape a single file of this architecture must hold (extra keys are allowed)."""
    empty = _EmptyPipeline(arch)
    # The converters only rename and reshape, so they run on meta tensors; no copy to CPU here.
    state = {
        **unet_to_original(empty.unet),
        **vae_to_original(empty.vae),
        **text_encoders_to_original(arch.family, empty.text_encoder, getattr(empty, "text_encoder_2", None)),
    }
    return MappingProxyType({key: tuple(tensor.shape) for key, tensor in state.items()})


@functools.lru_cache(maxsize=8)
def _expected_vae_shapes(config_dir: Path) -> Mapping[str, tuple[int, ...]]:
    with init_empty_weights():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    return MappingProxyType({key: tuple(tensor.shape) for key, tensor in vae_file_dict(vae).items()})


def _check_layout(shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Refuse a file that lacks a weight the architecture needs, or holds one in another shape."""
    missing = sorted(key for key in expected if key not in shapes)
    wrong = sorted(f"{key} {list(shapes[key])} (expected {list(shape)})" for key, shape in expected.items()
                   if key in shapes and tuple(shapes[key]) != shape)
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} weights missing ({', '.join(missing[:_SHOWN])})")
        if wrong:
            problems.append(f"{len(wrong)} weights with another shape ({', '.join(wrong[:_SHOWN])})")
        raise UnsupportedModel(f"{what} does not match its layout: {'; '.join(problems)}; {SUPPORTED}")


def missing_weights(module: nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device, i.e. never loaded from the file."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, tensor in tensors if tensor.device.type == "meta"]


def _require_loaded(components: Mapping[str, Any], what: str) -> None:
    for component, module in components.items():
        if isinstance(module, nn.Module) and (missing := missing_weights(module)):
            raise UnsupportedModel(
                f"{what}: {component} weights were not in the file ({', '.join(missing[:_SHOWN])}); "
                f"refusing to run with uninitialised weights"
            )


def _require_accelerate() -> None:
    # Without accelerate diffusers builds CLIP with random weights and loads the file with
    # strict=False: a missing weight would then pass unnoticed instead of staying on "meta".
    if not is_accelerate_available():
        raise UnsupportedModel("loading single-file checkpoints needs the accelerate package; install it")


def check_checkpoint_layout(path: Path, arch: Arch) -> None:
    """Refuse a single file lacking a weight `arch` needs, or holding one in another shape, from its header alone:
    the model manager calls it before it evicts anything to make room for the file."""
    _require_accelerate()
    _check_layout(read_shapes(Path(path), allow_weights_only_pickle=True), expected_shapes(arch),
                  _checkpoint_what(Path(path), arch))


def _checkpoint_what(path: Path, arch: Arch) -> str:
    return f"checkpoint {path.name!r} ({arch.name})"


def load_checkpoint_pipeline(path: Path, arch: Arch, device: torch.device | str, dtype: torch.dtype, *,
                             layout_checked: bool = False) -> SDPipeline:
    """Load an SD1.x or SDXL single file as a diffusers pipeline (scheduler from the config folder).

    `path` comes from `ModelCatalog.resolve`, which enforces the pickle policy; pickles allowed
    there are read weights-only (here and by diffusers' own loader). `layout_checked`: the caller ran
    `check_checkpoint_layout` already (a weights-only pickle's shapes cost a read of the whole file).
    """
    path = Path(path)
    what = _checkpoint_what(path, arch)
    if not layout_checked:
        check_checkpoint_layout(path, arch)
    kwargs: dict[str, Any] = {
        "config": str(arch.config_dir),
        "local_files_only": True,
        "torch_dtype": dtype,
        "tokenizer": clip_tokenizer(),
    }
    pipeline_class: type[SDPipeline]
    if arch.family in ("sd15", "sd2"):
        pipeline_class = StableDiffusionPipeline
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if arch.family == "sd2":  # ComfyUI's SD2 tokenizer pads with "!" (id 0), not the end token
            kwargs["tokenizer"] = clip_tokenizer(pad_token="!")
    else:
        pipeline_class = StableDiffusionXLPipeline
        kwargs.update(tokenizer_2=clip_tokenizer(pad_token="!"), add_watermarker=False)
    try:
        if arch.in_channels != 4:
            kwargs["unet"] = _inpainting_unet(path, arch, dtype)
        pipe = pipeline_class.from_single_file(str(path), **kwargs)
    except NoodleError:
        raise
    except Exception as err:  # diffusers raises ValueError, KeyError, OSError, SingleFileComponentError...
        raise UnsupportedModel(f"{what} could not be loaded: {type(err).__name__}: {err}") from err
    _require_loaded(pipe.components, what)
    return pipe.to(device)


def _vae_arch(shapes: Mapping[str, tuple[int, ...]], name: str, family: Family) -> Arch:
    """Real or tiny VAE, from the width of its first convolution."""
    conv_in = shapes.get("encoder.conv_in.weight")
    if conv_in is None:
        hint = " (it has first_stage_model.* keys: a checkpoint, not a VAE)" if any(
            key.startswith("first_stage_model.") for key in shapes) else ""
        raise UnsupportedModel(
            f"VAE {name!r} does not use the SD VAE layout (encoder.*, decoder.* keys){hint}; "
            "Noodle loads SD1.x/SDXL VAE .safetensors files"
        )
    for tiny in (False, True):
        arch = Arch.of(family, tiny)
        if conv_in[0] == AutoencoderKL.load_config(arch.config_dir / "vae")["block_out_channels"][0]:
            return arch
    raise UnsupportedModel(f"VAE {name!r} is {conv_in[0]} wide at its input, matching no SD1.x/SDXL VAE")


def load_vae(path: Path, device: torch.device | str, dtype: torch.dtype, *, family: Family = "sd15") -> AutoencoderKL:
    """Load a standalone SD VAE file (keys `encoder.*`, `decoder.*`, no prefix), real or tiny by its shapes.

    SD1.x and SDXL VAEs share one layout; `family` picks the config, whose scaling_factor and
    force_upcast should match the checkpoint the VAE decodes for.
    """
    path = Path(path)
    _require_accelerate()
    shapes = read_shapes(path, allow_weights_only_pickle=True)
    arch = _vae_arch(shapes, path.name, family)
    what = f"VAE {path.name!r} ({arch.name})"
    _check_layout(shapes, _expected_vae_shapes(arch.config_dir), what)
    try:
        vae = AutoencoderKL.from_single_file(
            str(path), config=str(arch.config_dir), subfolder="vae", local_files_only=True, torch_dtype=dtype
        )
    except Exception as err:  # as above: diffusers' errors carry no file name
        raise UnsupportedModel(f"{what} could not be loaded: {type(err).__name__}: {err}") from err
    _require_loaded({"vae": vae}, what)
    return vae.to(device)

