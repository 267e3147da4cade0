"""`noodle convert`: turn pickle model files (.ckpt, .pt, .pth, .bin) into .safetensors beside them, once.

Noodle loads only .safetensors at run time (a pickle can run code when it is read). Shared workflows still name
pickles, and a pickle name runs on the .safetensors of the same stem (ModelCatalog.safetensors_for), so an owner
who has only the pickle converts it here, by explicit command: the file is read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers, and the tensors are
written with safetensors. Works for checkpoints, LoRAs, VAEs, ControlNets and upscalers alike: nothing here
depends on what the weights are, except for an A1111 hypernetwork (integer widths holding two state dicts), whose
layers are flattened and whose options go into the file's metadata (engine/models/hypernetwork.py).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import NoodleError, UnsafeModelFile
from engine.models.detect import PICKLE_SUFFIXES
from engine.models.hypernetwork import flatten_a1111
from engine.safetensors_file import save_safetensors

__all__ = ["ConvertError", "Converted", "convert_file", "convert_files", "unwrap_state_dict"]

# Where trainers nest the weights: Lightning's "state_dict", BasicSR's (Real-ESRGAN, most upscalers) "params_ema"
# (the averaged weights, preferred as spandrel does) and "params".
_NESTING_KEYS = ("state_dict", "params_ema", "params")


class ConvertError(NoodleError):
    """A file `noodle convert` could not turn into .safetensors; the message names the file and the fix."""


@dataclass(frozen=True)
class Converted:
    """One file written: where, how many tensors and bytes, and the non-tensor entries left out."""

    source: Path
    target: Path
    tensors: int
    nbytes: int
    dropped: tuple[str, ...]

    def line(self) -> str:
        """The progress line `noodle convert` prints for it."""
        dropped = f"; left out {len(self.dropped)} non-tensor entries ({', '.join(self.dropped[:5])}" \
                  f"{', ...' if len(self.dropped) > 5 else ''})" if self.dropped else ""
        return f"{self.source} -> {self.target.name}: {self.tensors} tensors, {self.nbytes / 1e6:.1f} MB{dropped}"


def unwrap_state_dict(data: Any) -> Any:
    """The dict of weights inside a loaded checkpoint, as ComfyUI's load_torch_file and spandrel find it:
    "state_dict", "params_ema" or "params" nesting, or a dict whose only entry is a dict."""
    while isinstance(data, dict):
        inner = next((data[key] for key in _NESTING_KEYS if isinstance(data.get(key), dict)), None)
        if inner is None and len(data) == 1 and isinstance(next(iter(data.values())), dict):
            inner = next(iter(data.values()))
        if inner is None:
            return data
        data = inner
    return data


def _flat_tensors(weights: dict[Any, Any], source: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors to write (contiguous, none sharing memory: safetensors refuses shared storage) and the names
    of the entries that are not tensors (step counters, EMA decay, hyper-parameters)."""
    tensors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    seen: set[int] = set()
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor) or not isinstance(key, str):
            dropped.append(str(key))
            continue
        if value.layout != torch.strided or value.is_quantized:  # safetensors holds plain dense tensors only
            kind = "quantized" if value.is_quantized else f"a {value.layout} tensor"
            raise ConvertError(f"{source}: tensor {key!r} is {kind}, which a .safetensors file cannot hold; no SD "
                               "model stores its weights so: this file is not one Noodle loads")
        tensor = value.detach().contiguous()
        storage = tensor.untyped_storage()
        # a view of a bigger tensor, or a second name for the same one (tied weights): its own copy
        if storage.data_ptr() in seen or storage.nbytes() != tensor.nbytes:
            tensor = tensor.clone()
            storage = tensor.untyped_storage()
        seen.add(storage.data_ptr())
        tensors[key] = tensor
    return tensors, dropped


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The one line of torch's long weights-only message that says what it met ("Unsupported global: GLOBAL
    x.Y was not an allowed global by default ...", "Unsupported operand 110")."""
    text = str(err)
    # a blocked function ("Trying to load unsupported GLOBAL posix.system whose module posix is blocked") comes
    # without the WeightsUnpickler line: the line naming the global is the reason, wherever it is
    named = [line.strip() for line in text.splitlines() if "global" in line.lower() and "weights_only" not in line]
    if named:
        return named[0]
    _, found, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if found else text).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def convert_file(source: Path, *, force: bool = False) -> Converted:
    """Write `source`'s weights as `<stem>.safetensors` beside it; raises ConvertError (UnsafeModelFile for a
    pickle that holds more than weights) with the reason."""
    source = Path(source)
    if source.suffix.lower() not in PICKLE_SUFFIXES:
        what = ("already .safetensors" if source.suffix.lower() == ".safetensors"
                else f"a {source.suffix or 'suffix-less'} file")
        raise ConvertError(f"{source}: is {what}; noodle convert reads pickle files ({', '.join(PICKLE_SUFFIXES)})")
    if not source.is_file():
        raise ConvertError(f"{source}: no such file")
    target = source.with_suffix(".safetensors")
    if target.exists() and not force:
        raise ConvertError(f"{source}: {target.name} exists already; it is left as it is (--force rewrites it)")
    try:
        data = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(err)
        if "global" in reason.lower():  # a class or function in the pickle: code, not weights
            raise UnsafeModelFile(
                f"{source}: holds more than weights, so torch's weights-only loader refused it ({reason}); it is "
                "not converted. Get the .safetensors release of this model instead") from err
        raise ConvertError(f"{source}: could not be read as a PyTorch file ({reason})") from err
    except Exception as err:  # a damaged file: torch.load raises whatever its parser trips on (struct.error ...)
        raise ConvertError(f"{source}: could not be read as a PyTorch file ({type(err).__name__}: {err})") from err
    metadata = {"format": "pt", "converted_from": source.name}
    hypernetwork = flatten_a1111(data)  # widths -> (key, value) state dicts: flat keys, options as metadata
    if hypernetwork is not None:
        tensors, dropped = _flat_tensors(hypernetwork[0], source)
        metadata |= hypernetwork[1]
    else:
        weights = unwrap_state_dict(data)
        if not isinstance(weights, dict):
            raise ConvertError(f"{source}: holds a {type(weights).__name__}, not a dict of weights")
        tensors, dropped = _flat_tensors(weights, source)
    if not tensors:
        raise ConvertError(f"{source}: holds no tensors, so there is nothing to convert")
    # written under a temporary name, then renamed: a failed or interrupted write leaves no half file that
    # the models folder would list
    partial = target.with_name(f".{target.name}.part")
    try:
        save_safetensors(tensors, str(partial), metadata=metadata)
        os.replace(partial, target)
    except (OSError, RuntimeError, KeyError, TypeError) as err:  # the disk, or a tensor safetensors cannot store
        _discard(partial)
        raise ConvertError(f"{source}: could not be written as {target.name} ({type(err).__name__}: {err})") from err
    except BaseException:
        _discard(partial)
        raise
    return Converted(source, target, len(tensors), sum(t.nbytes for t in tensors.values()), tuple(dropped))


def _discard(partial: Path) -> None:
    try:
        partial.unlink(missing_ok=True)
    except OSError:  # a read-only folder: the error that brought us here is the one to tell
        pass


def convert_files(paths: list[Path], *, force: bool = False,
                  report: Callable[[str], None] = print) -> int:
    """Convert each file, one progress line each (`report`), going on past a bad one; 0 when all were written,
    1 otherwise."""
    failed = 0
    for path in paths:
        try:
            report(convert_file(path, force=force).line())
        except NoodleError as err:
            failed += 1
            report(f"error: {err}")
    return 1 if failed else 0
