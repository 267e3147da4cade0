"""Validation answers as ComfyUI 0.3.64's validate_prompt does: same error types, messages and body.

The nodes here mirror ComfyUI's core nodes' shapes and live in a local registry, so the global
catalog stays untouched.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest

from engine.errors import WorkflowInvalid
from engine.validate import ValidatedPrompt
from tests.engine.validate_support import (
    CheckpointLoaderSimple,
    DROP,
    FOLDERS,
    Flaky,
    KSAMPLER_CFG,
    KSAMPLER_STEPS,
    KSampler,
    LIMITS,
    Node,
    REGISTRY,
    SAMPLERS,
    SEED_MAX,
    SaveImage,
    TXT2IMG,
    VAELoader,
    edited,
    failed_on,
    flaky,
    refused,
    run,
    validate,
)

# -- a valid prompt ---------------------------------------------------------------------------


def test_valid_prompt_gives_order_constants_and_links() -> None:
    prompt = run(TXT2IMG)
    assert prompt.outputs == ("9",)
    assert prompt.order == ("4", "6", "7", "5", "3", "8", "9")
    assert prompt.constants["3"] == {"seed": 42, "steps": 20, "cfg": 8.0, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1.0}
    assert prompt.links["3"] == {"model": ("4", 0), "positive": ("6", 0), "negative": ("7", 0),
                                 "latent_image": ("5", 0)}
    assert prompt.links["8"] == {"samples": ("3", 0), "vae": ("4", 2)}
    assert prompt.partial_errors == {}
    assert prompt.workflow.to_api() == TXT2IMG


def test_order_leaves_out_nodes_that_feed_no_output_and_extra_inputs() -> None:
    workflow = edited(**{"8": {"unknown_extra": ["20", 0]}})
    workflow["20"] = {"class_type": "KSampler", "inputs": {"steps": "garbage"}}  # invalid, but feeds nothing
    workflow["21"] = {"class_type": "VAELoader", "inputs": {"vae_name": "nope"}}
    prompt = run(workflow)
    assert set(prompt.order) == {"3", "4", "5", "6", "7", "8", "9"}
    assert "unknown_extra" not in prompt.links["8"] and "unknown_extra" not in prompt.constants["8"]


@pytest.mark.parametrize(("value", "coerced"), [
    (3.7, 3), ("12", 12), (True, 1), ({"__value__": 7}, 7),  # ComfyUI's int(), quirks included
])
def test_int_inputs_are_coerced_as_comfyui_does(value: Any, coerced: int) -> None:
    assert run(edited(**{"3": {"steps": value}})).constants["3"]["steps"] == coerced


def test_float_string_and_boolean_inputs_are_coerced_as_comfyui_does() -> None:
    workflow = edited(**{"3": {"cfg": "7.5"}, "9": {"filename_prefix": 5}})
    workflow["10"] = flaky(["8", 0], flag="false")
    workflow["9"]["inputs"]["images"] = ["10", 0]
    prompt = run(workflow)
    assert prompt.constants["3"]["cfg"] == 7.5
    assert prompt.constants["9"]["filename_prefix"] == "5"
    assert prompt.constants["10"]["flag"] is True  # bool("false"): ComfyUI's quirk, kept


def test_link_indexes_work_as_python_indexes_and_are_stored_plain() -> None:
    prompt = run(edited(**{"8": {"vae": ["4", -1]}, "6": {"clip": ["4", True]}}))
    assert prompt.links["8"]["vae"] == ("4", 2)
    assert prompt.links["6"]["clip"] == ("4", 1)


def test_comma_separated_types_match_when_they_overlap() -> None:
    workflow = copy.deepcopy(TXT2IMG)
    workflow["10"] = flaky(["8", 0])
    workflow["9"]["inputs"]["images"] = ["10", 1]  # "LATENT,IMAGE" into IMAGE
    assert run(workflow).links["9"]["images"] == ("10", 1)


@pytest.mark.parametrize("encode", [json.dumps, lambda d: json.dumps(d).encode()])
def test_json_text_is_accepted(encode: Any) -> None:
    assert run(encode(TXT2IMG)).outputs == ("9",)


def test_a_long_chain_validates_without_recursion() -> None:
    workflow = copy.deepcopy(TXT2IMG)
    previous = "8"
    for i in range(100, 3100):
        workflow[str(i)] = flaky([previous, 0])
        previous = str(i)
    workflow["9"]["inputs"]["images"] = [previous, 0]
    assert len(run(workflow).order) == 3007


# -- prompt-level errors ----------------------------------------------------------------------


@pytest.mark.parametrize(("node", "message"), [
    ({"inputs": {}}, "Cannot execute because a node is missing the class_type property."),
    ("junk", "Cannot execute because a node is missing the class_type property."),
    ({"class_type": "Upscaler9000", "inputs": {}}, "Cannot execute because node Upscaler9000 does not exist."),
    ({"class_type": 5, "inputs": {}}, "Cannot execute because node 5 does not exist."),
])
def test_every_node_must_name_a_known_class_even_unlinked_ones(node: Any, message: str) -> None:
    body = refused({**TXT2IMG, "77": node})
    # details go on after ComfyUI's "Node ID '#77'" to say whose node it is (tests/engine/test_custom_nodes.py)
    assert body["error"]["type"] == "invalid_prompt" and body["error"]["message"] == message
    assert body["error"]["details"].startswith("Node ID '#77'") and body["node_errors"] == {}


def test_a_prompt_that_is_not_an_object_is_invalid_prompt() -> None:
    assert refused([TXT2IMG])["error"]["type"] == "invalid_prompt"


def test_no_output_node_is_prompt_no_outputs() -> None:
    workflow = {k: v for k, v in TXT2IMG.items() if k != "9"}
    assert refused(workflow) == {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                                           "details": "", "extra_info": {}}, "node_errors": {}}


# -- input errors, each in ComfyUI's exact shape ----------------------------------------------


def test_required_input_missing() -> None:
    assert failed_on(edited(**{"3": {"steps": DROP}}), "3") == [{
        "type": "required_input_missing", "message": "Required input is missing", "details": "steps",
        "extra_info": {"input_name": "steps"}}]


def test_optional_input_may_be_missing() -> None:
    workflow = copy.deepcopy(TXT2IMG)
    workflow["10"] = flaky(["8", 0])
    workflow["9"]["inputs"]["images"] = ["10", 0]
    assert "optional_latent" not in run(workflow).links["10"]


def test_bad_linked_input() -> None:
    assert failed_on(edited(**{"3": {"model": ["4", 0, 1]}}), "3") == [{
        "type": "bad_linked_input", "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
        "details": "model", "extra_info": {"input_name": "model", "input_config": ["MODEL", {}],
                                           "received_value": ["4", 0, 1]}}]


def test_a_constant_for_a_socket_input_is_a_bad_linked_input() -> None:
    # ComfyUI lets this through and fails when the node runs; we refuse it up front.
    assert failed_on(edited(**{"3": {"model": "sd15.safetensors"}}), "3") == [{
        "type": "bad_linked_input", "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
        "details": "model", "extra_info": {"input_name": "model", "input_config": ["MODEL", {}],
                                           "received_value": "sd15.safetensors"}}]


def test_return_type_mismatch() -> None:
    assert failed_on(edited(**{"3": {"model": ["4", 1]}}), "3") == [{
        "type": "return_type_mismatch", "message": "Return type mismatch between linked nodes",
        "details": "model, received_type(CLIP) mismatch input_type(MODEL)",
        "extra_info": {"input_name": "model", "input_config": ["MODEL", {}], "received_type": "CLIP",
                       "linked_node": ["4", 1]}}]


@pytest.mark.parametrize(("link", "exception_type", "details"), [
    (["99", 0], "KeyError", "model: links to node '99', which is not in the workflow"),
    ([4, 0], "KeyError", "model: links to node 4, which is not in the workflow; node ids are strings: use ['4', 0]"),
    ([["4"], 0], "TypeError", "model: a link's node id must be a string, not list"),
    (["4", 3], "IndexError", "model: node '4' (CheckpointLoaderSimple) has 3 output(s); there is no output 3"),
    (["4", "0"], "TypeError", "model: the output index of a link must be an integer, not '0'"),
    (["4", 0.0], "TypeError", "model: the output index of a link must be an integer, not 0.0"),
])
def test_a_broken_link_in_an_inner_node_is_an_exception_during_inner_validation(
        link: list[Any], exception_type: str, details: str) -> None:
    # ComfyUI raises inside validate_inputs of node 3; node 8, whose link reached 3, catches it.
    assert failed_on(edited(**{"3": {"model": link}}), "3") == [{
        "type": "exception_during_inner_validation", "message": "Exception when validating inner node",
        "details": details, "extra_info": {
            "input_name": "samples", "input_config": ["LATENT", {}], "exception_message": details,
            "exception_type": exception_type, "traceback": [], "linked_node": ["3", 0]}}]


def test_a_broken_link_in_an_output_node_is_an_exception_during_validation() -> None:
    details = "images: links to node '99', which is not in the workflow"
    body = refused(edited(**{"9": {"images": ["99", 0]}}))
    assert body == {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                  "details": f"Exception when validating node: {details}", "extra_info": {}},
        "node_errors": {"9": {"errors": [{
            "type": "exception_during_validation", "message": "Exception when validating node", "details": details,
            "extra_info": {"exception_type": "KeyError", "traceback": []}}],
            "dependent_outputs": ["9"], "class_type": "SaveImage"}}}


def test_a_node_without_inputs_is_an_exception_when_it_is_validated() -> None:
    workflow = copy.deepcopy(TXT2IMG)
    del workflow["5"]["inputs"]
    [error] = failed_on(workflow, "5")
    assert error["type"] == "exception_during_inner_validation"
    assert error["extra_info"]["exception_type"] == "KeyError"
    assert error["extra_info"]["input_name"] == "latent_image"


@pytest.mark.parametrize(("value", "reason"), [
    ("x", "invalid literal for int() with base 10: 'x'"),
    (None, "int() argument must be a string, a bytes-like object or a real number, not 'NoneType'"),
    (float("nan"), "cannot convert float NaN to integer"),
    (float("inf"), "cannot convert float infinity to integer"),
    ("3.5", "invalid literal for int() with base 10: '3.5'"),
])
def test_invalid_input_type(value: Any, reason: str) -> None:
    [error] = failed_on(edited(**{"3": {"steps": value}}), "3")
    assert error["type"] == "invalid_input_type"
    assert error["message"] == "Failed to convert an input value to a INT value"
    assert error["details"] == f"steps, {value}, {reason}"
    assert error["extra_info"]["input_config"] == KSAMPLER_STEPS
    assert error["extra_info"]["exception_message"] == reason
    assert error["extra_info"]["received_value"] is value


def test_a_lone_surrogate_in_a_string_is_refused_in_an_error_that_can_be_sent() -> None:
    # JSON's "\ud800" parses to a string no encoder takes: the tokenizer, file names and SQLite failed on it raw
    [error] = failed_on(json.loads(json.dumps(TXT2IMG).replace('"fox"}', '"mine \\ud800"}')), "9")
    assert error["type"] == "invalid_input_type" and error["extra_info"]["input_name"] == "filename_prefix"
    assert "lone UTF-16 surrogate" in error["details"] and "mine \\ud800" in error["details"]
    json.dumps(error, ensure_ascii=False).encode("utf-8")  # the refusal itself goes out as UTF-8


def test_nan_for_a_float_is_refused() -> None:
    # ComfyUI accepts NaN (its min/max comparisons are false) and draws a NaN image; we refuse it.
    [error] = failed_on(edited(**{"3": {"cfg": "nan"}}), "3")
    assert error == {"type": "invalid_input_type", "message": "Failed to convert an input value to a FLOAT value",
                     "details": "cfg, nan, nan is not a finite number", "extra_info": {
                         "input_name": "cfg", "input_config": KSAMPLER_CFG, "received_value": "nan",
                         "exception_message": "nan is not a finite number"}}


@pytest.mark.parametrize(("name", "value", "kind", "message"), [
    ("steps", 0, "value_smaller_than_min", "Value 0 smaller than min of 1"),
    ("steps", 20000, "value_bigger_than_max", "Value 20000 bigger than max of 10000"),
    ("seed", -1, "value_smaller_than_min", "Value -1 smaller than min of 0"),
    ("seed", 2**64, "value_bigger_than_max", f"Value {2**64} bigger than max of {SEED_MAX}"),
    ("cfg", 150, "value_bigger_than_max", "Value 150.0 bigger than max of 100.0"),
    ("cfg", float("inf"), "value_bigger_than_max", "Value inf bigger than max of 100.0"),
    ("cfg", -0.5, "value_smaller_than_min", "Value -0.5 smaller than min of 0.0"),
])
def test_values_outside_the_range(name: str, value: Any, kind: str, message: str) -> None:
    [error] = failed_on(edited(**{"3": {name: value}}), "3")
    assert error["type"] == kind and error["message"] == message and error["details"] == name
    assert set(error["extra_info"]) == {"input_name", "input_config", "received_value"}
    assert error["extra_info"]["input_name"] == name


def test_value_not_in_a_fixed_list() -> None:
    assert failed_on(edited(**{"3": {"sampler_name": "dpm_fast"}}), "3") == [{
        "type": "value_not_in_list", "message": "Value not in list",
        "details": "sampler_name: 'dpm_fast' not in ['euler', 'euler_ancestral', 'heun', 'dpmpp_2m']",
        "extra_info": {"input_name": "sampler_name", "input_config": [SAMPLERS, {}], "received_value": "dpm_fast"}}]


def test_value_not_in_a_folder_list() -> None:
    [error] = failed_on(edited(**{"4": {"ckpt_name": "sd14.ckpt"}}), "4")
    # ComfyUI's details, then how to fix a pickle name (tests/engine/models/test_pickle_fallback.py)
    assert error["details"].startswith("ckpt_name: 'sd14.ckpt' not in ['sd15.safetensors', 'sdxl.safetensors']; ")
    assert error["extra_info"]["input_config"] == [FOLDERS["checkpoints"], {}]


def test_a_safetensors_suffix_in_capitals_is_told_to_be_renamed() -> None:
    [error] = failed_on(edited(**{"4": {"ckpt_name": "sub/Upper.SAFETENSORS"}}), "4")
    assert error["details"].endswith("; 'sub/Upper.SAFETENSORS' ends in '.SAFETENSORS', and the loader reads a file "
                                     "as safetensors only by the lowercase '.safetensors': rename it to "
                                     "'sub/Upper.safetensors'")


def test_value_not_in_a_long_list_leaves_the_list_out() -> None:
    workflow = edited(**{"8": {"vae": ["10", 0]}})
    workflow["10"] = {"class_type": "VAELoader", "inputs": {"vae_name": "missing.safetensors"}}
    assert failed_on(workflow, "10") == [{
        "type": "value_not_in_list", "message": "Value not in list",
        "details": "vae_name: 'missing.safetensors' not in (list of length 25)",
        "extra_info": {"input_name": "vae_name", "input_config": None, "received_value": "missing.safetensors"}}]


def test_custom_validation_failed_for_each_message_of_check_values() -> None:
    assert failed_on(edited(**{"5": {"width": 2048, "height": 1536}}), "5") == [
        {"type": "custom_validation_failed", "message": "Custom validation failed for node",
         "details": "width - 2048 is above this server's limit of 1024", "extra_info": {"input_name": "width"}},
        {"type": "custom_validation_failed", "message": "Custom validation failed for node",
         "details": "height - 1536 is above this server's limit of 1024", "extra_info": {"input_name": "height"}}]


def test_check_values_only_runs_when_every_constant_passed() -> None:
    # check_values reads values["width"]: called with a bad width it would raise
    assert [e["type"] for e in failed_on(edited(**{"5": {"width": "wide"}}), "5")] == ["invalid_input_type"]


def test_errors_follow_the_declaration_order_of_inputs() -> None:
    errors = failed_on(edited(**{"3": {"denoise": 2, "model": DROP, "steps": 0}}), "3")
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [
        ("required_input_missing", "model"), ("value_smaller_than_min", "steps"), ("value_bigger_than_max", "denoise")]


def test_an_exception_in_an_output_nodes_check_is_exception_during_validation() -> None:
    workflow = copy.deepcopy(TXT2IMG)
    workflow["9"] = flaky(["8", 0], "explode")
    REGISTRY_WITH_OUTPUT = {**REGISTRY, "Flaky": type("Flaky", (Flaky,), {"OUTPUT_NODE": True})}
    with pytest.raises(WorkflowInvalid) as caught:
        validate(workflow, REGISTRY_WITH_OUTPUT, FOLDERS.__getitem__, LIMITS)
    [error] = caught.value.body["node_errors"]["9"]["errors"]
    assert error["type"] == "exception_during_validation" and error["message"] == "Exception when validating node"
    assert error["details"] == "mode exploded"
    assert error["extra_info"]["exception_type"] == "ValueError"
    assert any("mode exploded" in line or "check_values" in line for line in error["extra_info"]["traceback"])


def test_an_exception_in_an_inner_nodes_check_is_exception_during_inner_validation() -> None:
    workflow = copy.deepcopy(TXT2IMG)
    workflow["10"] = flaky(["8", 0], "explode")
    workflow["9"]["inputs"]["images"] = ["10", 0]
    [error] = failed_on(workflow, "10")
    assert error["type"] == "exception_during_inner_validation"
    assert error["details"] == "mode exploded"
    assert {k: v for k, v in error["extra_info"].items() if k != "traceback"} == {
        "input_name": "images", "input_config": ["IMAGE", {}], "exception_message": "mode exploded",
        "exception_type": "ValueError", "linked_node": ["10", 0]}


def test_a_folder_listing_that_fails_is_an_exception_of_that_node() -> None:
    def choices_for(folder: str) -> list[str]:
        raise OSError(f"cannot read models/{folder}")

    with pytest.raises(WorkflowInvalid) as caught:
        validate(TXT2IMG, REGISTRY, choices_for, LIMITS)
    [error] = caught.value.body["node_errors"]["4"]["errors"]
    assert error["extra_info"]["exception_type"] == "OSError"
    assert error["details"] == "cannot read models/checkpoints"


def test_nodes_downstream_of_an_error_are_not_listed() -> None:
    body = refused(edited(**{"4": {"ckpt_name": "nope"}}))
    assert list(body["node_errors"]) == ["4"]
