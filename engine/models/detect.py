"""Which architecture a checkpoint file holds, read from its safetensors header alone.

The model manager calls `detect_checkpoint` before loading: it reads the header (a few KB of JSON
with every key and shape), never the weights, and answers with an `Arch` naming the family
(SD1.x, SD2.x or SDXL), the config folder under `engine/models/configs/` that diffusers' single-file
loader needs offline, whether it is one of Noodle's tiny test models, and the UNet's input channels (4; 9 for
an inpainting model: latent + mask + masked-image latent, as sd-v1-5-inpainting and SDXL inpainting 0.1; 8 for an
InstructPix2Pix-style edit model: latent + the source image's latent, as instruct-pix2pix and CosXL Edit).
Anything else (a truncated file, a pickle renamed to .safetensors, a refiner, Flux, a LoRA in the wrong
folder) is refused here with a message that says what the file seems to be. The Arch also names the
checkpoint's own model sampling (SD2 768-v and `v_pred` SDXL files are v-prediction): for an SD2 file that
takes one small weight's values, and an SDXL file with `edm_vpred.*` keys (CosXL, CosXL Edit: v-prediction on a
continuous EDM range) its two sigmas: the only reads beyond the header.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from engine.errors import UnsafeModelFile, UnsupportedModel
from engine.models.safetensors_header import corrupt, data_end, entry_extent

if TYPE_CHECKING:
    from engine.samplers.model_sampling import ModelSampling

__all__ = [
    "CONFIG_ROOT",
    "INPAINT_CHANNELS",
    "IP2P_CHANNELS",
    "PICKLE_SUFFIXES",
    "SUPPORTED",
    "Arch",
    "detect_checkpoint",
    "detect_from_header",
    "read_header_shapes",
    "predicts_v",
    "read_pickle_weights",
    "read_shapes",
    "v_prediction_probe",
]

Family = Literal["sd15", "sdxl", "sd2"]
Shapes = Mapping[str, Sequence[int]]

CONFIG_ROOT = Path(__file__).parent / "configs"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED = "Noodle loads SD1.x and SDXL single-file .safetensors checkpoints (and SD2.x: 512 eps, 768 v-prediction)"
# A real header is a few hundred KB even for SDXL; a larger claim means the file is not safetensors
# (random bytes read as a length), and reading it would only waste memory.
MAX_HEADER_BYTES = 64 * 1024 * 1024

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_IN = "first_stage_model.encoder.conv_in.weight"
SD1_CLIP = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SDXL_CLIP_L = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
SDXL_CLIP_G = "conditioner.embedders.1.model.token_embedding.weight"
SD2_CLIP = "cond_stage_model.model.token_embedding.weight"  # OpenCLIP ViT-H, 1024 wide
# 4 latent channels + ComfyUI's concat_keys ("mask", "masked_image"): 1 + 4
INPAINT_CHANNELS = 9
# 4 latent channels + ComfyUI's IP2P concat (the edit's source image latent): SD15/SDXL_instructpix2pix
IP2P_CHANNELS = 8
# supported_models.py SDXL.model_type: these keys make a file V_PREDICTION_EDM (CosXL), its sigmas their values
EDM_VPRED_MAX, EDM_VPRED_MIN = "edm_vpred.sigma_max", "edm_vpred.sigma_min"


@dataclass(frozen=True)
class Arch:
    """An architecture Noodle can load: its family, its diffusers config folder, and tiny or real."""

    family: Family
    config_dir: Path
    tiny: bool
    # 9 for an inpainting UNet, 8 for an InstructPix2Pix one; its config is the folder's with in_channels
    # overridden (no folder of its own)
    in_channels: int = 4
    # the checkpoint's own model sampling, as ComfyUI decides it from the weights (ModelSamplingDiscrete
    # overrides it): "eps" or "v_prediction" (SD2 768-v, SDXL files with a `v_pred` key), zsnr (`ztsnr` key)
    prediction: str = "eps"
    zsnr: bool = False
    # (sigma_min, sigma_max) of an SDXL file with `edm_vpred.*` keys: v-prediction on that continuous EDM range
    # (ComfyUI's V_PREDICTION_EDM, as ModelSamplingContinuousEDM sets it)
    edm_sigmas: tuple[float, float] | None = None

    @property
    def label(self) -> str:
        """For people: "SD1.x", "SD2.x" or "SDXL", with " v-prediction" (and " zsnr") when the file says so."""
        family = {"sd15": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[self.family]
        return (family + (" v-prediction" if self.prediction == "v_prediction" else "")
                + (" EDM" if self.edm_sigmas is not None else "") + (" zsnr" if self.zsnr else ""))

    @property
    def sampling(self) -> ModelSampling:
        """The ModelSampling a MODEL of this checkpoint has without a ModelSamplingDiscrete node."""
        from engine.samplers.model_sampling import ContinuousEDM, ModelSampling  # noqa: PLC0415 (loads diffusers)

        if self.edm_sigmas is not None:
            low, high = self.edm_sigmas
            return ContinuousEDM(self.prediction, sigma_low=low, sigma_high=high)
        return ModelSampling(self.prediction, self.zsnr)

    @property
    def name(self) -> str:
        """The config folder's name: "sd15", "sd2", "sdxl" or "tiny-" one of them (+ "-inpainting" for 9 channels,
        "-ip2p" for 8)."""
        return self.config_dir.name + ("-inpainting" if self.inpainting else "-ip2p" if self.instruct else "")

    @property
    def inpainting(self) -> bool:
        """Whether the UNet takes ComfyUI's inpainting concat (mask + masked-image latent) beside the latent."""
        return self.in_channels == INPAINT_CHANNELS

    @property
    def instruct(self) -> bool:
        """Whether the UNet takes ComfyUI's IP2P concat (the source image's latent) beside the latent."""
        return self.in_channels == IP2P_CHANNELS

    @classmethod
    def of(cls, family: Family, tiny: bool, *, in_channels: int = 4) -> Arch:
        """The Arch for a family and size, pointing at Noodle's config folder for it."""
        return cls(family, CONFIG_ROOT / (f"tiny-{family}" if tiny else family), tiny, in_channels)


