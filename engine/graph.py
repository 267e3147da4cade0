"""The workflow graph: ComfyUI's API prompt format, parsed leniently, and the walks over it.

A workflow is `{"<node id>": {"class_type": ..., "inputs": {...}, "_meta": {...}}}`; an input
is a constant or a link `["<source id>", <output index>]`. Templates build a `Workflow`,
`engine.validate` checks one against the node catalog, the executor runs `topological_order`.

Parsing never fails on a malformed node: it becomes a `NodeSpec` that validation reports with
ComfyUI's error types (a missing class_type is `invalid_prompt`, missing inputs an exception
during validation). Only a prompt that is not a JSON object at all is refused here.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import NoodleError, WorkflowInvalid

__all__ = [
    "NO_INPUTS",
    "CycleError",
    "NodeSpec",
    "Workflow",
    "is_link",
    "links",
    "topological_order",
    "topological_sort",
    "upstream",
    "walk",
]


# NodeSpec.problem for a node without "inputs" (ComfyUI: KeyError('inputs') when it is validated).
NO_INPUTS = "the node has no 'inputs' object"


class CycleError(NoodleError):
    """Nodes that depend on themselves through their links (ComfyUI's DependencyCycleError)."""

    def __init__(self, cycles: Iterable[Iterable[str]]) -> None:
        self.cycles: tuple[tuple[str, ...], ...] = tuple(tuple(c) for c in cycles)
        self.nodes: tuple[str, ...] = tuple(n for cycle in self.cycles for n in cycle)
        shown = "; ".join(" -> ".join((*c, c[0])) for c in self.cycles)
        super().__init__(f"Dependency cycle detected: {shown}; a node cannot take its own output as input")


class NodeSpec(BaseModel):
    """One node of a workflow as it was sent: its class, its raw inputs, its UI metadata."""

    model_config = ConfigDict(frozen=True)

    # None when the node has no class_type (ComfyUI: "missing the class_type property"); a
    # non-string class_type is kept as its str(), which names no node, as ComfyUI reports it.
    class_type: str | None
    inputs: dict[str, Any] = Field(default_factory=dict)
    # ComfyUI's "_meta" (the node's title in the UI); carried along, never read.
    meta: dict[str, Any] = Field(default_factory=dict)
    # Why the node itself is malformed ("inputs" missing or not an object), for validation.
    problem: str | None = None

    @classmethod
    def from_api(cls, raw: object) -> NodeSpec:
        """A node from its API-format value; anything malformed is recorded, never raised."""
        if not isinstance(raw, Mapping):
            return cls(class_type=None, problem=f"the node is {_kind(raw)}, not an object")
        class_type = raw.get("class_type")
        if class_type is not None and not isinstance(class_type, str):
            class_type = str(class_type)
        elif "class_type" in raw and class_type is None:
            class_type = "None"  # present but null: ComfyUI says "node None does not exist"
        raw_inputs = raw.get("inputs")
        problem = None
        if "inputs" not in raw:
            problem = NO_INPUTS
        elif not isinstance(raw_inputs, Mapping):
            problem = f"the node's 'inputs' is {_kind(raw_inputs)}, not an object"
        inputs = {str(k): v for k, v in raw_inputs.items()} if isinstance(raw_inputs, Mapping) else {}
        meta = raw.get("_meta")
        meta = {str(k): v for k, v in meta.items()} if isinstance(meta, Mapping) else {}
        return cls(class_type=class_type, inputs=inputs, meta=meta, problem=problem)

    def to_api(self) -> dict[str, Any]:
        """This node in API format, keys in the order ComfyUI's "Export (API)" writes them."""
        out: dict[str, Any] = {"inputs": dict(self.inputs)}
        if self.class_type is not None:
            out["class_type"] = self.class_type
        if self.meta:
            out["_meta"] = dict(self.meta)
        return out


class Workflow(BaseModel):
    """A whole API-format prompt: node id -> NodeSpec, in the order the nodes were sent."""

    model_config = ConfigDict(frozen=True)

    nodes: dict[str, NodeSpec] = Field(default_factory=dict)

    @classmethod
    def parse(cls, data: object) -> Workflow:
        """Parse an API prompt from a dict, a JSON string or bytes, or pass a Workflow through.

        Raises WorkflowInvalid (`invalid_prompt`) only when the whole thing is not a JSON
        object; a malformed node is kept for validation to report.
        """
        if isinstance(data, Workflow):
            return data
        if isinstance(data, (str, bytes, bytearray)):
            try:
                data = json.loads(data)
            except (ValueError, RecursionError) as ex:  # UnicodeDecodeError is a ValueError
                raise WorkflowInvalid(_invalid_prompt("Cannot execute because the prompt is not valid JSON.",
                                                      f"{type(ex).__name__}: {ex}")) from None
        if not isinstance(data, Mapping):
            # ComfyUI answers a 500 here (it iterates the value as a dict); we say what it was.
            raise WorkflowInvalid(_invalid_prompt(
                "Cannot execute because the prompt is not a JSON object.",
                f"got {_kind(data)}; expected {{\"<node id>\": {{\"class_type\": ..., \"inputs\": {{...}}}}}}"))
        # JSON object keys are strings; a dict built in Python may use ints, which name the same node.
        return cls(nodes={str(node_id): NodeSpec.from_api(raw) for node_id, raw in data.items()})

    def to_api(self) -> dict[str, Any]:
        """The API-format dict; `Workflow.parse(w.to_api()) == w`."""
        return {node_id: node.to_api() for node_id, node in self.nodes.items()}


def is_link(value: object) -> bool:
    """ComfyUI's rule (comfy_execution/graph_utils.is_link): a list `[str id, int or float index]`.

    An id given as a number is not a link (JSON keys are strings, so it would name no node);
    a float index passes this test, as in ComfyUI, and validation then refuses it.
    """
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], (int, float))
    )


