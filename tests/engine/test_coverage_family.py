"""`noodle coverage` (engine/coverage.py) on what Noodle is for: workflows for other model families (Flux, SD3,
video ...) told apart from SD1.x / SD2.x / SDXL ones, their share in the summary, and stale exports named."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from engine.coverage import Verdict, judge_file, other_family_nodes, summary
from engine.nodes import catalog
from engine.settings import Limits
from tests.engine.conftest import txt2img


def judge(path: Path, workflow: dict) -> Verdict:
    path.write_text(json.dumps(workflow))
    return judge_file(path, catalog(), Limits())


def flux_workflow() -> dict:
    workflow = copy.deepcopy(txt2img())
    workflow["4"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors",
                                                            "weight_dtype": "default"}}
    workflow["5"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}}
    return workflow


def test_nodes_of_other_model_families_are_named() -> None:
    assert other_family_nodes(["UNETLoader", "FluxGuidance", "KSampler", "DualCLIPLoader", "ModelSamplingSD3",
                               "StableCascade_EmptyLatentImage", "ImageOnlyCheckpointLoader"]) == (
        "DualCLIPLoader", "FluxGuidance", "ImageOnlyCheckpointLoader", "ModelSamplingSD3",
        "StableCascade_EmptyLatentImage", "UNETLoader")
    # SD's own nodes, custom nodes and unknown names are no other family's
    assert other_family_nodes(["CheckpointLoaderSimple", "CLIPTextEncodeSDXL", "ModelSamplingDiscrete",
                               "UltimateSDUpscale", "AlignYourStepsScheduler"]) == ()


def test_the_summary_gives_the_share_of_sd_workflows_that_run(tmp_path: Path) -> None:
    sd = judge(tmp_path / "sd.json", txt2img())
    flux = judge(tmp_path / "flux.json", flux_workflow())
    assert sd.sd_family and sd.runs
    assert not flux.sd_family and flux.other_family == ("EmptySD3LatentImage", "UNETLoader")
    assert flux.to_dict()["other_family"] == ["EmptySD3LatentImage", "UNETLoader"]
    lines = summary([sd, flux])
    assert lines[-1] == ("for SD1.x / SD2.x / SDXL: 1 of 1 (100%) of the workflows using only built-in nodes would "
                         "run here")
    assert not any(line.startswith("for SD1.x") for line in summary([sd]))  # nothing else to tell apart


def test_an_export_older_than_an_input_with_a_default_says_comfyui_refuses_it_too(tmp_path: Path) -> None:
    workflow = txt2img()
    del workflow["3"]["inputs"]["denoise"]
    verdict = judge(tmp_path / "old.json", workflow)
    assert not verdict.runs
    assert verdict.problems[-1].startswith(
        "probably exported before ComfyUI added KSampler's denoise (default 1.0): ComfyUI refuses this prompt too")
    unlinked = txt2img()
    del unlinked["3"]["inputs"]["model"]  # a socket has no default: a graph missing one is no stale export
    verdict = judge(tmp_path / "unlinked.json", unlinked)
    assert not verdict.runs and not any("probably exported" in line for line in verdict.problems)


def test_a_checkpoint_of_another_family_loaded_through_sds_own_nodes_is_told_apart(tmp_path: Path) -> None:
    verdict = judge(tmp_path / "aura.json", txt2img(checkpoint="aura_flow_0.2.safetensors"))
    assert not verdict.sd_family
    assert verdict.other_family == ("checkpoint aura_flow_0.2.safetensors",)
    assert judge(tmp_path / "sd.json", txt2img(checkpoint="dreamshaper_8.safetensors")).sd_family
