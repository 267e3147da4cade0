"""`noodle bench comfy` against a stand-in for ComfyUI's HTTP API (its /prompt and /history routes, answered as
ComfyUI 0.3.64 answers them), with Noodle's side really run on the tiny models."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from engine.bench_comfy import ComfyClient, ComfyError, bench_comfy, compare, with_seed
from engine.settings import EngineSettings
from engine.templates import WorkflowParams, build_workflow

EXECUTION_MS = 2500  # what the stand-in's timestamps say each run took


class _Comfy(BaseHTTPRequestHandler):
    """POST /prompt queues (and "runs") a workflow; GET /history/{id} answers with ComfyUI's status messages."""

    received: list[dict[str, Any]] = []
    fail_with: str | None = None

    def log_message(self, *args: Any) -> None:
        return None

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if "KSampler" not in {node["class_type"] for node in body["prompt"].values()}:
            self._send(400, {"error": {"type": "prompt_no_outputs"}, "node_errors": {}})
            return
        self.received.append(body["prompt"])
        self._send(200, {"prompt_id": f"p{len(self.received)}", "number": len(self.received)})

    def do_GET(self) -> None:  # noqa: N802
        prompt_id = self.path.rsplit("/", 1)[-1]
        start = 1_700_000_000_000
        if self.fail_with:
            messages = [["execution_start", {"prompt_id": prompt_id, "timestamp": start}],
                        ["execution_error", {"prompt_id": prompt_id, "exception_message": self.fail_with,
                                             "timestamp": start + 5}]]
            status = {"status_str": "error", "completed": False, "messages": messages}
        else:
            messages = [["execution_start", {"prompt_id": prompt_id, "timestamp": start}],
                        ["execution_cached", {"nodes": [], "prompt_id": prompt_id, "timestamp": start}],
                        ["execution_success", {"prompt_id": prompt_id, "timestamp": start + EXECUTION_MS}]]
            status = {"status_str": "success", "completed": True, "messages": messages}
        self._send(200, {prompt_id: {"prompt": [], "outputs": {}, "status": status}})


@pytest.fixture
def comfy() -> Iterator[str]:
    _Comfy.received, _Comfy.fail_with = [], None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Comfy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _workflow() -> dict[str, Any]:
    return build_workflow(WorkflowParams(checkpoint="tiny-sd15.safetensors", prompt="a red fox", steps=2, width=64,
                                         height=64, filename_prefix="bench-comfy"))


def test_comfyuis_own_timestamps_are_its_time_and_its_errors_are_said(comfy: str) -> None:
    client = ComfyClient(comfy)
    assert client.run(_workflow()) == EXECUTION_MS / 1000
    _Comfy.fail_with = "CUDA out of memory"
    with pytest.raises(ComfyError, match="CUDA out of memory"):
        client.run(_workflow())
    with pytest.raises(ComfyError, match="answered 400 to /prompt: .*prompt_no_outputs"):
        client.run({"1": {"class_type": "SaveImage", "inputs": {}}})
    with pytest.raises(ComfyError, match="cannot be reached"):
        ComfyClient("http://127.0.0.1:9").run(_workflow())


def test_both_sides_run_the_same_fresh_seed_each_time_after_a_warm_run() -> None:
    ours: list[int] = []
    theirs: list[int] = []

    def seed_of(workflow: dict[str, Any]) -> int:
        return next(node["inputs"]["seed"] for node in workflow.values() if node["class_type"] == "KSampler")

    timing = compare("fox.json", _workflow(), lambda w: ours.append(seed_of(w)) or 2.0,
                     lambda w: theirs.append(seed_of(w)) or 4.0, repeats=3)
    assert ours == theirs and len(set(ours)) == 4  # warm-up + 3, every one new: no output cache can answer
    assert (timing.noodle_s, timing.comfy_s, timing.ratio) == (2.0, 4.0, 0.5)
    linked = _workflow()
    sampler = next(node for node in linked.values() if node["class_type"] == "KSampler")
    sampler["inputs"]["seed"] = ["99", 0]
    assert with_seed(linked, 5) == linked  # a seed from another node is left to that node


def test_bench_comfy_runs_noodle_for_real_and_ends_with_the_ratio(comfy: str, tiny_models: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fox.json"
    path.write_text(json.dumps({"prompt": _workflow()}), encoding="utf-8")  # a /prompt body is taken too
    engine = EngineSettings(output_dir=tmp_path / "out", input_dir=tmp_path / "in", device="cpu")
    assert bench_comfy(comfy, [path], tiny_models, repeats=2, engine=engine) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    [row] = result["workflows"]
    assert row["name"] == "fox.json" and row["comfy_s"] == EXECUTION_MS / 1000 and row["runs"] == 2
    assert row["noodle_s"] > 0 and row["ratio"] == round(row["noodle_s"] / row["comfy_s"], 4)
    assert result["vs_comfy"] == row["ratio"]  # one workflow: the overall ratio is its own
    assert len(_Comfy.received) == 3 and lines[0].startswith("fox.json: Noodle ")
    assert len(list((tmp_path / "out").glob("bench-comfy_*.png"))) == 3  # Noodle really ran it, warm-up included


def test_the_cli_takes_the_workflow_files_after_the_options(tiny_models: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.cli import main

    monkeypatch.setenv("NOODLE_ENGINE__OUTPUT_DIR", str(tmp_path / "out"))
    path = tmp_path / "fox.json"
    path.write_text(json.dumps(_workflow()), encoding="utf-8")
    code = main(["bench", "comfy", "--comfy", "http://127.0.0.1:9", "--models", str(tiny_models), str(path)])
    assert code == 1 and "ComfyUI at http://127.0.0.1:9 cannot be reached" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # another bench takes no files
        main(["bench", "queue", str(path)])
    assert "noodle bench queue takes no workflow files" in capsys.readouterr().err
