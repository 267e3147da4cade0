"""Which architecture a checkpoint file holds, read from its safetensors header alone.

The model manager calls `detect_checkpoint` before loading: it reads the header (a few KB of JSON
with every key and shape), never the weights, and answers with an `Arch` naming the family
(SD1.x or SDXL), the config folder under `engine/models/configs/` that diffusers' single-file
loader needs offline, and whether it is one of Noodle's tiny test models. Anything else (a
truncated file, a pickle renamed to .safetensors, SD2, a refiner, Flux, a LoRA in the wrong
folder) is refused here with a message that says what the file seems to be.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from engine.errors import UnsafeModelFile, UnsupportedModel

__all__ = [
    "CONFIG_ROOT",
    "PICKLE_SUFFIXES",
    "SUPPORTED",
    "Arch",
    "detect_checkpoint",
    "detect_from_header",
    "read_header_shapes",
    "read_pickle_weights",
    "read_shapes",
]

Family = Literal["sd15", "sdxl"]
Shapes = Mapping[str, Sequence[int]]

CONFIG_ROOT = Path(__file__).parent / "configs"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED = "Noodle loads SD1.x and SDXL single-file .safetensors checkpoints"
# A real header is a few hundred KB even for SDXL; a larger claim means the file is not safetensors
# (random bytes read as a length), and reading it would only waste memory.
MAX_HEADER_BYTES = 64 * 1024 * 1024

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_IN = "first_stage_model.encoder.conv_in.weight"
SD1_CLIP = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SDXL_CLIP_L = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
SDXL_CLIP_G = "conditioner.embedders.1.model.token_embedding.weight"


@dataclass(frozen=True)
class Arch:
    """An architecture Noodle can load: its family, its diffusers config folder, and tiny or real."""

    family: Family
    config_dir: Path
    tiny: bool

    @property
    def name(self) -> str:
        """The config folder's name: "sd15", "sdxl", "tiny-sd15" or "tiny-sdxl"."""
        return self.config_dir.name

    @classmethod
    def of(cls, family: Family, tiny: bool) -> Arch:
        """The Arch for a family and size, pointing at Noodle's config folder for it."""
        return cls(family, CONFIG_ROOT / (f"tiny-{family}" if tiny else family), tiny)


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
    """Keys and shapes from a safetensors header, after checking the file holds all the data it declares."""
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
    data_end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            shape = tuple(int(dim) for dim in entry["shape"])
            start, end = (int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise _refuse(path.name, f"has a malformed safetensors header entry for {key!r}") from err
        if not 0 <= start <= end:
            raise _refuse(path.name, f"has a malformed safetensors header entry for {key!r}")
        shapes[key] = shape
        data_end = max(data_end, end)
    # safetensors itself refuses a file whose data is shorter or longer than its header says.
    if 8 + length + data_end != size:
        raise _refuse(
            path.name,
            f"is truncated or corrupt: its header declares {8 + length + data_end} bytes, the file has {size}",
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
    if "cond_stage_model.model.token_embedding.weight" in shapes:
        raise _refuse(name, "looks like an SD2.x model (OpenCLIP ViT-H text encoder), which Noodle does not run")
    if SDXL_CLIP_G not in shapes and any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise _refuse(name, "looks like an SDXL refiner, which Noodle does not run")
    if len(shapes[UNET_IN]) != 4 or shapes[UNET_IN][1] != 4:
        channels = shapes[UNET_IN][1] if len(shapes[UNET_IN]) > 1 else "?"
        raise _refuse(name, f"has a UNet with {channels} input channels (inpainting or instruct model); only 4 are run")

    family: Family
    if SD1_CLIP in shapes:
        family = "sd15"
    elif SDXL_CLIP_L in shapes and SDXL_CLIP_G in shapes:
        family = "sdxl"
    else:
        raise _refuse(name, "has a UNet but no text encoder Noodle knows (CLIP-L for SD1.x, CLIP-L + bigG for SDXL)")
    if VAE_IN not in shapes:
        raise _refuse(name, "has no VAE weights (first_stage_model.*); Noodle needs checkpoints with their VAE")

    # Convolutions give their width first ([out, in, 3, 3]); token embeddings last ([vocab, width]).
    probes = _widths(Arch.of(family, False))
    found = {key: shapes[key][0] if key in (UNET_IN, VAE_IN) else shapes[key][-1] for key in probes}
    for tiny in (False, True):
        if found == _widths(Arch.of(family, tiny)):
            return Arch.of(family, tiny)
    real, small = _widths(Arch.of(family, False)), _widths(Arch.of(family, True))
    raise _refuse(
        name,
        f"has {family} keys but widths {list(found.values())} match neither the real model "
        f"{list(real.values())} nor Noodle's tiny test model {list(small.values())}",
    )


def detect_checkpoint(path: Path, *, allow_weights_only_pickle: bool = False) -> Arch:
    """The Arch of a single-file checkpoint, from its header (or, when allowed, a weights-only pickle)."""
    return detect_from_header(read_shapes(path, allow_weights_only_pickle=allow_weights_only_pickle), path.name)