def _refuse(name: str, problem: str) -> UnsupportedModel:
    return UnsupportedModel(f"{name!r} {problem}; {SUPPORTED}")


def _not_safetensors(path: Path, head: bytes) -> UnsupportedModel:
    """Say what a file that fails to parse as safetensors probably is."""
    if head.startswith(b"PK\x03\x04"):
        what = "is a PyTorch zip/pickle file, not safetensors (renamed?)"
    elif head[:1] == b"\x80":
        what = "is a pickle file, not safetensors (renamed?)"
    else:
        what = "is not a safetensors file (the header does not parse)"
    return _refuse(path.name, what)


def read_header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Keys and shapes from a safetensors header, after checking the file holds all the data it declares and each
    tensor's dtype, shape and offsets agree."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise _refuse(path.name, f"is too short to be a safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise _not_safetensors(path, head)
            raw = handle.read(length)
    except OSError as err:
        raise _refuse(path.name, f"cannot be read ({err.strerror})") from err
    try:
        header: Any = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _not_safetensors(path, head) from err
    if not isinstance(header, dict):
        raise _not_safetensors(path, head)
    shapes: dict[str, tuple[int, ...]] = {}
    extents: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shapes[key], start, end = entry_extent(path.name, key, entry)
        extents.append((start, end, key))
    end_of_data = data_end(path.name, extents)
    # safetensors itself refuses a file whose data is shorter or longer than its header says.
    if 8 + length + end_of_data != size:
        raise _refuse(
            path.name,
            f"is truncated or corrupt: its header declares {8 + length + end_of_data} bytes, the file has {size}",
        )
    return shapes


