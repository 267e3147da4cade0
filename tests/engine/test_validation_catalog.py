"""Validation with the real catalog: the models folder's choices, config limits and sampler pairs."""

from __future__ import annotations

import pytest

from engine.errors import WorkflowInvalid
from engine.executor import Executor
from tests.engine.conftest import txt2img, with_changes


def node_error(executor: Executor, workflow: dict, node: str) -> dict:
    with pytest.raises(WorkflowInvalid) as caught:
        executor.validate(workflow)
    body = caught.value.body
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    return body["node_errors"][node]["errors"][0]


def test_an_unknown_checkpoint_is_not_in_the_folder_list(executor: Executor) -> None:
    error = node_error(executor, with_changes(txt2img(), "4", ckpt_name="sd-bse.safetensors"), "4")
    assert error["type"] == "value_not_in_list"
    assert "tiny-sd15.safetensors" in error["details"]


def test_a_path_that_climbs_out_is_not_a_choice(executor: Executor) -> None:
    error = node_error(executor, with_changes(txt2img(), "4", ckpt_name="../checkpoints/tiny-sd15.safetensors"), "4")
    assert error["type"] == "value_not_in_list"


def test_config_limits_are_custom_validation_failures(executor: Executor) -> None:
    error = node_error(executor, with_changes(txt2img(), "5", width=4096), "5")
    assert error["type"] == "custom_validation_failed"
    assert "limits.max_side" in error["details"] and "2048" in error["details"]
    error = node_error(executor, with_changes(txt2img(), "3", steps=500), "3")
    assert error["type"] == "custom_validation_failed" and "limits.max_steps" in error["details"]


def test_an_unfaithful_sampler_pair_is_refused_with_what_works(executor: Executor) -> None:
    error = node_error(executor, with_changes(txt2img(), "3", sampler_name="uni_pc", steps=1), "3")
    assert error["type"] == "custom_validation_failed"
    assert "uni_pc" in error["details"]


def test_a_sampler_comfyui_lacks_is_not_in_the_list(executor: Executor) -> None:
    # every one of ComfyUI's 42 samplers runs; a custom sampler pack's name is refused as ComfyUI refuses it
    error = node_error(executor, with_changes(txt2img(), "3", sampler_name="euler_dy"), "3")
    assert error["type"] == "value_not_in_list"


def test_nothing_runs_when_validation_fails(executor: Executor) -> None:
    before = len(list(executor.settings.output_dir.glob("*.png")))
    with pytest.raises(WorkflowInvalid):
        executor.run(with_changes(txt2img(), "5", width=4096))
    assert len(list(executor.settings.output_dir.glob("*.png"))) == before
