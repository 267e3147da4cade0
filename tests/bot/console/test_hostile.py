"""Hostile console lines (issue 12, point 17) through the real console, Studio, engine and SQLite file: each bad
value is one `error:` line that says what is allowed, leaves no row or file behind, and the next command works."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from bot.console.app import Console, ConsolePublisher, LineReader
from bot.core.errors import RequestInvalid
from engine.nodes.base import SEED_MAX
from tests.bot.conftest import Env
from tests.engine.conftest import txt2img

SMALL = "steps: 2 width: 64 height: 64"


async def session(env: Env, lines: list[str], tmp_path: Path) -> tuple[int, list[str]]:
    """Run `lines` in ONE console (so `last` carries over); its exit code and what it printed, line by line."""
    out = io.StringIO()
    env.studio.results.publisher = ConsolePublisher(out)
    console = Console(env.studio, out, io.StringIO(), interactive=False, details_dir=tmp_path)
    code = await console.run(LineReader(io.StringIO("\n".join(lines) + "\n")))
    return code, out.getvalue().splitlines()


async def snapshot(env: Env) -> tuple[list[Any], set[str]]:
    files = {str(p) for p in env.settings.engine.output_dir.rglob("*") if p.is_file()}
    return [(g.id, g.state) for g in await env.store.recent(limit=100)], files


def errors(printed: list[str]) -> list[str]:
    return [line for line in printed if line.startswith("error: ")]


async def test_bad_values_are_refused_and_leave_nothing_behind(env: Env, tmp_path: Path) -> None:
    before = await snapshot(env)
    code, printed = await session(env, [
        f"/imagine prompt: a __{'a' * 300}__ fox {SMALL}",
        f"/imagine prompt: (fox:1e39) {SMALL}",
        f"/imagine prompt: {'(' * 1000}fox {SMALL}",
        f"/imagine prompt: a fox negative: (blur:1e39) {SMALL}",
        f"/imagine prompt: a fox seed: {SEED_MAX + 1} {SMALL}",
        f"/imagine prompt: a fox seed: {SEED_MAX} batch: 2 {SMALL}",
        "react last 🔀 abc",
        "/queue cancel: 99999999999999999999999",
    ], tmp_path)
    assert code == 1
    assert errors(printed) == [
        "error: prompt: wildcard __aaaaaaaaaaaaaaaaaaaa…__ has a 300-character name; wildcard names are at most 100 "
        "letters, digits, _ and - (with / between folders): available: __animals__, __colors__",
        "error: prompt: emphasis weight 1e39 on 'fox' is outside -100 to 100, the range this bot allows; weights of "
        "0.5 to 1.5 are usual: write it like (fox:1.2)",
        "error: prompt: brackets nest 1000 deep here; at most 64 ( and [ may be open at once (each ( multiplies the "
        "weight by 1.1): close them, or write one weight, as in (word:1.5)",
        "error: negative: emphasis weight 1e39 on 'blur' is outside -100 to 100, the range this bot allows; weights "
        "of 0.5 to 1.5 are usual: write it like (blur:1.2)",
        f"error: seed {SEED_MAX + 1} is outside 0..{SEED_MAX}; use a whole number from 0, or leave it out for a "
        "random one",
        f"error: seed {SEED_MAX} leaves no room for 2 images (one seed each, up to {SEED_MAX}); use a smaller seed",
        "error: no job 'last' here; use a job id printed in a result's last line, or `last`",
        "error: there is no request #99999999999999999999999; /queue lists yours with their numbers",
    ]
    assert len(printed) == 8  # the eight refusals and nothing else: no traceback, no half-made job
    assert await snapshot(env) == before  # no row, no upload, no PNG


async def test_the_largest_seed_runs_is_stored_and_the_session_goes_on(env: Env, tmp_path: Path) -> None:
    code, printed = await session(env, [
        f"/imagine prompt: a fox seed: {SEED_MAX} {SMALL}",
        "react last 🔀 abc",
        "react last 🔀 2",
        "react last 🔀 1 2",
        "react last 🔁 abc",
        "react last 🔁",
        f"/imagine prompt: a fox seed: 7 {SMALL}",
    ], tmp_path)
    assert code == 1
    text = "\n".join(printed)
    assert f"Seed: {SEED_MAX}" in text and "🔁 Reroll of #1" in text and "Seed: 7" in text
    assert errors(printed) == [
        "error: 'abc' is not an image number of #1: it has 1 image(s), pick 1 to 1, as in react last 🔀 1",
        "error: '2' is not an image number of #1: it has 1 image(s), pick 1 to 1, as in react last 🔀 1",
        "error: 🔀 takes one image number, as in react last 🔀 1; not '1 2'",
        "error: 🔁 takes nothing after it: react last 🔁; not 'abc'",
    ]
    assert text.count("wrote ") == 3
    # SQLite keeps signed 64-bit integers: the seed reads back whole, after a restart too
    await env.restart()
    first = await env.store.get(1)
    assert first.seed == SEED_MAX and first.image_seeds == [SEED_MAX] and first.workflow["3"]["inputs"]["seed"] \
        == SEED_MAX


async def test_discord_and_the_console_refuse_a_seed_with_the_same_words(env: Env, tmp_path: Path) -> None:
    with pytest.raises(RequestInvalid) as caught:  # what the /imagine cog hands the Studio
        await env.studio.generations.parse({"prompt": "a fox", "seed": SEED_MAX + 1})
    _, printed = await session(env, [f"/imagine prompt: a fox seed: {SEED_MAX + 1}"], tmp_path)
    assert errors(printed) == [f"error: {caught.value}"]


async def test_a_workflow_with_an_extreme_weight_fails_its_job_with_the_weight_named(env: Env, tmp_path: Path) -> None:
    graph = txt2img(seed=3, batch_size=1, filename_prefix="ComfyUI")
    graph["6"]["inputs"]["text"] = "(fox:1e39)"
    path = tmp_path / "weights.json"
    path.write_text(json.dumps(graph), encoding="utf-8")
    code, printed = await session(env, [f"/workflow {path}", f"/imagine prompt: a fox {SMALL}"], tmp_path)
    assert code == 1
    [failed] = errors(printed)
    assert failed.endswith("node 6 (CLIPTextEncode) failed: node 6: emphasis weight 1e39 on 'fox' is outside -100 "
                           "to 100, the range this bot allows; weights of 0.5 to 1.5 are usual: write it like "
                           "(fox:1.2)")
    assert "\n".join(printed).count("wrote ") == 1  # the next job's image


async def test_a_bug_of_ours_is_one_line_and_the_console_serves_on(env: Env, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> str:  # a fault injected at the one call /models makes: the edge must hold
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(env.studio.models, "text", broken)
    code, printed = await session(env, ["/models", f"/imagine prompt: a fox {SMALL}"], tmp_path)
    assert code == 1
    assert errors(printed) == ["error: Noodle failed on this command (ZeroDivisionError: division by zero); the "
                               "traceback is in the log. The console goes on with the next command"]
    assert "\n".join(printed).count("wrote ") == 1
    assert any(record.exc_info and "'/models'" in record.getMessage() for record in caplog.records)


async def test_local_files_are_read_bounded_and_a_device_is_refused(env: Env, tmp_path: Path) -> None:
    limit = env.studio.allowed.max_attachment_bytes
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(limit + 500_000))
    code, printed = await session(env, [f"/imagine prompt: a fox image: {big} {SMALL}",
                                        f"/imagine prompt: a fox image: /dev/zero {SMALL}",
                                        "/workflow /dev/zero"], tmp_path)
    assert code == 1
    size = f"{(limit + 500_008) / 1e6:.1f} MB"  # the file's whole size, not the bounded read's
    assert errors(printed) == [
        f"error: image: 'big.png' is {size}; the limit is {limit / 1e6:.1f} MB: scale it down or save it as JPEG",
        "error: image: cannot read /dev/zero (not a regular file); give the path of a PNG, JPEG or WebP file",
        "error: workflow: cannot read /dev/zero (not a regular file); give the path of a ComfyUI API-format .json "
        "file"]


async def test_a_path_with_a_nul_character_is_refused_by_name(env: Env, tmp_path: Path) -> None:
    # Path.stat() raises ValueError, not OSError, for it (found by test_hostile_fuzz)
    code, printed = await session(env, ["/workflow a\x00b.json", f"/imagine prompt: a fox image: x\x00.png {SMALL}"],
                                  tmp_path)
    assert code == 1
    assert errors(printed) == [
        "error: workflow: 'a\\x00b.json' holds a NUL character, which no file name can; give the path of a "
        "ComfyUI API-format .json file",
        "error: image: 'x\\x00.png' holds a NUL character, which no file name can; give the path of a PNG, JPEG "
        "or WebP file"]
