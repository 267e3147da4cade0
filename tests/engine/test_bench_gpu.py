"""`noodle bench gpu`'s parts that run anywhere: the ComfyUI it starts (here a stand-in main.py that takes
ComfyUI's flags and answers its /system_stats, /prompt and /history routes), the PyAV stand-in that ComfyUI
imports at start-up, ComfyUI's reserved memory polled while it runs, and the graphs it times."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine.bench_comfy import ComfyClient, ComfyError, ReservedPeak, time_workflows
from engine.bench_gpu import comfy_server, environment, gpu_workflows, vae_dtypes, vae_precision
from engine.bench_levers import unet_inputs, unet_levers
from engine.executor import Executor

STAND_IN = textwrap.dedent('''
    """Takes ComfyUI's command line, imports what ComfyUI imports from PyAV, serves the API routes the bench uses."""
    import argparse, json, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    from av.container import InputContainer          # comfy_api/latest/_input_impl/video_types.py
    from av.subtitles.stream import SubtitleStream
    import av

    parser = argparse.ArgumentParser()
    for flag in ("--listen", "--port", "--extra-model-paths-config", "--input-directory", "--output-directory",
                 "--front-end-root"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--disable-all-custom-nodes", action="store_true", required=True)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--exit-at-once", action="store_true")
    args = parser.parse_args()
    try:
        av.open
    except ImportError as err:
        av_says = str(err)
    Path(args.output_directory, "started.json").write_text(json.dumps({"args": vars(args), "av": av_says,
        "extra": Path(args.extra_model_paths_config).read_text()}))
    reserved = iter(range(1, 10**6))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/system_stats":  # a GPU whose torch holds one more GiB at each read
                self._send({"devices": [{"type": "cuda", "torch_vram_total": next(reserved) * 2**30}]})
            else:
                prompt_id = self.path.rsplit("/", 1)[-1]
                messages = [["execution_start", {"timestamp": 1000}], ["execution_success", {"timestamp": 1500}]]
                self._send({prompt_id: {"status": {"status_str": "success", "completed": True,
                                                   "messages": messages}}})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send({"prompt_id": "p1"})

    ThreadingHTTPServer((args.listen, int(args.port)), Handler).serve_forever()
