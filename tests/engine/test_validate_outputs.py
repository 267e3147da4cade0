"""Validation of partial prompts, dependent outputs and cycles, and hypothesis on random graphs."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import WorkflowInvalid
from engine.graph import topological_order, upstream
from engine.validate import ERROR_TYPES, ValidatedPrompt, validate
from tests.engine.validate_support import (
    EmptyLatentImage,
    FOLDERS,
    Flaky,
    KSAMPLER_STEPS,
    KSampler,
    PreviewImage,
    REGISTRY,
    SaveImage,
    TXT2IMG,
    VAEDecode,
    assert_body_shape,
    assert_node_errors_shape,
    edited,
    flaky,
    refused,
    run,
)

# -- outputs: partial prompts, dependents, cycles ---------------------------------------------


def with_second_output(workflow: dict[str, Any]) -> dict[str, Any]:
    workflow = copy.deepcopy(workflow)
    workflow["10"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}}
    workflow["11"] = {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["4", 2]}}
    workflow["12"] = {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}}
    return workflow


def test_a_prompt_with_some_valid_outputs_runs_those_and_reports_the_rest() -> None:
    prompt = run(with_second_output(edited(**{"3": {"steps": 0}})))
    assert prompt.outputs == ("12",)
    assert prompt.order == ("10", "4", "11", "12")
    assert prompt.partial_errors == {"3": {
        "errors": [{"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1", "details": "steps",
                    "extra_info": {"input_name": "steps", "input_config": KSAMPLER_STEPS, "received_value": 0}}],
        "dependent_outputs": ["9"], "class_type": "KSampler"}}


def test_dependent_outputs_lists_every_failed_output_that_needs_the_node() -> None:
    body = refused(with_second_output(edited(**{"4": {"ckpt_name": "nope"}, "3": {"cfg": -1}})))
    assert body["error"]["details"] == ""  # ComfyUI lists only the output nodes' own errors here
    assert body["node_errors"]["4"]["dependent_outputs"] == ["9", "12"]
    assert body["node_errors"]["3"]["dependent_outputs"] == ["9"]


def cyclic(workflow: dict[str, Any]) -> dict[str, Any]:
    workflow = copy.deepcopy(workflow)
    workflow["20"] = flaky(["21", 0])
    workflow["21"] = flaky(["20", 0])
    workflow["9"]["inputs"]["images"] = ["20", 0]
    return workflow


def test_a_dependency_cycle_is_reported_on_each_of_its_nodes() -> None:
    body = refused(cyclic(TXT2IMG))
    assert body["error"] == {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                             "details": "", "extra_info": {}}
    assert body["node_errors"] == {
        "21": {"errors": [{"type": "dependency_cycle", "message": "Dependency cycle detected",
                           "details": "images <- node '20', which depends on this node: 20 -> 21 -> 20",
                           "extra_info": {"input_name": "images", "linked_node": ["20", 0], "cycle": ["20", "21"]}}],
               "dependent_outputs": ["9"], "class_type": "Flaky"},
        "20": {"errors": [{"type": "dependency_cycle", "message": "Dependency cycle detected",
                           "details": "images <- node '21', which depends on this node: 20 -> 21 -> 20",
                           "extra_info": {"input_name": "images", "linked_node": ["21", 0], "cycle": ["20", "21"]}}],
               "dependent_outputs": ["9"], "class_type": "Flaky"}}


def test_a_self_loop_is_a_cycle_and_other_outputs_still_run() -> None:
    workflow = with_second_output(TXT2IMG)
    workflow["20"] = flaky(["20", 0])
    workflow["9"]["inputs"]["images"] = ["20", 0]
    prompt = run(workflow)
    assert prompt.outputs == ("12",)
    assert [e["type"] for e in prompt.partial_errors["20"]["errors"]] == ["dependency_cycle"]


def test_a_cycle_that_feeds_no_output_is_ignored() -> None:
    workflow = cyclic(TXT2IMG)
    workflow["9"]["inputs"]["images"] = ["8", 0]
    assert "20" not in run(workflow).order


# -- any graph at all ---------------------------------------------------------------------------

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=6)


def input_value(spec_type: str, choices: list[str], ids: list[str]) -> st.SearchStrategy[Any]:
    """Valid and broken links, in- and out-of-range constants, wrong types and nested junk."""
    node_ids = st.sampled_from([*ids, "99"])
    link = st.tuples(node_ids | st.integers(0, 12), st.integers(-4, 4) | st.sampled_from([True, 0.0, "0", None]))
    constants = {
        "INT": st.integers(-10, 30000) | st.sampled_from([2**64, 3.7, "12", "x", float("nan")]),
        "FLOAT": st.floats() | st.sampled_from(["7.5", "nan", 150]),
        "STRING": st.text(max_size=8) | st.just("explode"),
        "BOOLEAN": st.booleans(),
        "COMBO": st.sampled_from([*choices, "nope"]),
    }.get(spec_type, st.nothing())
    return st.one_of(link.map(list), link.map(list), constants, constants, JUNK,
                     st.builds(lambda v: {"__value__": v}, JUNK))


@st.composite
def random_node(draw: st.DrawFn, ids: list[str]) -> Any:
    if draw(st.integers(0, 30)) == 0:
        return draw(JUNK)  # a node that is not a node at all
    class_type = draw(st.sampled_from([*REGISTRY, "SaveImage", "Nope"]))
    inputs: dict[str, Any] = {}
    for spec in REGISTRY[class_type].input_specs() if class_type in REGISTRY else []:
        if draw(st.integers(0, 9)) > 0:
            choices = list(spec.choices or FOLDERS.get(spec.choices_from or "", []))
            inputs[spec.name] = draw(input_value(spec.type, choices, ids))
    if draw(st.booleans()):
        inputs[draw(st.text(max_size=4))] = draw(JUNK)
    return {"class_type": class_type, "inputs": inputs} if draw(st.integers(0, 30)) else {"class_type": class_type}


@st.composite
def random_workflows(draw: st.DrawFn) -> dict[str, Any]:
    """Either a random graph, or a valid two-output workflow with a few random edits."""
    if draw(st.integers(0, 3)) == 0:
        ids = draw(st.lists(st.sampled_from([str(i) for i in range(1, 8)]), min_size=1, max_size=6, unique=True))
        return {node_id: draw(random_node(ids)) for node_id in ids}
    workflow = with_second_output(TXT2IMG)
    ids = list(workflow)
    for _ in range(draw(st.integers(0, 3))):
        node_id = draw(st.sampled_from(ids))
        node = workflow[node_id]
        edit = draw(st.sampled_from(["input", "input", "input", "drop", "node", "add", "cycle"]))
        if edit == "cycle":  # the sampler's latent comes from itself, or from a sampler fed by it
            sampler = copy.deepcopy(TXT2IMG["3"])
            sampler["inputs"]["latent_image"] = draw(st.sampled_from([["3", 0], ["5", 0]]))
            workflow["5"] = sampler
            # node 3 may already be junk from an earlier edit: the cycle is built on a fresh sampler
            workflow["3"] = copy.deepcopy(TXT2IMG["3"])
            workflow["3"]["inputs"]["latent_image"] = draw(st.sampled_from([["5", 0], ["3", 0]]))
        elif edit == "node":
            workflow[node_id] = draw(random_node(ids))
        elif edit == "add":  # a new node, maybe feeding an existing one (which may close a cycle)
            new_id = str(len(workflow) + 20)
            workflow[new_id] = draw(random_node([*ids, new_id]))
            ids.append(new_id)
        elif isinstance(node, dict) and isinstance(node.get("inputs"), dict) and node["class_type"] in REGISTRY:
            spec = draw(st.sampled_from(REGISTRY[node["class_type"]].input_specs()))
            if edit == "drop":
                node["inputs"].pop(spec.name, None)
            else:
                choices = list(spec.choices or FOLDERS.get(spec.choices_from or "", []))
                node["inputs"][spec.name] = draw(input_value(spec.type, choices, ids))
    return workflow


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_workflows())
def test_any_workflow_validates_or_fails_with_comfyui_body(workflow: dict[str, Any]) -> None:
    try:
        prompt = run(workflow)
    except WorkflowInvalid as err:
        assert_body_shape(err.body)
        return
    parsed = prompt.workflow
    outputs = {n for n, node in parsed.nodes.items() if REGISTRY[node.class_type or ""].OUTPUT_NODE}
    assert prompt.outputs and set(prompt.outputs) <= outputs
    assert_node_errors_shape(prompt.partial_errors, outputs - set(prompt.outputs))
    # the order holds exactly what the outputs need, each node after the nodes it links from
    position = {node_id: i for i, node_id in enumerate(prompt.order)}
    assert set(prompt.order) == set(prompt.links) == set(prompt.constants)
    for node_id in prompt.order:
        assert all(position[src] < position[node_id] for src, _ in prompt.links[node_id].values())
        for src, index in prompt.links[node_id].values():
            assert 0 <= index < len(REGISTRY[parsed.nodes[src].class_type or ""].RETURN_TYPES)
        for value in prompt.constants[node_id].values():
            assert not (isinstance(value, float) and math.isnan(value))
    assert set(prompt.order) <= upstream(parsed, prompt.outputs)
    assert topological_order(parsed, prompt.order)  # no cycle among what runs
