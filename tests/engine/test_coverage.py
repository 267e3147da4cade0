"""`noodle coverage`: per workflow file (API JSON, /prompt body, ComfyUI PNG; UI format named as such) whether it
would run here and what blocks it: missing node types (built-in, API or custom), samplers, model kinds."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from engine.cli import add_engine_commands
from engine.coverage import find_workflows, judge_file, read_workflow, summary
from engine.nodes import catalog
from engine.pngmeta import save_png
from engine.settings import EngineSettings, Limits, ModelsSettings
from tests.engine.conftest import txt2img

BUILTIN_MISSING = "StyleModelLoader"  # a ComfyUI built-in (loaders, models/style_models) that Noodle does not run


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def _png(path: Path, **texts: str) -> Path:
    save_png(Image.new("RGB", (8, 8)), path, texts)
    return path


def judge(path: Path):  # type: ignore[no-untyped-def]
    return judge_file(path, catalog(), Limits())


def blocked_workflow() -> dict[str, Any]:
    workflow = copy.deepcopy(txt2img())
    workflow["3"]["inputs"]["sampler_name"] = "euler_dy"  # a custom sampler pack's name in a stock KSampler
    workflow["20"] = {"class_type": BUILTIN_MISSING, "inputs": {"style_model_name": "coadapter-style-sd15v1.pth"}}
    workflow["21"] = {"class_type": "UltimateSDUpscale", "inputs": {"image": ["8", 0], "sampler_name": "anything"}}
    return workflow


def test_a_workflow_noodle_runs_is_said_to_run(tmp_path: Path) -> None:
    verdict = judge(_write(tmp_path / "txt2img.json", txt2img()))
    assert verdict.kind == "api" and verdict.runs
    assert verdict.line() == f"runs       {tmp_path / 'txt2img.json'}"


def test_the_prompt_body_and_a_comfyui_png_are_read_too(tmp_path: Path) -> None:
    wrapped = _write(tmp_path / "body.json", {"prompt": txt2img(), "client_id": "abc"})
    png = _png(tmp_path / "ComfyUI_00001_.png", prompt=json.dumps(txt2img()), workflow='{"nodes": [], "links": []}')
    assert judge(wrapped).runs and judge(png).runs
    assert read_workflow(png) == ("api", txt2img(), "")


def test_what_blocks_a_workflow_is_named_by_kind(tmp_path: Path) -> None:
    verdict = judge(_write(tmp_path / "blocked.json", blocked_workflow()))
    assert not verdict.runs
    assert dict(verdict.missing) == {BUILTIN_MISSING: "builtin", "UltimateSDUpscale": "custom"}
    assert verdict.samplers == ("sampler euler_dy (not ComfyUI's)",)  # a custom node's own sampler input is not judged
    assert verdict.model_kinds == ("style_models",)
    assert verdict.line() == (
        f"blocked    {tmp_path / 'blocked.json'}: ComfyUI built-in nodes Noodle lacks: {BUILTIN_MISSING}; "
        "custom nodes (not part of ComfyUI): UltimateSDUpscale; not supported: sampler euler_dy (not ComfyUI's); "
        "model kinds Noodle has no folder for: style_models")
    assert verdict.to_dict()["missing_nodes"] == {BUILTIN_MISSING: "builtin", "UltimateSDUpscale": "custom"}


def test_a_ui_only_entry_in_an_api_workflow_is_named_with_how_to_export(tmp_path: Path) -> None:
    workflow = copy.deepcopy(txt2img())
    workflow["30"] = {"class_type": "Reroute", "inputs": {"": ["8", 0]}}
    verdict = judge(_write(tmp_path / "rerouted.json", workflow))
    assert not verdict.runs and dict(verdict.missing) == {"Reroute": "ui-only"}
    assert "UI-only entries (export the workflow with Workflow > Export (API)): Reroute" in verdict.line()


def test_a_name_that_is_no_comfyui_sampler_is_said_so(tmp_path: Path) -> None:
    workflow = txt2img()
    workflow["3"]["inputs"].update(sampler_name="euler_fancy", scheduler="wobbly")
    verdict = judge(_write(tmp_path / "w.json", workflow))
    assert verdict.samplers == ("sampler euler_fancy (not ComfyUI's)", "scheduler wobbly")


def test_a_workflow_of_known_nodes_is_validated_as_the_executor_would(tmp_path: Path) -> None:
    workflow = txt2img()
    del workflow["3"]["inputs"]["steps"]
    verdict = judge(_write(tmp_path / "old.json", workflow))
    assert not verdict.runs and not verdict.missing
    assert any("node 3 (KSampler): Required input is missing: steps" in line for line in verdict.problems)


def test_an_output_that_fails_while_another_passes_is_a_note(tmp_path: Path) -> None:
    workflow = txt2img()
    workflow["30"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": ["8", 0]}}
    verdict = judge(_write(tmp_path / "w.json", workflow))
    assert verdict.runs and verdict.notes == ("outputs that fail validation are skipped (nodes 30)",)


def test_model_names_are_taken_as_present_and_pickle_names_get_a_note(tmp_path: Path) -> None:
    verdict = judge(_write(tmp_path / "w.json", txt2img(checkpoint="v1-5-pruned-emaonly.ckpt")))
    assert verdict.runs  # coverage judges the graph, not this machine's models folder
    assert verdict.notes == ("v1-5-pruned-emaonly.ckpt needs its .safetensors beside it",)


@pytest.mark.parametrize(("content", "kind", "reason"), [
    ({"nodes": [{"id": 1, "type": "KSampler"}], "links": []}, "ui", "ComfyUI's UI format"),
    ({"a": 1}, "unreadable", "not a ComfyUI API workflow"),
    ([1, 2], "unreadable", "not a ComfyUI API workflow"),
    ("{broken", "unreadable", "cannot read it (JSONDecodeError"),
])
def test_files_that_are_no_api_workflow_are_named(tmp_path: Path, content: Any, kind: str, reason: str) -> None:
    path = tmp_path / "w.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    verdict = judge(path)
    assert verdict.kind == kind and not verdict.runs and verdict.reason.startswith(reason)
    assert verdict.line().startswith(f"{kind:<10} {path}: {reason}")


@pytest.mark.parametrize(("texts", "kind", "reason"), [
    ({"workflow": '{"nodes": [], "links": []}'}, "ui", "the PNG carries only ComfyUI's UI workflow"),
    ({"parameters": "a fox\nSteps: 20, Seed: 1"}, "unreadable", "an A1111 image"),
    ({}, "unreadable", "the PNG carries no workflow"),
])
def test_pngs_without_an_api_prompt_are_named(tmp_path: Path, texts: dict[str, str], kind: str, reason: str) -> None:
    verdict = judge(_png(tmp_path / "x.png", **texts))
    assert verdict.kind == kind and verdict.reason.startswith(reason)


def test_a_ui_format_file_names_the_node_types_its_export_would_lack(tmp_path: Path) -> None:
    graph = {"links": [], "nodes": [
        {"id": 1, "type": "KSampler", "mode": 0}, {"id": 2, "type": "Reroute"}, {"id": 3, "type": "Note"},
        {"id": 4, "type": BUILTIN_MISSING}, {"id": 5, "type": "UltimateSDUpscale", "mode": 4},  # bypassed
        {"id": 6, "type": "PrimitiveNode"}]}
    verdict = judge(_write(tmp_path / "ui.json", graph))
    assert verdict.kind == "ui" and not verdict.runs and dict(verdict.missing) == {BUILTIN_MISSING: "builtin"}
    assert verdict.line().endswith(f"; ComfyUI built-in nodes Noodle lacks: {BUILTIN_MISSING}")
    graph["nodes"] = graph["nodes"][:3]
    png = _png(tmp_path / "ui.png", workflow=json.dumps(graph))
    assert judge(png).reason.endswith("; its nodes are all ones Noodle runs")


def test_a_broken_png_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert judge(path).kind == "unreadable"


def test_folders_are_searched_for_json_and_png(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("b.json", "sub/a.PNG", "notes.txt", ".hidden/c.json"):
        (tmp_path / name).write_text("{}")
    single = tmp_path / "notes.txt"
    assert find_workflows([tmp_path, single]) == [tmp_path / "b.json", tmp_path / "sub/a.PNG", single]


def test_the_summary_gives_the_share_that_runs(tmp_path: Path) -> None:
    verdicts = [judge(_write(tmp_path / "ok.json", txt2img())),
                judge(_write(tmp_path / "blocked.json", blocked_workflow())),
                judge(_write(tmp_path / "builtin.json", {**txt2img(), "20": {"class_type": BUILTIN_MISSING,
                                                                             "inputs": {}}})),
                judge(_write(tmp_path / "ui.json", {"nodes": [], "links": []}))]
    lines = summary(verdicts)
    assert lines[0] == "4 files: 3 API workflows, 1 UI-format, 0 unreadable"
    assert lines[1] == ("would run here: 1 of 3 (33%) API workflows; "
                        "1 of 2 (50%) of those using only ComfyUI's built-in nodes")
    assert lines[2] == "UI-format files whose node types Noodle all runs: 1 of 1 (100%) (exported as API " \
                       "workflows, those may run)"
    assert lines[3] == f"built-in nodes most missed (workflows): {BUILTIN_MISSING} (2)"
    assert lines[4] == "custom and API nodes seen (workflows): UltimateSDUpscale (1)"
    assert lines[5] == "samplers/schedulers not supported (workflows): sampler euler_dy (not ComfyUI's) (1)"


def _coverage(*argv: str) -> tuple[int, Any]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_engine_commands(sub, argparse.Namespace(models=ModelsSettings(), engine=EngineSettings(), limits=Limits()))
    args = parser.parse_args(["coverage", *argv])
    return args.handler(args), args


def test_noodle_coverage_prints_a_line_per_file_then_the_summary(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "a.json", txt2img())
    assert _coverage(str(tmp_path))[0] == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"runs       {tmp_path / 'a.json'}"
    assert out[2] == "would run here: 1 of 1 (100%) API workflows; 1 of 1 (100%) of those using only ComfyUI's " \
                     "built-in nodes"

    _write(tmp_path / "b.json", blocked_workflow())
    assert _coverage("--json", str(tmp_path))[0] == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(Path(r["path"]).name, r["runs"]) for r in rows] == [("a.json", True), ("b.json", False)]

    assert _coverage(str(tmp_path / "absent.json"))[0] == 2
    assert "no such file or folder" in capsys.readouterr().err
