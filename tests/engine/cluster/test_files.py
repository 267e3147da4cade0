"""Files between the bot's machine and a worker, without Ray: inputs out, results back, names never overwritten."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cluster.files import WireFile, collect_results, input_files, place_results, read_inputs, write_inputs
from engine.errors import UnsafeModelFile
from engine.nodes import catalog


def result(*names: str, subfolder: str = "noodle/2026-12-01", kind: str = "output") -> dict:
    return {"prompt_id": "p", "meta": {},
            "outputs": {"9": {"images": [{"filename": n, "subfolder": subfolder, "type": kind} for n in names]}}}


def test_result_files_come_back_under_their_names_and_leave_the_worker(tmp_path: Path) -> None:
    worker, bot = tmp_path / "worker", tmp_path / "bot"
    folder = worker / "noodle/2026-12-01"
    folder.mkdir(parents=True)
    (folder / "fox_00001_.png").write_bytes(b"png one")
    sent = collect_results(worker, [result("fox_00001_.png"), None])
    assert sent == (WireFile("output", "noodle/2026-12-01/fox_00001_.png", b"png one"),)
    assert not (folder / "fox_00001_.png").exists()  # the worker keeps no copy

    placed = place_results(bot, result("fox_00001_.png"), sent, 0)
    assert (bot / "noodle/2026-12-01/fox_00001_.png").read_bytes() == b"png one"
    assert placed["outputs"]["9"]["images"][0]["filename"] == "fox_00001_.png"


def test_a_name_another_worker_took_gets_the_next_counter(tmp_path: Path) -> None:
    bot = tmp_path / "bot"
    (bot / "noodle").mkdir(parents=True)
    (bot / "noodle/fox_00001_.png").write_bytes(b"someone else's")
    (bot / "noodle/fox_00002_.png").write_bytes(b"and another")
    files = (WireFile("output", "noodle/fox_00001_.png", b"mine"), WireFile("output", "noodle/odd.png", b"odd"))
    (bot / "noodle/odd.png").write_bytes(b"taken")
    placed = place_results(bot, result("fox_00001_.png", "odd.png", subfolder="noodle"), files, 0)
    assert [i["filename"] for i in placed["outputs"]["9"]["images"]] == ["fox_00003_.png", "odd-2.png"]
    assert (bot / "noodle/fox_00001_.png").read_bytes() == b"someone else's"
    assert (bot / "noodle/fox_00003_.png").read_bytes() == b"mine"


def test_a_worker_reply_naming_a_path_outside_the_folder_is_refused(tmp_path: Path) -> None:
    bad = result("x.png", subfolder="../../etc")
    with pytest.raises(UnsafeModelFile, match="leaves"):
        place_results(tmp_path / "bot", bad, (WireFile("output", "../../etc/x.png", b"x"),), 0)
    assert not (tmp_path / "etc").exists()
    with pytest.raises(UnsafeModelFile):
        write_inputs(tmp_path / "in", [WireFile("input", "../escape.png", b"x")], 0)


def test_the_input_images_a_graph_reads_go_out_and_are_written_once(tmp_path: Path) -> None:
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "up/cat.png"}},
             "2": {"class_type": "LoadImageMask", "inputs": {"image": "up/cat.png", "channel": "alpha"}},
             "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "up/cat.png"}}}
    assert input_files(graph, catalog()) == ["up/cat.png"]
    (tmp_path / "bot/up").mkdir(parents=True)
    (tmp_path / "bot/up/cat.png").write_bytes(b"cat")
    files = read_inputs(tmp_path / "bot", ["up/cat.png"])
    write_inputs(tmp_path / "worker", files, 0)
    written = tmp_path / "worker/up/cat.png"
    assert written.read_bytes() == b"cat"
    stamp = written.stat().st_mtime_ns
    write_inputs(tmp_path / "worker", files, 0)  # the same bytes again: left alone
    assert written.stat().st_mtime_ns == stamp