def read_pickle_weights(path: Path) -> dict[str, Tensor]:
    """Tensors from a .ckpt/.pt/.bin file, loaded with `torch.load(weights_only=True)`.

    Only for owners who set `models.allow_weights_only_pickle`: weights_only refuses any pickled
    object that is not a tensor or a plain container, which is what keeps a hostile file from
    running code. Checkpoints that nest their weights under "state_dict" are unwrapped.
    """
    try:
        data: Any = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeModelFile(
            f"{path.name!r} holds more than weights, so the weights-only loader refused it ({first}); "
            "convert it to .safetensors"
        ) from err
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise _refuse(path.name, f"could not be read as a PyTorch checkpoint ({err})") from err
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise _refuse(path.name, f"holds a {type(data).__name__}, not a dict of weights")
    # Training bookkeeping (step counters, EMA decay as a number) is not weights; keep tensors only.
    return {key: value for key, value in data.items() if isinstance(key, str) and isinstance(value, Tensor)}


def read_safetensors(path: Path, what: str) -> dict[str, Tensor]:
    """All tensors of the .safetensors file `what` names ("GLIGEN file 'x'"), for loaders that read no pickle even
    where the owner allows weights-only pickles: a pickle suffix is refused saying how to convert it, a file
    safetensors cannot read (empty, truncated) refused naming it, not with safetensors' own error."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise UnsafeModelFile(f"{what} is a pickle file ({suffix}), and pickle files can run code when loaded; this "
                              "kind of model loads from .safetensors only. Convert it once with `noodle convert` "
                              f"(it writes {path.stem}.safetensors beside it) and choose that file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UnsupportedModel(f"{what} could not be read as safetensors ({err}): it is empty, truncated or not a "
                               "safetensors file; download it again or save it anew") from err


def read_shapes(path: Path, *, allow_weights_only_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a model file: the safetensors header, or (when allowed) a weights-only pickle."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_weights_only_pickle:
            raise UnsafeModelFile(
                f"{path.name!r} is a pickle file, and pickle files can run code when loaded; only .safetensors "
                "is loaded unless the owner sets models.allow_weights_only_pickle = true in config.toml"
            )
        return {key: tuple(value.shape) for key, value in read_pickle_weights(path).items()}
    return read_header_shapes(path)


def _config(arch: Arch, component: str) -> dict[str, Any]:
    return json.loads((arch.config_dir / component / "config.json").read_text())


def _widths(arch: Arch) -> dict[str, int]:
    """The shapes that tell a real model from a tiny one: UNet conv_in and each CLIP's width."""
    widths = {
        UNET_IN: _config(arch, "unet")["block_out_channels"][0],
        VAE_IN: _config(arch, "vae")["block_out_channels"][0],
    }
    if arch.family == "sd15":
        widths[SD1_CLIP] = _config(arch, "text_encoder")["hidden_size"]
    elif arch.family == "sd2":
        widths[SD2_CLIP] = _config(arch, "text_encoder")["hidden_size"]
    else:
        widths[SDXL_CLIP_L] = _config(arch, "text_encoder")["hidden_size"]
        widths[SDXL_CLIP_G] = _config(arch, "text_encoder_2")["hidden_size"]
    return widths


def _what_else(keys: Sequence[str]) -> str:
    """A guess at what a file without an SD UNet is, so the message can say where it belongs."""
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "looks like a LoRA, not a checkpoint (put it in loras/)"
    if "encoder.conv_in.weight" in keys or "decoder.conv_in.weight" in keys:
        return "looks like a standalone VAE, not a checkpoint (put it in vae/)"
    if "emb_params" in keys or "clip_l" in keys or "clip_g" in keys:
        return "looks like a textual-inversion embedding, not a checkpoint (put it in embeddings/)"
    if any("double_blocks." in k for k in keys):
        return "looks like a Flux model, which Noodle does not run"
    if any("joint_blocks." in k for k in keys):
        return "looks like an SD3 model, which Noodle does not run"
    return "has no Stable Diffusion UNet (model.diffusion_model.*) and an unknown layout"


