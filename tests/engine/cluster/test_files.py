"""Files between the bot's machine and a worker, without Ray: inputs out, results back, names never overwritten."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cluster.files import WireFile, collect_results, input_files, place_results, read_inputs, write_inputs
from engine.errors import NoodleError, UnsafeModelFile
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


@pytest.mark.parametrize("name", ["../../escaped.png", "/tmp/abs_escaped.png", "..", "a\\..\\b.png"])
def test_a_worker_reply_whose_file_name_leaves_the_folder_is_refused(tmp_path: Path, name: str) -> None:
    """Only the subfolder was checked: a filename of '../../escaped.png' was written two folders up."""
    bot = tmp_path / "deep" / "bot"
    with pytest.raises(UnsafeModelFile, match="not a plain file name"):
        place_results(bot, result(name, subfolder=""), (WireFile("output", name, b"pwned"),), 0)
    assert not list(tmp_path.rglob("*escaped*")) and not Path("/tmp/abs_escaped.png").exists()


def test_latents_and_checkpoints_come_back_too(tmp_path: Path) -> None:
    """Only `images` entries were sent: a SaveLatent's .latent stayed on the worker and the result named a file
    the bot did not have."""
    worker, bot = tmp_path / "worker", tmp_path / "bot"
    (worker / "latents").mkdir(parents=True)
    (worker / "checkpoints").mkdir()
    (worker / "latents" / "fox_00001_.latent").write_bytes(b"latent")
    (worker / "checkpoints" / "mix_00001_.safetensors").write_bytes(b"weights")
    outcome = {"prompt_id": "p", "meta": {}, "outputs": {
        "7": {"latents": [{"filename": "fox_00001_.latent", "subfolder": "latents", "type": "output"}]},
        "8": {"checkpoints": [{"filename": "mix_00001_.safetensors", "subfolder": "checkpoints", "type": "output"}]}}}
    sent = collect_results(worker, [outcome])
    assert {f.path for f in sent} == {"latents/fox_00001_.latent", "checkpoints/mix_00001_.safetensors"}
    place_results(bot, outcome, sent, 0)
    assert (bot / "latents/fox_00001_.latent").read_bytes() == b"latent"
    assert (bot / "checkpoints/mix_00001_.safetensors").read_bytes() == b"weights"


def test_a_result_entry_the_worker_sent_no_file_for_fails_the_job(tmp_path: Path) -> None:
    """It kept the worker's name, which on the bot was usually another job's picture."""
    with pytest.raises(NoodleError, match="sent no file for its result 'noodle/fox_00001_.png'"):
        place_results(tmp_path / "bot", result("fox_00001_.png", subfolder="noodle"), (), 0)


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
