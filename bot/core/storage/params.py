"""The params of an /imagine result as stored, versioned: what 🔁 and 🔀 read back to build the same graph again.

A row keeps `WorkflowParams` as JSON with a `version`. Reading it back migrates older versions step by
step (each step renames, drops or fills what that version changed), then validates the result as the
typed `WorkflowParams` (pydantic over the dataclass): a field renamed in a later release still rerolls an
old result, and a row that no longer makes sense is refused with what is wrong, never half-built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any

from pydantic import TypeAdapter, ValidationError

from engine.templates import WorkflowParams

__all__ = ["PARAMS_VERSION", "StoredParamsInvalid", "dump_params", "load_params"]

PARAMS_VERSION = 3
_ADAPTER = TypeAdapter(WorkflowParams)
_FIELDS = {f.name for f in fields(WorkflowParams)}


class StoredParamsInvalid(ValueError):
    """A stored row's params cannot be read back as WorkflowParams."""


def _from_v0(data: dict[str, Any]) -> dict[str, Any]:
    """Rows written before versions: `extra` (an always-empty dict WorkflowParams once had) is dropped."""
    data.pop("extra", None)
    return data


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 2 added inpainting and a ControlNet: a v1 row had neither. `inpaint` is filled False even when its
    init image has transparency, so an old result rerolls as the plain img2img it was."""
    for name, value in (("inpaint", False), ("control_image", None), ("controlnet", None),
                        ("control_strength", 1.0), ("control_canny", False)):
        data.setdefault(name, value)
    return data


def _from_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 3 added the actions under a result (upscale, zoom out, pan): a v2 row was none of them."""
    for name, value in (("upscale_by", 1.0), ("upscale_model", None), ("upscale_method", "nearest-exact"),
                        ("prescale", None), ("outpaint", None), ("outpaint_feathering", 40),
                        ("inpaint_checkpoint", None)):
        data.setdefault(name, value)
    return data


# version -> the step that turns a row of that version into one of the next
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _from_v0, 1: _from_v1, 2: _from_v2}


def dump_params(params: WorkflowParams) -> dict[str, Any]:
    """`params` as JSON-ready data, tagged with the current version."""
    return {"version": PARAMS_VERSION, **asdict(params)}


def load_params(stored: dict[str, Any]) -> WorkflowParams:
    """Stored params of any version -> WorkflowParams; StoredParamsInvalid says what does not fit."""
    data = dict(stored)
    version = data.pop("version", 0)
    if not isinstance(version, int) or not 0 <= version <= PARAMS_VERSION:
        raise StoredParamsInvalid(f"params version {version!r} is not one this Noodle reads (0..{PARAMS_VERSION})")
    for step in range(version, PARAMS_VERSION):
        data = MIGRATIONS[step](data)
    unknown = sorted(set(data) - _FIELDS)
    if unknown:  # a field renamed without a migration step would otherwise fall back to its default unseen
        raise StoredParamsInvalid(f"params hold {', '.join(unknown)}, which WorkflowParams has no field for")
    try:
        return _ADAPTER.validate_python(data, strict=False)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in err.errors())
        raise StoredParamsInvalid(problems) from None