def detect_from_header(shapes: Shapes, name: str = "<header>") -> Arch:
    """The Arch of a checkpoint given its keys and shapes; raises UnsupportedModel naming `name`."""
    keys = list(shapes)
    if UNET_IN not in shapes:
        raise _refuse(name, _what_else(keys))
    if SDXL_CLIP_G not in shapes and any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        if shapes.get("conditioner.embedders.0.model.token_embedding.weight", (0, 0))[-1] == 1024:
            raise _refuse(name, "looks like an SD2.x model saved in the sgm layout (conditioner.embedders.0.model.*), "
                                "which Noodle does not load; save it in the original layout (cond_stage_model.*)")
        raise _refuse(name, "looks like an SDXL refiner, which Noodle does not run")
    if len(shapes[UNET_IN]) != 4 or shapes[UNET_IN][1] not in (4, IP2P_CHANNELS, INPAINT_CHANNELS):
        channels = shapes[UNET_IN][1] if len(shapes[UNET_IN]) > 1 else "?"
        raise _refuse(name, f"has a UNet with {channels} input channels; Noodle runs 4 (plain), {IP2P_CHANNELS} "
                            f"(InstructPix2Pix-style edit) and {INPAINT_CHANNELS} (inpainting)")

    family: Family
    if SD1_CLIP in shapes:
        family = "sd15"
    elif SD2_CLIP in shapes:
        if any(k.startswith("model.diffusion_model.label_emb.") for k in keys):  # ComfyUI's SD21UnclipL/H
            raise _refuse(name, "looks like an SD2.1 unCLIP model (its UNet takes an image embedding), which Noodle "
                                "does not run")
        if shapes[UNET_IN][1] == IP2P_CHANNELS:  # ComfyUI has SD1.5 and SDXL InstructPix2Pix models only
            raise _refuse(name, f"looks like an SD2.x model with an InstructPix2Pix-style UNet ({IP2P_CHANNELS} "
                                "input channels), which neither ComfyUI nor Noodle runs")
        family = "sd2"
    elif SDXL_CLIP_L in shapes and SDXL_CLIP_G in shapes:
        family = "sdxl"
    else:
        raise _refuse(name, "has a UNet but no text encoder Noodle knows (CLIP-L for SD1.x, OpenCLIP ViT-H for SD2.x, "
                            "CLIP-L + bigG for SDXL)")
    if VAE_IN not in shapes:
        raise _refuse(name, "has no VAE weights (first_stage_model.*); Noodle needs checkpoints with their VAE")

    # Convolutions give their width first ([out, in, 3, 3]); token embeddings last ([vocab, width]).
    probes = _widths(Arch.of(family, False))
    found = {key: shapes[key][0] if key in (UNET_IN, VAE_IN) else shapes[key][-1] for key in probes}
    for tiny in (False, True):
        if found == _widths(Arch.of(family, tiny)):
            arch = Arch.of(family, tiny, in_channels=shapes[UNET_IN][1])
            # supported_models.py SDXL.model_type: `edm_vpred.sigma_max` marks v-prediction on a continuous EDM
            # range (its sigmas are read by `detect_checkpoint`; ModelSamplingContinuousEDM's defaults until then), a
            # `v_pred` key v-prediction, `ztsnr` zero terminal SNR as well; an SD2 file's type is in a weight's
            # values (`detect_checkpoint`), SD1.x is always eps
            if family == "sdxl" and EDM_VPRED_MAX in shapes:
                arch = replace(arch, prediction="v_prediction", edm_sigmas=(0.002, 120.0))
            elif family == "sdxl" and "v_pred" in shapes:
                arch = replace(arch, prediction="v_prediction", zsnr="ztsnr" in shapes)
            return arch
    real, small = _widths(Arch.of(family, False)), _widths(Arch.of(family, True))
    raise _refuse(
        name,
        f"has {family} keys but widths {list(found.values())} match neither the real model "
        f"{list(real.values())} nor Noodle's tiny test model {list(small.values())}",
    )


