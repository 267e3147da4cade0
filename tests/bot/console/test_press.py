"""`press JOB ACTION` in `noodle chat`: the buttons of a Discord result, typed, through the real Console, Studio,
engine on the tiny models and database."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from bot.console.app import Console, ConsolePublisher, LineReader
from tests.bot.conftest import Env


async def _console(env: Env, lines: list[str], tmp_path: Path) -> tuple[int, str]:
    out = io.StringIO()
    env.studio.results.publisher = ConsolePublisher(out)
    console = Console(env.studio, out, io.StringIO(), interactive=False, details_dir=tmp_path)
    code = await console.run(LineReader(io.StringIO("\n".join(lines) + "\n")))
    return code, out.getvalue()


def _sizes(out: str) -> list[tuple[int, int]]:
    sizes = []
    for line in out.splitlines():
        if line.startswith("wrote "):
            with Image.open(line.removeprefix("wrote ")) as image:
                sizes.append(image.size)
    return sizes


async def test_press_upscales_varies_zooms_pans_remixes_and_rerolls(env: Env, tmp_path: Path) -> None:
    code, out = await _console(env, [
        "/imagine prompt: a red fox seed: 42 steps: 2 width: 64 height: 64 batch: 2",
        "press last U2",
        "press last vary subtle",
        "press last zoom 2",
        "press last pan left",
        "press last remix prompt: a blue fox steps: 3 seed: 7",
        "press last reroll",
        "press last details",
    ], tmp_path)
    assert code == 0, out
    assert "🔍 Upscale of #1, image 2" in out
    assert "Upscale: Upscaled 2× with tiny-compact-x2, then hires fix at denoise 0.35" in out
    assert "🔀 Variation (subtle) of #2, image 1" in out
    assert "🔭 Zoom out 2× of #3, image 1" in out and "filled by inpainting model tiny-sd15-inpainting" in out
    assert "🔭 Pan left of #4, image 1" in out
    assert "✏️ Remix of #5" in out and "Prompt: a blue fox" in out and "Seed: 7" in out
    assert "🔁 Reroll of #6" in out
    # the batch's two, then 128 upscaled, varied at 128, zoomed out to 256, panned to 384 wide, remixed, rerolled
    assert _sizes(out) == [(64, 64), (64, 64), (128, 128), (128, 128), (256, 256), (384, 256), (384, 256),
                           (384, 256)]
    assert "workflow: " in out
    last_job = out.split("queued job ")[-1].split()[0]
    code, out = await _console(env, [f"press {last_job} delete"], tmp_path)
    assert code == 0 and "deleted #7" in out


async def test_press_mistakes_are_printed_and_counted(env: Env, tmp_path: Path) -> None:
    code, out = await _console(env, [
        "press",
        "press last U1",
        "/imagine prompt: a red fox seed: 42 steps: 2 width: 64 height: 64",
        "press last U3",
        "press last zoom 3",
        "press last pan sideways",
        "press last dance",
        "press last remix steps: abc",
        "press last remix",
        "press nothing reroll",
    ], tmp_path)
    assert code == 1
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 9, out
    assert "write press JOB ACTION" in errors[0] and "no job 'last'" in errors[1]
    assert "#1 has 1 image(s); pick 1 to 1" in errors[2]
    assert "zoom takes 1.5 or 2, not '3'" in errors[3]
    assert "pan takes left or right or up or down, not 'sideways'" in errors[4]
    assert "'dance' is not an action" in errors[5]
    assert errors[6].startswith("error: steps: 'abc' is not a whole number; give 1 to ")
    assert "remix needs what to change" in errors[7] and "prompt: a red fox; negative: ; steps: 2" in errors[7]
    assert "no job 'nothing'" in errors[8]
