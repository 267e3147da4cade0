"""PNG files that carry their own recipe: ComfyUI's `prompt` chunk and A1111's `parameters` text.

`parameters_text` follows A1111's layout (prompt, `Negative prompt: ...`, then `Key: value`
pairs; a value holding `,` `:` or a newline is JSON-quoted), so A1111's PNG Info, Civitai and
other tools read our files; `prompt` holds the API workflow, so ComfyUI loads them.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

# ComfyUI sampler names as A1111 writes them in `Sampler:`; the scheduler goes to `Schedule type:`.
A1111_SAMPLER_NAMES = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS", "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive", "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_3m_sde": "DPM++ 3M SDE",
    "ddim": "DDIM", "uni_pc": "UniPC", "lcm": "LCM", "ddpm": "DDPM",
}
A1111_SCHEDULE_NAMES = {
    "normal": "Automatic", "karras": "Karras", "exponential": "Exponential", "simple": "Simple",
    "sgm_uniform": "SGM Uniform", "ddim_uniform": "DDIM", "beta": "Beta", "kl_optimal": "KL Optimal",
    "linear_quadratic": "Linear quadratic",
}


def quote(value: Any) -> str:
    """A1111's rule: a value with a comma, colon or newline is written as a JSON string."""
    text = str(value)
    if any(ch in text for ch in ",:\n"):
        return json.dumps(text, ensure_ascii=False)
    return text


def parameters_text(prompt: str, negative: str, fields: Mapping[str, Any]) -> str:
    """The A1111 `parameters` text; fields in order, None values left out."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """Read an A1111 `parameters` text back into (prompt, negative, fields)."""
    lines = text.split("\n")
    last = lines.pop() if lines else ""
    negative_at = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt: ")), None)
    if negative_at is None:
        prompt, negative = "\n".join(lines), ""
    else:
        prompt = "\n".join(lines[:negative_at])
        negative = "\n".join(lines[negative_at:])[len("Negative prompt: "):]
    fields: dict[str, str] = {}
    decoder = json.JSONDecoder()
    rest = last
    while rest:
        key, sep, rest = rest.partition(": ")
        if not sep:
            break
        if rest.startswith('"'):
            value, end = decoder.raw_decode(rest)
            rest = rest[end:]
        else:
            value, _, rest = rest.partition(",")
            rest = "," + rest if _ else ""
        fields[key.strip()] = str(value)
        rest = rest.removeprefix(",").lstrip()
    return prompt, negative, fields


def save_png(image: Image.Image, path: Path, texts: Mapping[str, str], *, exclusive: bool = False) -> None:
    """Write `image` with each text as a PNG text chunk (iTXt where it is not latin-1); all of it or nothing.
    `exclusive`: FileExistsError rather than replace a file of that name (another writer took it meanwhile)."""
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        try:
            value.encode("latin-1")
            info.add_text(key, value)
        except UnicodeEncodeError:
            info.add_itxt(key, value)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file stands where the folder goes: not a name another writer took (that is below)
        raise NotADirectoryError(20, "a file stands where the folder for the PNG goes", str(path.parent)) from None
    # written under a temporary name, then renamed: a disk that fills mid-write leaves no half PNG that the
    # output folder, a result message or the next counter would take for an image
    # (a name of this writer's own: engine workers on Ray may share one output folder)
    partial = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        image.save(partial, format="PNG", pnginfo=info, compress_level=4)
        if exclusive:
            os.link(partial, path)  # fails if the name exists, where a rename would replace it
        else:
            partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def read_png_texts(path: Path) -> dict[str, str]:
    """The text chunks of a PNG file."""
    with Image.open(path) as image:
        return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