def v_prediction_probe(shapes: Shapes) -> str | None:
    """The weight ComfyUI reads to tell an SD2 v-prediction UNet: the first transformer's norm1 bias in the last
    output block that has one (output_blocks.11 in SD2; Noodle's tiny UNet has fewer blocks)."""
    prefix, suffix = "model.diffusion_model.output_blocks.", ".1.transformer_blocks.0.norm1.bias"
    found = [int(key[len(prefix):-len(suffix)]) for key in shapes
             if key.startswith(prefix) and key.endswith(suffix) and key[len(prefix):-len(suffix)].isdigit()]
    return f"{prefix}{max(found)}{suffix}" if found else None


def predicts_v(probe: Tensor) -> bool:
    """supported_models.py SD20.model_type: v-prediction when the probe bias's standard deviation is above 0.09.
    ComfyUI's own comment doubts the heuristic; it is what ComfyUI 0.3.64 does (it never reads the yaml shipped beside
    768-v files), so a file Noodle calls v-prediction is one ComfyUI samples as v-prediction, and both can be forced
    with ModelSamplingDiscrete."""
    return float(torch.std(probe.float(), unbiased=False)) > 0.09


def _sd2_prediction(path: Path, shapes: Shapes, allow_weights_only_pickle: bool) -> str:
    key = v_prediction_probe(shapes)
    if key is None:
        return "eps"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        probe = read_pickle_weights(path)[key] if allow_weights_only_pickle else None
    else:
        probe = _read_tensors(path, [key])[key]  # one small tensor, not the weights
    return "v_prediction" if probe is not None and predicts_v(probe) else "eps"


def _read_tensors(path: Path, keys: Sequence[str]) -> dict[str, Tensor]:
    """A few tensors of a safetensors file; one safetensors cannot read is refused naming the file, not with the
    library's own error (which names neither the file nor what to do)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as err:
        raise corrupt(path.name, f"safetensors cannot read it ({err})") from err


def _edm_sigmas(path: Path, shapes: Shapes, allow_weights_only_pickle: bool) -> tuple[float, float]:
    """supported_models.py SDXL.model_type for a V_PREDICTION_EDM file: sigma_max from `edm_vpred.sigma_max`,
    sigma_min from `edm_vpred.sigma_min` when the file has it, else ModelSamplingContinuousEDM's 0.002."""
    keys = [key for key in (EDM_VPRED_MIN, EDM_VPRED_MAX) if key in shapes]
    if path.suffix.lower() in PICKLE_SUFFIXES:
        weights = read_pickle_weights(path) if allow_weights_only_pickle else {}
        values = {key: float(weights[key].float().reshape(-1)[0]) for key in keys if key in weights}
    else:
        tensors = _read_tensors(path, keys)  # two scalars, not the weights
        values = {key: float(tensor.float().reshape(-1)[0]) for key, tensor in tensors.items()}
    low, high = values.get(EDM_VPRED_MIN, 0.002), values.get(EDM_VPRED_MAX, 120.0)
    if not (0.0 < low < high and high < float("inf")):
        raise _refuse(path.name, f"declares a continuous EDM range (edm_vpred.*) of sigma_min {low:g} and sigma_max "
                                 f"{high:g}; a model needs 0 < sigma_min < sigma_max")
    return low, high


def detect_checkpoint(path: Path, *, allow_weights_only_pickle: bool = False) -> Arch:
    """The Arch of a single-file checkpoint, from its header (or, when allowed, a weights-only pickle).

    An SD2 file's prediction type (eps or v) is read from one weight's values, an SDXL EDM file's sigmas from its
    `edm_vpred.*` scalars, as ComfyUI decides them."""
    shapes = read_shapes(path, allow_weights_only_pickle=allow_weights_only_pickle)
    arch = detect_from_header(shapes, path.name)
    if arch.family == "sd2" and arch.in_channels == 4:  # SD20.model_type: SD2 inpainting models are eps
        arch = replace(arch, prediction=_sd2_prediction(path, shapes, allow_weights_only_pickle))
    if arch.edm_sigmas is not None:
        arch = replace(arch, edm_sigmas=_edm_sigmas(path, shapes, allow_weights_only_pickle))
    return arch
