"""`noodle chat`: console lines against the same Studio, the engine on the tiny models and a real database."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.console.app import Console, ConsolePublisher, LineReader, chat_settings, run_chat
from bot.settings import Settings
from tests.bot.conftest import Env

REPO = Path(__file__).resolve().parents[3]


async def _console(env: Env, lines: str, tmp_path: Path) -> tuple[int, str]:
    out = io.StringIO()
    env.studio.results.publisher = ConsolePublisher(out)
    console = Console(env.studio, out, io.StringIO(), interactive=False, details_dir=tmp_path)
    code = await console.run(LineReader(io.StringIO(lines)))
    return code, out.getvalue()


async def test_imagine_then_every_reaction_by_job_id_or_last(env: Env, tmp_path: Path) -> None:
    code, out = await _console(env, "\n".join([
        "# a comment, then an empty line",
        "",
        "/imagine prompt: a red fox seed: 42 steps: 4 width: 64 height: 64 batch: 2",
        "react last 🔁",
        "react last 2️⃣",
        "react last ℹ️",
        "react last 🗑️",
    ]), tmp_path)
    assert code == 0, out
    assert "Seed: #1 42 · #2 43" in out and "Tokens: prompt 3/75 · negative 0/75" in out
    assert "🔁 Reroll of #1" in out and "Cached: checkpoint, prompt, negative" in out
    assert "🔀 Variation of #2, image 2" in out
    assert out.count("wrote ") == 5  # two, two rerolled, one variation
    first_job = out.split("queued job ")[1].split()[0]
    assert f"job {first_job} (+1 more) · #1" in out
    workflow = next(tmp_path.glob("noodle-3-workflow.json"))
    assert json.loads(workflow.read_text())["12"]["class_type"] == "LoadImage"
    assert "deleted #3" in out
    code, out = await _console(env, f"react {first_job} ℹ️\n", tmp_path)
    assert code == 0 and "Seed: 42" in out


async def test_mistakes_are_printed_counted_and_the_session_goes_on(env: Env, tmp_path: Path) -> None:
    code, out = await _console(env, "\n".join([
        "/imagine prompt: a fox steps: 1000",
        "/imagine prompt: a fox model: tiny-sd16",
        "/imagine prompt: a fox image: /no/such/file.png",
        "react nothing 🔁",
        "react last 👍",
        "dance",
        "help",
    ]), tmp_path)
    assert code == 1
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 6
    assert "steps 1000 is outside 1..150" in errors[0]
    assert "closest: 'tiny-sd15.safetensors'" in errors[1]
    assert "cannot read /no/such/file.png" in errors[2]
    assert "no job 'nothing'" in errors[3] and "is not a reaction" in errors[4] and "unknown command" in errors[5]
    assert "react JOB" in out  # help


async def test_run_chat_opens_everything_and_closes_it(settings: Settings, tmp_path: Path) -> None:
    chat, note = chat_settings(settings, models=None, db=tmp_path / "chat.sqlite3", out=tmp_path / "out")
    assert note is None and chat.bot.database == tmp_path / "chat.sqlite3"
    out = io.StringIO()
    code = await run_chat(chat, stdin=io.StringIO("/imagine a small boat seed: 1 steps: 2 width: 64 height: 64\n"),
                          out=out, err=io.StringIO(), interactive=False)
    assert code == 0 and "Seed: 1" in out.getvalue()
    assert list((tmp_path / "out").rglob("*.png"))


@pytest.mark.slow
def test_make_run_without_a_token_or_stdin_runs_the_demo_and_exits_0(tmp_path: Path, tiny_models: Path) -> None:
    (tmp_path / ".cache").mkdir()
    os.symlink(tiny_models, tmp_path / ".cache" / "models")  # what `make tiny-models` leaves there
    (tmp_path / "config.toml").write_text('[models]\ndir = "no-models-here"\n[engine]\ndevice = "cpu"\n')
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "bot.cli", "main"], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "using the tiny test models" in done.stderr and "running the demo" in done.stdout
    assert "Seed: 42" in done.stdout and "🔁 Reroll of #1" in done.stdout and "🔍 Upscale of #2" in done.stdout
    assert (tmp_path / "noodle.sqlite3").is_file() and list((tmp_path / "output").rglob("*.png"))


async def test_imagine_takes_a_control_image_path_and_a_controlnet_and_models_lists_them(env: Env,
                                                                                         tmp_path: Path) -> None:
    from PIL import Image

    hint = tmp_path / "pose map.png"  # a space in the path: the value runs to the next option name
    Image.new("RGB", (64, 64), (0, 0, 0)).save(hint)
    code, out = await _console(env, "\n".join([
        f"/imagine prompt: a dancer control_image: {hint} controlnet: tiny-controlnet-sd15 control_strength: 0.7 "
        "control_canny: true steps: 2 width: 64 height: 64",
        "react last 🔁",
        "/models",
    ]), tmp_path)
    assert code == 0, out
    assert out.count("ControlNet: tiny-controlnet-sd15 · strength 0.7 · canny edges of the control image") == 2
    assert "· ControlNet tiny-controlnet-sd15 0.7 ·" in out  # the queued line
    assert "ControlNets (/imagine controlnet:): tiny-controlnet-sd15.safetensors (SD1.x)" in out
    assert "Upscale models (for /workflow): " in out


async def test_bad_control_options_are_refused_by_name(env: Env, tmp_path: Path) -> None:
    from PIL import Image

    hint = tmp_path / "hint.png"
    Image.new("RGB", (64, 64)).save(hint)
    code, out = await _console(env, "\n".join([
        f"/imagine prompt: a fox control_image: {tmp_path}/missing.png controlnet: tiny-controlnet-sd15",
        f"/imagine prompt: a fox control_image: {hint} controlnet: tiny-controlnet-sd51",
        f"/imagine prompt: a fox control_image: {hint} controlnet: tiny-controlnet-sd15 control_strength: 3",
        f"/imagine prompt: a fox control_image: {hint} controlnet: tiny-controlnet-sd15 control_canny: maybe",
        "/imagine prompt: a fox controlnet: tiny-controlnet-sd15",
    ]), tmp_path)
    assert code == 1 and "queued job" not in out
    assert f"error: control_image: cannot read {tmp_path}/missing.png (not a regular file)" in out
    assert "error: ControlNet 'tiny-controlnet-sd51' is not in models/controlnet; closest: 'tiny-controlnet-sd15" in out
    assert "error: control_strength 3 is outside 0..2" in out
    assert "error: control_canny 'maybe' is not true or false" in out
    assert "error: controlnet 'tiny-controlnet-sd15' needs a control image" in out