''')


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    source = tmp_path / "comfyui"
    source.mkdir()
    (source / "main.py").write_text(STAND_IN, encoding="utf-8")
    return source


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_comfyui_is_started_with_its_api_alone_the_models_folder_and_a_pyav_that_fails_on_use(
        stand_in: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    with comfy_server(stand_in, tmp_path / "models", work, port=_free_port()) as url:
        started = json.loads((work / "out" / "started.json").read_text())
        client = ComfyClient(url)
        assert client.run({"1": {"class_type": "KSampler", "inputs": {}}}) == 0.5
        with ReservedPeak(client) as peak:
            import time

            time.sleep(0.35)
        server_alive = client.reserved_bytes() is not None
    args = started["args"]
    assert args["disable_all_custom_nodes"] and args["listen"] == "127.0.0.1"
    assert args["cpu"] is not torch.cuda.is_available()
    assert Path(args["front_end_root"]).is_dir() and not any(Path(args["front_end_root"]).iterdir())
    assert f"base_path: {(tmp_path / 'models').resolve()}" in started["extra"] and "checkpoints: checkpoints" in \
        started["extra"]
    assert "PyAV is not installed" in started["av"]
    assert server_alive and peak.peak is not None and peak.peak >= 3 * 2**30  # read every 0.1 s, the most kept
    with pytest.raises(ComfyError, match="cannot be reached"):  # stopped on the way out
        ComfyClient(url).reserved_bytes()


def test_a_comfyui_that_dies_at_start_is_said_with_the_end_of_its_log(tmp_path: Path) -> None:
    source = tmp_path / "broken"
    source.mkdir()
    (source / "main.py").write_text("import sys\nprint('ModuleNotFoundError: no module named kornia')\nsys.exit(3)\n")
    with pytest.raises(ComfyError, match=r"(?s)did not start \(exit code 3\).*no module named kornia"):
        with comfy_server(source, tmp_path / "models", tmp_path / "work", port=_free_port()):
            pass
    with pytest.raises(ComfyError, match="make gpu-kit"):
        with comfy_server(tmp_path / "nowhere", tmp_path / "models", tmp_path / "work2", port=_free_port()):
            pass


def test_the_timed_graphs_are_valid_txt2img_graphs_with_the_sampler_each_names(executor: Executor) -> None:
    graphs = gpu_workflows("sd15", "tiny-sd15.safetensors", 64, 2)
    assert [name for name, _ in graphs] == ["sd15-64-euler-normal", "sd15-64-dpmpp_2m-karras"]
    for name, graph in graphs:
        executor.validate(graph)
        [sampler] = [node["inputs"] for node in graph.values() if node["class_type"] == "KSampler"]
        assert (sampler["steps"], sampler["cfg"]) == (2, 7.0)
        assert name.endswith(f"{sampler['sampler_name']}-{sampler['scheduler']}")


def test_time_workflows_reports_no_memory_on_the_cpu(executor: Executor, stand_in: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    graphs = gpu_workflows("sd15", "tiny-sd15.safetensors", 64, 1)[:1]
    with comfy_server(stand_in, tmp_path / "models", tmp_path / "work", port=_free_port()) as url:
        [timing] = time_workflows(ComfyClient(url), executor, graphs, repeats=1)
    assert timing.comfy_s == 0.5 and timing.noodle_s > 0
    assert (timing.noodle_peak_gib, timing.noodle_reserved_gib, timing.comfy_reserved_gib) == (None, None, None)
    assert "peak memory" not in capsys.readouterr().out


def test_the_environment_names_the_card_and_versions() -> None:
    found = environment()
    assert found["torch"] == torch.__version__ and found["python"] == ".".join(map(str, sys.version_info[:3]))
    assert found["card"].startswith("none: the CPU") if not torch.cuda.is_available() else found["card"]


def test_the_cli_says_what_families_it_takes(capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    assert main(["bench", "gpu", "--families", "sd3"]) == 2
    assert "--families takes sd15, sdxl or both" in capsys.readouterr().out
    # before any checkpoint is written: a missing ComfyUI is said at once
    assert main(["bench", "gpu", "--families", "sd15", "--comfy-source", "/nowhere", "--models", "/nowhere"]) == 1
    assert "/nowhere/main.py does not exist" in capsys.readouterr().out
    assert not Path("/nowhere").exists()


def test_the_vae_is_timed_in_each_precision_on_a_copy(executor: Executor) -> None:
    vae = executor.models.checkpoint("tiny-sd15.safetensors").pipe.vae
    before = vae.dtype
    found = vae_precision(vae, 64, repeats=1)
    assert list(found) == ["float32", "float16", "bfloat16"]
    for figures in found.values():
        assert figures["ms"] > 0 and figures["peak_gib"] is None and figures["went_float32"] is False
    assert vae.dtype == before  # the engine's VAE is left as it was


def test_the_report_names_the_dtype_each_loaded_vae_runs_in(executor: Executor) -> None:
    """It gave [engine] vae_dtype alone: the setting, not what the timed decodes ran in."""
    executor.models.checkpoint("tiny-sd15.safetensors")
    found = vae_dtypes(executor)
    assert found["tiny-sd15.safetensors"] == "float32" and set(found) == set(executor.models.loaded_names())


@pytest.mark.parametrize("checkpoint", ["tiny-sd15.safetensors", "tiny-sdxl.safetensors"])
def test_each_unet_lever_is_timed_and_compared_and_the_unet_left_as_it_was(executor: Executor,
                                                                          checkpoint: str) -> None:
    unet = executor.models.checkpoint(checkpoint).pipe.unet
    args, kwargs = unet_inputs(unet, 64)
    with torch.inference_mode():  # as the engine samples: the levers' new weights must not become inference tensors
        before = unet(*args, **kwargs).sample
        found = unet_levers(unet, 64, repeats=1)
        after = unet(*args, **kwargs).sample
    assert list(found) == ["plain", "fused_qkv", "channels_last"]  # no CUDA graph off CUDA
    assert found["plain"]["ms"] > 0
    for lever in ("fused_qkv", "channels_last"):
        assert found[lever]["ms"] > 0 and found[lever]["vs_plain"] > 0
        assert found[lever]["max_abs_diff"] < 1e-3  # the same prediction, give or take rounding
        assert found[lever]["equal"] == (found[lever]["max_abs_diff"] == 0.0)
    assert torch.equal(before, after)
    assert not any(name in module._modules for module in unet.modules() for name in ("to_qkv", "to_kv"))
    assert all(p.is_contiguous() and not p.is_inference() for p in unet.parameters())
