"""The API-format model: lenient parsing, round trips, links and the topological walks."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import WorkflowInvalid
from engine.graph import (
    NO_INPUTS,
    CycleError,
    NodeSpec,
    Workflow,
    is_link,
    links,
    topological_order,
    topological_sort,
    upstream,
    walk,
)

TXT2IMG: dict[str, Any] = {
    "4": {"inputs": {"ckpt_name": "sd15.safetensors"}, "class_type": "CheckpointLoaderSimple",
          "_meta": {"title": "Load Checkpoint"}},
    "5": {"inputs": {"width": 512, "height": 512, "batch_size": 1}, "class_type": "EmptyLatentImage"},
    "6": {"inputs": {"text": "a red fox", "clip": ["4", 1]}, "class_type": "CLIPTextEncode"},
    "7": {"inputs": {"text": "blurry", "clip": ["4", 1]}, "class_type": "CLIPTextEncode"},
    "3": {"inputs": {"seed": 42, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal",
                     "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                     "latent_image": ["5", 0]}, "class_type": "KSampler"},
    "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode"},
    "9": {"inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}, "class_type": "SaveImage"},
}


def chain(edges: dict[str, list[str]]) -> Workflow:
    """A workflow whose node `n` links input i to each id in edges[n] (class types are irrelevant here)."""
    return Workflow.parse({n: {"class_type": "X", "inputs": {f"in{i}": [src, 0] for i, src in enumerate(srcs)}}
                           for n, srcs in edges.items()})


def test_parse_keeps_nodes_in_order_with_their_inputs_and_meta() -> None:
    workflow = Workflow.parse(TXT2IMG)
    assert list(workflow.nodes) == ["4", "5", "6", "7", "3", "8", "9"]
    assert workflow.nodes["3"] == NodeSpec(class_type="KSampler", inputs=TXT2IMG["3"]["inputs"])
    assert workflow.nodes["4"].meta == {"title": "Load Checkpoint"}
    assert workflow.nodes["4"].problem is None


@pytest.mark.parametrize("encode", [lambda d: d, json.dumps, lambda d: json.dumps(d).encode()])
def test_to_api_round_trips_from_dict_str_and_bytes(encode: Any) -> None:
    workflow = Workflow.parse(encode(TXT2IMG))
    assert workflow.to_api() == TXT2IMG
    assert Workflow.parse(workflow.to_api()) == workflow
    assert Workflow.parse(workflow) is workflow


def test_to_api_writes_keys_in_comfyui_export_order() -> None:
    assert list(Workflow.parse(TXT2IMG).to_api()["4"]) == ["inputs", "class_type", "_meta"]


@pytest.mark.parametrize(("raw", "class_type", "problem"), [
    ("junk", None, "the node is a string, not an object"),
    ([1, 2], None, "the node is a list, not an object"),
    ({"inputs": {}}, None, None),
    ({"class_type": 5, "inputs": {}}, "5", None),  # ComfyUI: "node 5 does not exist"
    ({"class_type": None, "inputs": {}}, "None", None),  # ComfyUI: "node None does not exist"
    ({"class_type": "KSampler"}, "KSampler", NO_INPUTS),
    ({"class_type": "KSampler", "inputs": [1]}, "KSampler", "the node's 'inputs' is a list, not an object"),
    ({"class_type": "KSampler", "inputs": None}, "KSampler", "the node's 'inputs' is null, not an object"),
])
def test_malformed_nodes_are_kept_for_validation_to_report(raw: Any, class_type: str | None,
                                                           problem: str | None) -> None:
    node = Workflow.parse({"1": raw}).nodes["1"]
    assert (node.class_type, node.problem, node.inputs) == (class_type, problem, {})


def test_non_string_keys_become_node_ids_and_input_names() -> None:
    workflow = Workflow.parse({1: {"class_type": "X", "inputs": {2: "v"}, "_meta": "not an object"}})
    assert workflow.nodes["1"] == NodeSpec(class_type="X", inputs={"2": "v"})


@pytest.mark.parametrize(("data", "message", "details"), [
    ([], "Cannot execute because the prompt is not a JSON object.", "got a list"),
    (3, "Cannot execute because the prompt is not a JSON object.", "got a number"),
    ("[1, 2]", "Cannot execute because the prompt is not a JSON object.", "got a list"),
    ("null", "Cannot execute because the prompt is not a JSON object.", "got null"),
    ("{", "Cannot execute because the prompt is not valid JSON.", "JSONDecodeError"),
    (b"\xff\xfe{", "Cannot execute because the prompt is not valid JSON.", "UnicodeDecodeError"),
    ("[" * 100_000, "Cannot execute because the prompt is not valid JSON.", "RecursionError"),
])
def test_a_prompt_that_is_not_an_object_is_invalid_prompt(data: Any, message: str, details: str) -> None:
    with pytest.raises(WorkflowInvalid) as caught:
        Workflow.parse(data)
    body = caught.value.body
    assert body["node_errors"] == {}
    assert body["error"]["type"] == "invalid_prompt"
    assert body["error"]["message"] == message
    assert body["error"]["details"].startswith(details)
    assert body["error"]["extra_info"] == {}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(JSON | st.dictionaries(st.text(max_size=3), JSON | st.fixed_dictionaries(
    {"class_type": JSON, "inputs": JSON | st.dictionaries(st.text(max_size=4), JSON)}), max_size=4))
def test_parse_never_raises_anything_but_workflow_invalid(data: Any) -> None:
    try:
        workflow = Workflow.parse(data)
    except WorkflowInvalid as err:
        assert err.body["error"]["type"] == "invalid_prompt"
        return
    assert Workflow.parse(workflow.to_api()).to_api() == workflow.to_api()


@pytest.mark.parametrize(("value", "expected"), [
    (["4", 0], True),
    (["4", 2], True),
    (["4", 1.0], True),  # ComfyUI's is_link takes a float index; validation then refuses it
    (["4", True], True),  # a bool is an int to Python, and so to ComfyUI
    ([4, 0], False),  # an id given as a number is not a link: JSON keys are strings
    (["4", "0"], False),
    (["4"], False),
    (["4", 0, 1], False),
    (("4", 0), False),
    ([["4"], 0], False),
    ("4", False),
])
def test_is_link_follows_comfyui_rule(value: Any, expected: bool) -> None:
    assert is_link(value) is expected


def test_links_lists_linked_inputs_only() -> None:
    node = Workflow.parse(TXT2IMG).nodes["3"]
    assert links(node) == {"model": ("4", 0), "positive": ("6", 0), "negative": ("7", 0), "latent_image": ("5", 0)}


def test_upstream_holds_the_nodes_and_their_ancestors_only() -> None:
    workflow = Workflow.parse({**TXT2IMG, "10": {"class_type": "X", "inputs": {"a": ["99", 0], "b": ["4", 0]}}})
    assert upstream(workflow, ["8"]) == {"8", "3", "4", "5", "6", "7"}
    assert upstream(workflow, ["10"]) == {"10", "4"}  # the link to the absent node 99 is skipped
    assert upstream(workflow, ["nope"]) == set()


def test_topological_order_is_depth_first_in_input_order() -> None:
    assert topological_order(Workflow.parse(TXT2IMG), ["9"]) == ["4", "6", "7", "5", "3", "8", "9"]


def test_topological_order_leaves_out_nodes_no_root_needs() -> None:
    workflow = Workflow.parse({**TXT2IMG, "20": {"class_type": "X", "inputs": {"a": ["4", 0]}}})
    assert "20" not in topological_order(workflow, ["9"])
    assert topological_order(workflow, ["20"]) == ["4", "20"]


@pytest.mark.parametrize(("edges", "cycle_nodes"), [
    ({"1": ["2"], "2": ["3"], "3": ["2"]}, {"2", "3"}),
    ({"1": ["1"]}, {"1"}),
    # r -> a -> r is the back edge; b -> a is a cross edge, yet b is on the cycle r -> b -> a -> r
    ({"out": ["r"], "r": ["a", "b"], "a": ["r"], "b": ["a"]}, {"r", "a", "b"}),
    ({"1": ["2", "4"], "2": ["3"], "3": ["2"], "4": ["5"], "5": ["4"]}, {"2", "3", "4", "5"}),
])
def test_cycle_error_names_every_node_on_a_cycle(edges: dict[str, list[str]], cycle_nodes: set[str]) -> None:
    with pytest.raises(CycleError) as caught:
        topological_order(chain(edges), ["1" if "1" in edges else "out"])
    assert set(caught.value.nodes) == cycle_nodes
    assert str(caught.value).startswith("Dependency cycle detected: ")


def test_a_cycle_no_root_reaches_is_not_an_error() -> None:
    assert topological_order(chain({"1": ["2"], "2": [], "3": ["4"], "4": ["3"]}), ["1"]) == ["2", "1"]


def test_a_long_chain_does_not_hit_the_recursion_limit() -> None:
    n = 5000
    workflow = chain({str(i): [str(i + 1)] if i < n else [] for i in range(n + 1)})
    order = topological_order(workflow, ["0"])
    assert order == [str(i) for i in range(n, -1, -1)]


def test_walk_yields_each_reachable_node_once_nearest_first_even_around_a_cycle() -> None:
    deps = {"save": ["decode"], "decode": ["sampler", "vae"], "sampler": ["model", "decode"], "vae": ["model"],
            "model": []}
    assert list(walk(["save"], deps.__getitem__)) == ["save", "decode", "sampler", "vae", "model"]
    assert list(walk([], deps.__getitem__)) == []


def test_topological_sort_works_on_any_dependency_function() -> None:
    deps = {"a": ["b", "c"], "b": ["c"], "c": []}
    assert topological_sort(["a"], deps.__getitem__) == ["c", "b", "a"]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=30))))
def test_topological_order_puts_every_source_first_or_reports_a_real_cycle(graph: tuple[int, list]) -> None:
    n, pairs = graph
    edges: dict[str, list[str]] = {str(i): [] for i in range(n)}
    for dst, src in pairs:
        edges[str(dst)].append(str(src))
    workflow = chain(edges)
    roots = [str(i) for i in range(0, n, 3)]
    try:
        order = topological_order(workflow, roots)
    except CycleError as err:
        for cycle in err.cycles:  # each reported node reaches itself
            for node in cycle:
                assert node in upstream(workflow, edges[node])
        return
    assert set(order) == upstream(workflow, roots)
    position = {node: i for i, node in enumerate(order)}
    for node in order:
        assert all(position[src] < position[node] for src in edges[node])
