"""The `noodle` CLI contract: `run` prints one JSON line per workflow with ComfyUI's shapes and exit codes.

One test runs the real entry point in a fresh interpreter (its exit code is the process's); the others call the
same `main` in this process, where torch and diffusers are already imported (a child interpreter spends about 6 s
of this machine's 2 cores importing them before it does anything).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.cli import Bench, add_engine_commands
from engine.settings import EngineSettings, Limits, ModelsSettings
from tests.engine.conftest import txt2img, with_changes

REPO = Path(__file__).resolve().parents[2]
Noodle = Callable[..., subprocess.CompletedProcess[str]]  # noodle(*args, cwd=...) and noodle_here's


def noodle(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m bot.cli ARGS` in a fresh interpreter (which imports torch: seconds, so its tests are marked slow)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NOODLE_CONFIG": os.devnull, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def noodle_here(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Noodle:
    """`noodle ARGS` through bot.cli's main in this process, with no config.toml, in the folder `cwd`; what it did,
    in the shape `noodle` gives."""
    from bot.cli import main

    def call(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("NOODLE_CONFIG", os.devnull)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["noodle", *args], code, out, err)

    return call


def test_run_prints_one_line_per_workflow_and_reuses_the_cache(tiny_models: Path, tmp_path: Path,
                                                               noodle_here: Noodle) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(txt2img(seed=1)))
    second.write_text(json.dumps(txt2img(seed=2)))
    done = noodle_here("run", str(first), str(second), "--models", str(tiny_models), "--out", str(tmp_path / "out"),
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert set(line) == {"prompt_id", "outputs", "meta"}
        [image] = line["outputs"]["9"]["images"]
        assert set(image) == {"filename", "subfolder", "type"}
        assert (tmp_path / "out" / image["subfolder"] / image["filename"]).is_file()
        assert {"seeds", "tokens", "timings", "cached"} <= set(line["meta"])
    assert lines[0]["meta"]["cached"] == []
    assert sorted(lines[1]["meta"]["cached"]) == ["4", "5", "6", "7"]
    assert lines[1]["meta"]["seeds"] == {"3": 2}


@pytest.mark.slow
def test_run_exit_codes_invalid_2_failed_1(tiny_models: Path, tmp_path: Path,
                                           noodle_here: Noodle) -> None:
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps(with_changes(txt2img(), "3", sampler_name="euler_dy")))
    done = noodle("run", str(invalid), "--models", str(tiny_models), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2
    body = json.loads(done.stdout)
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["3"]["errors"][0]["type"] == "value_not_in_list"

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG but not really")
    failing = tmp_path / "failing.json"
    failing.write_text(json.dumps(txt2img(init_image="broken.png")))
    done = noodle_here("run", str(failing), "--models", str(tiny_models), "--out", str(tmp_path / "out"),
                  "--input", str(tmp_path / "in"), cwd=tmp_path)
    assert done.returncode == 1
    line = json.loads(done.stdout)
    assert line["type"] == "execution_error" and line["node_id"] == "12" and line["node_type"] == "LoadImage"


def test_nodes_prints_object_info(tiny_models: Path, tmp_path: Path, noodle_here: Noodle) -> None:
    done = noodle_here("nodes", "--models", str(tiny_models), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    ksampler = info["KSampler"]
    assert ksampler["input"]["required"]["steps"] == ["INT", {"default": 20, "min": 1, "max": 10000}]
    assert ksampler["input"]["required"]["cfg"][1] == {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}
    assert "euler" in ksampler["input"]["required"]["sampler_name"][0]
    assert ksampler["output"] == ["LATENT"]
    assert "tiny-sd15.safetensors" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert info["SaveImage"]["output_node"] is True
    for name in ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "KSamplerAdvanced",
                 "VAEDecode", "VAEEncode", "VAELoader", "LoraLoader", "LoraLoaderModelOnly", "CLIPSetLastLayer",
                 "LoadImage", "SaveImage", "PreviewImage", "ModelMergeSimple", "CLIPMergeSimple", "CheckpointSave",
                 "LatentUpscale", "LatentUpscaleBy", "ImageScale", "ConditioningCombine", "ConditioningConcat",
                 "CLIPTextEncodeSDXL"):
        assert name in info, name


def test_tokens_prints_the_report(tiny_models: Path, tmp_path: Path, noodle_here: Noodle) -> None:
    done = noodle_here("tokens", "a photo of a cat, embedding:tiny-embedding <lora:tiny-lora-a:0.5>", "--models",
                  str(tiny_models), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tokens"] == 5 + 1 + 2  # "a photo of a cat" 5, the comma 1, two embedding vectors
    assert report["chunks"] == 1 and report["chunk_tokens"] == [8]
    assert report["embeddings"] == ["tiny-embedding"]
    assert report["loras"] == [{"name": "tiny-lora-a", "unet_weight": 0.5, "clip_weight": 0.5}]
    assert report["warnings"] == []


def test_a_front_end_adds_its_bench_beside_the_engine_benches_through_the_hook() -> None:
    defaults = argparse.Namespace(models=ModelsSettings(), engine=EngineSettings(), limits=Limits())
    parser = argparse.ArgumentParser(prog="noodle")
    sub = parser.add_subparsers(dest="command", required=True)
    ran: list[int] = []
    add_engine_commands(sub, defaults, benches={"extra": Bench(
        run=lambda args: ran.append(args.rounds) or 0,
        add_options=lambda bench: bench.add_argument("--rounds", type=int, default=1))})
    args = parser.parse_args(["bench", "extra", "--rounds", "3"])
    assert args.handler(args) == 0 and ran == [3]
    assert parser.parse_args(["bench", "queue"]).what == "queue"


def test_run_reads_past_a_binary_or_too_deep_workflow_file(tiny_models: Path, tmp_path: Path,
                                                           noodle_here: Noodle) -> None:
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    (tmp_path / "string.json").write_text('"{}"')  # a JSON string: it was decoded once more, "not valid JSON"
    (tmp_path / "list.json").write_text('[1]')
    done = noodle_here("run", "binary.json", "deep.json", "missing.json", "string.json", "list.json", "--models",
                       str(tiny_models), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2 and not done.stderr.count("Traceback")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["error"]["message"] for line in lines] == [
        *(f"Cannot read workflow file {name}" for name in ("binary.json", "deep.json", "missing.json", "string.json")),
        "Cannot execute because the prompt is not a JSON object."]
    assert lines[3]["error"]["details"] == ("it holds a JSON string, not an object of nodes (save the workflow with "
                                            "Export (API))")


def test_a_broken_config_is_one_line_per_problem_naming_the_file_and_exit_2(
        tmp_path: Path, noodle_here: Noodle, monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.cli import main

    monkeypatch.chdir(tmp_path)
    for text, says in (("[limits\nmax_side = 1\n", "is not valid TOML: Expected ']'"),
                       ('[limits]\nmax_side = -5\nmax_batch = "lots"\n',
                        "[limits] max_side = -5: Input should be greater than or equal to 64")):
        (tmp_path / "config.toml").write_text(text)
        monkeypatch.setenv("NOODLE_CONFIG", str(tmp_path / "config.toml"))
        assert main(["nodes"]) == 2
    done = noodle_here("nodes", cwd=tmp_path)  # (its own NOODLE_CONFIG: an empty file)
    assert done.returncode == 0


def test_bench_repeats_below_one_are_refused_before_any_work(tmp_path: Path, noodle_here: Noodle) -> None:
    with pytest.raises(SystemExit) as exit_:
        noodle_here("bench", "engine", "--repeats", "0", cwd=tmp_path)
    assert exit_.value.code == 2


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path, noodle_here: Noodle,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.cli

    def interrupted(args: argparse.Namespace, defaults: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.cli, "cmd_nodes", interrupted)
    done = noodle_here("nodes", cwd=tmp_path)
    assert done.returncode == 130 and done.stderr.strip() == "noodle: interrupted"


def test_tokens_of_text_that_is_not_utf8_is_an_error_line(tmp_path: Path, noodle_here: Noodle) -> None:
    done = noodle_here("tokens", "x\udcff\udcfe", cwd=tmp_path)
    assert done.returncode == 2 and json.loads(done.stdout) == {"error": "the text is not UTF-8: give the prompt "
                                                                          "as UTF-8 text"}


def test_a_typo_in_the_config_is_said_with_the_closest_setting_and_the_rest_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    (tmp_path / "config.toml").write_text('[limit]\nmax_side = 64\n[engine]\ndevcie = "cpu"\n[bot]\ndefault_step = 3\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NOODLE_CONFIG", str(tmp_path / "config.toml"))
    assert main(["nodes"]) == 0
    said = capsys.readouterr().err.splitlines()
    assert [line.split(": ", 2)[2] for line in said if "is no setting" in line] == [
        "[limit] (did you mean limits?) is no setting of Noodle's; it is left out",
        "[engine] devcie (did you mean device?) is no setting of Noodle's; it is left out",
        "[bot] default_step (did you mean default_steps?) is no setting of Noodle's; it is left out"]


def test_the_shipped_config_holds_only_real_settings() -> None:
    from bot.settings import unknown_keys

    assert unknown_keys(REPO / "config.toml") == []


@pytest.mark.parametrize(("text", "says"), [
    ('[bot]\nresults_folder = "../elsewhere"\n',
     "[bot] results_folder = '../elsewhere': must name a folder inside the engine's folder"),
    ('[bot]\nuploads_folder = "/etc"\n', "[bot] uploads_folder = '/etc': must name a folder inside"),
    ('[bot]\nuploads_folder = "."\n', "[bot] uploads_folder = '.': must name a folder inside"),
    ('[bot]\ndefault_sampler = "eular"\n', "[bot] default_sampler 'eular' is not one of Noodle's samplers: euler, "),
    ('[bot]\ndefault_scheduler = "karas"\n', "[bot] default_scheduler 'karas' is not one of ComfyUI's schedulers"),
    ('[bot]\nmin_side = 512\n[limits]\nmax_side = 256\n',
     "[bot] min_side = 512 is above [limits] max_side = 256, so no size is allowed"),
    ('[limits]\nmax_side = 768\n', "[bot] size_sdxl = 1024 (the side of an SDXL image whose size is not given) is "
                                   "above [limits] max_side = 768"),
    ('[bot]\nsize_sd15 = 500\n', "[bot] size_sd15 = 500 (the side of an SD1.5 image whose size is not given) is not "
                                 "a multiple of 8"),
    ('[bot]\ndefault_steps = 200\ndefault_cfg = 40\n',
     "[bot] default_steps = 200 is above [limits] max_steps = 150; [bot] default_cfg = 40.0 is above [bot] max_cfg"),
])
def test_a_default_no_request_could_have_is_refused_when_the_config_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: str,
        says: str) -> None:
    """Each of these was accepted at start and then refused every request that left the value out (or, for the
    folders, every one at all)."""
    from bot.cli import main

    (tmp_path / "config.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NOODLE_CONFIG", str(tmp_path / "config.toml"))
    assert main(["nodes"]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("noodle: ") and says in first, first


def test_a_config_file_named_by_noodle_config_that_is_not_there_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """It ran on the defaults without a word, so every limit the owner wrote in the file they meant was ignored."""
    from bot.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NOODLE_CONFIG", str(tmp_path / "cofnig.toml"))
    assert main(["nodes"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"noodle: NOODLE_CONFIG names {tmp_path / 'cofnig.toml'}, which is not there; give the path of a config "
        "file, or unset NOODLE_CONFIG to read ./config.toml")
    monkeypatch.delenv("NOODLE_CONFIG")  # no NOODLE_CONFIG and no ./config.toml: the defaults, as before
    assert main(["nodes"]) == 0
