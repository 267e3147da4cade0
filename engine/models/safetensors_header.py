"""Checks of a safetensors header's entries, as safetensors itself makes them when it loads a file: a known dtype,
no negative dimension, data offsets spanning exactly what the shape and dtype need, and tensors' data contiguous and
not overlapping. engine/models/detect.py runs them while it reads a header, so a header that lies is refused naming
the file and the tensor, before diffusers fails on it with an OSError quoting the file's full path.
"""

from __future__ import annotations

import math
from typing import Any

from engine.errors import UnsupportedModel

__all__ = ["DTYPE_BITS", "corrupt", "data_end", "entry_extent"]


def corrupt(name: str, problem: str) -> UnsupportedModel:
    return UnsupportedModel(f"{name!r} is corrupt: {problem}; download it again or save it anew")


# bits per element of each dtype the safetensors format names; a file naming another is not one safetensors reads
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
               "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
               "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def entry_extent(name: str, key: str, entry: Any) -> tuple[tuple[int, ...], int, int]:
    """A header entry's shape and data offsets, refused unless its dtype, shape and offsets agree (as safetensors
    itself checks when it loads: a header that lies here fails later inside diffusers, quoting the file's path)."""
    try:
        dtype = entry["dtype"]
        shape = tuple(int(dim) for dim in entry["shape"])
        start, end = (int(offset) for offset in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as err:
        raise corrupt(name, f"its header entry for {key!r} is malformed") from err
    if dtype not in DTYPE_BITS:
        raise corrupt(name, f"tensor {key!r} has the dtype {dtype!r}, which safetensors does not know")
    if any(dim < 0 for dim in shape):
        raise corrupt(name, f"tensor {key!r} has a negative dimension in its shape {list(shape)}")
    if not 0 <= start <= end:
        raise corrupt(name, f"its header entry for {key!r} has data offsets that run backwards")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits != 8 * (end - start):
        raise corrupt(name, f"tensor {key!r} is {dtype} {list(shape)}, {bits // 8 if bits % 8 == 0 else bits / 8} "
                            f"bytes, but its header gives it {end - start}")
    return shape, start, end


def data_end(name: str, extents: list[tuple[int, int, str]]) -> int:
    """Where the data of contiguous, non-overlapping tensors (start, end, key) ends, as safetensors requires."""
    offset = 0
    for start, end, key in sorted(extents):
        if start != offset:
            where = "overlaps the tensor before it" if start < offset else "leaves a gap after the tensor before it"
            raise corrupt(name, f"tensor {key!r} {where} (its data starts at byte {start}, that one's ends at "
                                f"{offset})")
        offset = end
    return offset