def links(node: NodeSpec) -> dict[str, tuple[str, int | float]]:
    """The linked inputs of a node: input name -> (source node id, output index)."""
    return {name: (value[0], value[1]) for name, value in node.inputs.items() if is_link(value)}


def upstream(workflow: Workflow, node_ids: Iterable[str]) -> set[str]:
    """`node_ids` and every node they depend on through links (links to absent nodes are skipped)."""
    return set(walk((n for n in node_ids if n in workflow.nodes), _workflow_deps(workflow)))


def walk(roots: Iterable[str], deps: Callable[[str], Iterable[str]]) -> Iterator[str]:
    """`roots` and every node reachable from them through `deps`, each once, nearest first (breadth first)."""
    seen: set[str] = set()
    queue = deque(roots)
    while queue:
        node_id = queue.popleft()
        if node_id in seen:
            continue
        seen.add(node_id)
        yield node_id
        queue.extend(deps(node_id))


def topological_order(workflow: Workflow, node_ids: Iterable[str]) -> list[str]:
    """The nodes `node_ids` need, dependencies first; raises CycleError naming the cycle's nodes.

    Every link counts, as in ComfyUI's ExecutionList (which follows any `is_link` input).
    """
    return topological_sort([n for n in node_ids if n in workflow.nodes], _workflow_deps(workflow))


def topological_sort(roots: Iterable[str], deps: Callable[[str], Iterable[str]]) -> list[str]:
    """Every node reachable from `roots` through `deps`, each after its dependencies.

    Depth first, in the order `roots` and `deps` give, so the result is deterministic: a node's
    inputs run in declaration order. Iterative Tarjan, so a long chain cannot hit Python's
    recursion limit, and a cycle is reported with every node on it (all non-trivial strongly
    connected components), not just the first back edge found.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    self_loops: set[str] = set()
    order: list[str] = []
    cycles: list[list[str]] = []

    def enter(node: str) -> tuple[str, Iterator[str]]:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        return node, iter(deps(node))

    for root in roots:
        if root in index:
            continue
        work = [enter(root)]
        while work:
            node, pending = work[-1]
            for dep in pending:
                if dep not in index:
                    work.append(enter(dep))
                    break
                if dep in on_stack:  # a back edge: dep is an ancestor on the current path
                    low[node] = min(low[node], index[dep])
                    if dep == node:
                        self_loops.add(node)
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:  # node is the root of a strongly connected component
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in self_loops:
                        cycles.append(sorted(component, key=index.__getitem__))
                    order.extend(reversed(component))
    if cycles:
        raise CycleError(cycles)
    return order


def _workflow_deps(workflow: Workflow) -> Callable[[str], list[str]]:
    def deps(node_id: str) -> list[str]:
        return [src for src, _ in links(workflow.nodes[node_id]).values() if src in workflow.nodes]

    return deps


def _invalid_prompt(message: str, details: str) -> dict[str, Any]:
    return {
        "error": {"type": "invalid_prompt", "message": message, "details": details, "extra_info": {}},
        "node_errors": {},
    }


def _kind(value: object) -> str:
    """'a list', 'null' ...: how a JSON reader would name the value's type."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", tuple: "a list"}
    return names.get(type(value), f"a {type(value).__name__}")
