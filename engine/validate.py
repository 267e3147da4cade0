"""Workflow validation against the node catalog, answering in ComfyUI's error types and body.

Sits between the templates (or an API caller) and the queue: `validate` takes an API-format
prompt and returns a `ValidatedPrompt` (the outputs to run, the order, coerced constants) or
raises `WorkflowInvalid` with ComfyUI's `{"error", "node_errors"}` body. Nothing runs here.

The behaviour follows ComfyUI 0.3.64's `execution.validate_prompt` / `validate_inputs`:
every node must name a known class; validation walks upstream from each output node through
the links of declared inputs; an output whose upstream has an error is dropped, and the
prompt is refused only when no output is left. The deliberate differences (each documented
where it happens): a constant given to a socket input and a NaN/infinite FLOAT are refused,
a dependency cycle gets its own `dependency_cycle` node error, `dependent_outputs` lists the
outputs that really depend on a node, and inputs are checked in declaration order.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any

from engine.data import comfyui_node
from engine.errors import WorkflowInvalid
from engine.graph import NO_INPUTS, CycleError, Workflow, topological_sort, walk
from engine.input_folder import INPUT_FOLDERS
from engine.nodes.base import InputSpec, Node
from engine.settings import Limits

__all__ = ["ERROR_TYPES", "UI_ONLY_NODES", "ValidatedPrompt", "encodable", "unknown_node", "validate"]

# ComfyUI's error type names, plus ours for a cycle (ComfyUI recurses until RecursionError) and for a graph
# over this server's limits as a whole (engine/cost/, after validation).
ERROR_TYPES = frozenset({
    "invalid_prompt", "prompt_no_outputs", "prompt_outputs_failed_validation", "exception_during_validation",
    "required_input_missing", "bad_linked_input", "return_type_mismatch", "exception_during_inner_validation",
    "invalid_input_type", "value_smaller_than_min", "value_bigger_than_max", "value_not_in_list",
    "custom_validation_failed", "dependency_cycle", "limit_exceeded",
})

# Entries of ComfyUI's frontend graph that its API export leaves out (Reroute and PrimitiveNode are resolved into
# the links and constants they stand for): a prompt holding one was not exported as the API format.
UI_ONLY_NODES = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})
_CONVERTERS: dict[str, Callable[[Any], Any]] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
# ComfyUI leaves input_config out of value_not_in_list past this many options (scanned model lists).
_MAX_LISTED_CHOICES = 20


@dataclass(frozen=True)
class ValidatedPrompt:
    """A workflow that passed validation, ready for the executor."""

    workflow: Workflow
    outputs: tuple[str, ...]  # the valid output nodes, in workflow order
    order: tuple[str, ...]  # the nodes those outputs need, dependencies first
    constants: Mapping[str, Mapping[str, Any]]  # node -> input -> coerced constant (given inputs only)
    links: Mapping[str, Mapping[str, tuple[str, int]]]  # node -> input -> (source node, output index >= 0)
    # ComfyUI's `node_errors` for the outputs that were dropped; {} when every output is valid.
    partial_errors: dict[str, Any] = field(default_factory=dict)


def validate(
    workflow_json: object,
    registry: Mapping[str, type[Node]],
    choices_for: Callable[[str], Sequence[str]],
    limits: Limits,
) -> ValidatedPrompt:
    """Check an API-format prompt; return what to run, or raise WorkflowInvalid with ComfyUI's body.

    `choices_for(folder)` lists a COMBO's options for inputs declared with a folder
    ("checkpoints", "loras", "vae", "embeddings", "input"); `limits` goes to each node's
    `check_values`. Outputs that fail are dropped and reported in `partial_errors`, as
    ComfyUI queues a prompt when some of its outputs are valid.
    """
    workflow = Workflow.parse(workflow_json)
    outputs = _output_nodes(workflow, registry)
    return _Validation(workflow, registry, choices_for, limits).run(outputs)


def _output_nodes(workflow: Workflow, registry: Mapping[str, type[Node]]) -> list[str]:
    # ComfyUI checks every node's class first, linked to an output or not, and stops at the first.
    outputs = []
    for node_id, node in workflow.nodes.items():
        if node.class_type is None:
            _refuse("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'")
        cls = registry.get(node.class_type)
        if cls is None:
            # ComfyUI's type, message and "Node ID '#3'"; the details go on to say whose node it is
            _refuse("invalid_prompt", f"Cannot execute because node {node.class_type} does not exist.",
                    f"Node ID '#{node_id}': {unknown_node(node.class_type)}")
        if getattr(cls, "OUTPUT_NODE", False) is True:
            outputs.append(node_id)
    if not outputs:
        _refuse("prompt_no_outputs", "Prompt has no outputs", "")
    return outputs


def unknown_node(class_type: str) -> str:
    """Why Noodle has no node `class_type`, in words: a UI-only entry of ComfyUI's editor (the workflow was not
    exported as the API format), a ComfyUI built-in Noodle does not run yet, one of ComfyUI's
    paid API nodes, or a custom node pack's node (engine/data/comfyui_nodes.json, read from ComfyUI 0.3.64's source,
    tells them apart)."""
    if class_type in UI_ONLY_NODES:
        return (f"{class_type} is a UI-only entry of ComfyUI's editor (notes, reroutes and primitive widgets live "
                f"only in the editor's graph and do not appear in an API export), so this is not an API-format "
                f"prompt: in ComfyUI export the workflow with Workflow > Export (API) (Save (API Format) in older "
                f"versions) and submit that file")
    known = comfyui_node(class_type)
    if known is None:
        return (f"{class_type} is not part of ComfyUI: it comes from a custom node pack, and Noodle runs only "
                f"ComfyUI's built-in nodes, so there is nothing to install; rebuild that step with built-in "
                f"nodes (`noodle nodes` lists those Noodle runs)")
    if known.kind == "api":
        return (f"{class_type} is one of ComfyUI's API nodes ({known.family}), which send the work to a paid "
                f"online service; Noodle runs models on this machine only")
    return (f"{class_type} is a ComfyUI built-in node ({known.family}) that Noodle does not run yet "
            f"(`noodle nodes` lists those it runs)")


def _refuse(kind: str, message: str, details: str, node_errors: dict[str, Any] | None = None) -> None:
    error = {"type": kind, "message": message, "details": details, "extra_info": {}}
    raise WorkflowInvalid({"error": error, "node_errors": node_errors or {}})


class _Abort(Exception):
    """A problem that makes ComfyUI raise while validating a node (a KeyError for a missing
    linked node, an IndexError for a bad output index ...): reported under that exception's
    type name, with our own wording in the details."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type


@dataclass
class _NodeCheck:
    """What one node's own inputs say, before its upstream is known."""

    errors: list[dict[str, Any]] = field(default_factory=list)
    failure: tuple[str, str, list[str]] | None = None  # (exception type, message, traceback)
    followed: list[tuple[str, str, int]] = field(default_factory=list)  # (input, source, index) walked upstream
    configs: dict[str, list[Any]] = field(default_factory=dict)  # input -> ComfyUI's input_config
    constants: dict[str, Any] = field(default_factory=dict)


class _Validation:
    """One run of `validate`: per-node checks, then the walk from the outputs."""

    def __init__(self, workflow: Workflow, registry: Mapping[str, type[Node]],
                 choices_for: Callable[[str], Sequence[str]], limits: Limits) -> None:
        self.workflow, self.registry, self.limits = workflow, registry, limits
        self.choices_for = choices_for
        self.folder_choices: dict[str, list[str]] = {}  # one listing per folder per prompt
        self.checks: dict[str, _NodeCheck] = {}

    def run(self, outputs: list[str]) -> ValidatedPrompt:
        found_by, finished = self._walk(outputs)
        reported = {node_id: self._reported_errors(node_id, found_by[node_id]) for node_id in finished}
        self._add_cycle_errors(outputs, reported)

        reach = {out: set(walk([out], self._deps)) for out in outputs}
        failed = [out for out in outputs if any(reported[n] for n in reach[out])]
        good = [out for out in outputs if out not in failed]
        node_errors: dict[str, Any] = {}
        for node_id in finished:  # completion order, as ComfyUI fills its `validated` dict
            dependents = [out for out in failed if node_id in reach[out]]
            if reported[node_id] and dependents:
                node_errors[node_id] = {"errors": reported[node_id], "dependent_outputs": dependents,
                                        "class_type": self.workflow.nodes[node_id].class_type}
        if not good:
            details = "\n".join(f"{e['message']}: {e['details']}" for out in failed for e in reported[out])
            _refuse("prompt_outputs_failed_validation", "Prompt outputs failed validation", details, node_errors)

        order = tuple(topological_sort(good, self._deps))
        return ValidatedPrompt(
            workflow=self.workflow,
            outputs=tuple(good),
            order=order,
            constants=MappingProxyType({n: MappingProxyType(dict(self.checks[n].constants)) for n in order}),
            links=MappingProxyType({n: MappingProxyType({name: (src, index) for name, src, index
                                                          in self.checks[n].followed}) for n in order}),
            partial_errors=node_errors,
        )

    # -- the walk -------------------------------------------------------------------------

    def _walk(self, outputs: list[str]) -> tuple[dict[str, tuple[str, str] | None], list[str]]:
        """Depth first from each output, as ComfyUI's recursion visits nodes (without recursing).

        Returns, per node, the (downstream node, input) that reached it first (None for an
        output reached as itself: ComfyUI reports its exceptions one level differently), and
        the nodes in the order their checks completed.
        """
        found_by: dict[str, tuple[str, str] | None] = {}
        finished: list[str] = []
        for out in outputs:
            if out in self.checks:
                continue
            found_by[out] = None
            stack = [(out, iter(self._check(out).followed))]
            while stack:
                node_id, pending = stack[-1]
                for name, src, _ in pending:
                    if src not in self.checks:
                        found_by[src] = (node_id, name)
                        stack.append((src, iter(self._check(src).followed)))
                        break
                else:
                    stack.pop()
                    finished.append(node_id)
        return found_by, finished

    def _deps(self, node_id: str) -> list[str]:
        return [src for _, src, _ in self.checks[node_id].followed]

    def _reported_errors(self, node_id: str, found_by: tuple[str, str] | None) -> list[dict[str, Any]]:
        check = self.checks[node_id]
        if check.failure is None:
            return list(check.errors)
        # An exception replaces the node's other errors: in ComfyUI it leaves validate_inputs.
        exception_type, message, tb = check.failure
        if found_by is None:
            return [{"type": "exception_during_validation", "message": "Exception when validating node",
                     "details": message, "extra_info": {"exception_type": exception_type, "traceback": tb}}]
        # Caught by the node whose link reached this one, so ComfyUI names that node's input.
        downstream, input_name = found_by
        return [{"type": "exception_during_inner_validation", "message": "Exception when validating inner node",
                 "details": message,
                 "extra_info": {"input_name": input_name,
                                "input_config": self.checks[downstream].configs.get(input_name),
                                "exception_message": message, "exception_type": exception_type,
                                "traceback": tb,
                                "linked_node": list(self.workflow.nodes[downstream].inputs[input_name])}}]

    def _add_cycle_errors(self, outputs: list[str], reported: dict[str, list[dict[str, Any]]]) -> None:
        # ComfyUI has no check here: its recursion overflows and it answers with empty node_errors.
        # We name each node on the cycle, with the input that closes it.
        try:
            topological_sort(outputs, self._deps)
        except CycleError as cycle_error:
            for cycle in cycle_error.cycles:
                members = set(cycle)
                for node_id in cycle:
                    name, src, index = next(link for link in self.checks[node_id].followed if link[1] in members)
                    reported[node_id].append({
                        "type": "dependency_cycle", "message": "Dependency cycle detected",
                        "details": f"{name} <- node {src!r}, which depends on this node: "
                                   f"{' -> '.join((*cycle, cycle[0]))}",
                        "extra_info": {"input_name": name, "linked_node": [src, index], "cycle": list(cycle)},
                    })

    # -- one node -------------------------------------------------------------------------

    def _check(self, node_id: str) -> _NodeCheck:
        check = self.checks[node_id] = _NodeCheck()
        try:
            self._check_inputs(node_id, check)
        except _Abort as ex:
            check.failure = (ex.exception_type, str(ex), [])
        except Exception as ex:  # a node's own check (or its folder listing) blew up: ComfyUI reports it
            kind = type(ex)
            name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
            check.failure = (name, str(ex), traceback.format_tb(ex.__traceback__))
        return check

    def _check_inputs(self, node_id: str, check: _NodeCheck) -> None:
        node = self.workflow.nodes[node_id]
        cls = self.registry[node.class_type or ""]
        if node.problem is not None:
            # ComfyUI: KeyError('inputs') when absent; a non-object fails on first use.
            raise _Abort("KeyError" if node.problem == NO_INPUTS else "TypeError", node.problem)
        specs = cls.input_specs()
        check.configs = {spec.name: self._input_config(spec) for spec in specs}
        for spec in specs:  # declared inputs only: unknown extra keys are ignored, as in ComfyUI
            if spec.name not in node.inputs:
                if spec.required:
                    check.errors.append(_error("required_input_missing", "Required input is missing", spec.name,
                                               input_name=spec.name))
                continue
            value = node.inputs[spec.name]
            if isinstance(value, list):  # ComfyUI treats any list as a link
                self._check_link(spec, value, check)
                continue
            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]  # ComfyUI's wrapper for a list-valued widget
            error = self._check_constant(spec, value, check)
            if error is not None:
                check.errors.append(error)
        if not check.errors:  # a node's own checks see only constants that passed
            for name, message in cls.check_values(dict(check.constants), self.limits):
                check.errors.append(_error("custom_validation_failed", "Custom validation failed for node",
                                           f"{name} - {message}", input_name=name))

    def _check_link(self, spec: InputSpec, value: list[Any], check: _NodeCheck) -> None:
        name, config = spec.name, check.configs[spec.name]
        if len(value) != 2:
            check.errors.append(_error("bad_linked_input",
                                       "Bad linked input, must be a length-2 list of [node_id, slot_index]", name,
                                       input_name=name, input_config=config, received_value=value))
            return
        src, index = value
        if isinstance(src, (list, dict)):  # unhashable: ComfyUI's prompt[src] raises TypeError
            raise _Abort("TypeError", f"{name}: a link's node id must be a string, not {type(src).__name__}")
        if not isinstance(src, str) or src not in self.workflow.nodes:
            hint = (f"; node ids are strings: use [{str(src)!r}, {index!r}]"
                    if not isinstance(src, str) and str(src) in self.workflow.nodes else "")
            raise _Abort("KeyError", f"{name}: links to node {src!r}, which is not in the workflow{hint}")
        source_type = self.workflow.nodes[src].class_type or ""
        return_types = tuple(self.registry[source_type].RETURN_TYPES)
        # ComfyUI indexes RETURN_TYPES with the raw value: an int (a bool counts, -1 is the last
        # output) works, anything else raises. We keep that, and store the plain index.
        if not isinstance(index, int):
            raise _Abort("TypeError", f"{name}: the output index of a link must be an integer, not {index!r}")
        if not -len(return_types) <= index < len(return_types):
            raise _Abort("IndexError", f"{name}: node {src!r} ({source_type}) has {len(return_types)} output(s); "
                                       f"there is no output {index}")
        received = return_types[index]
        if not _types_match(received, spec.type):
            check.errors.append(_error(
                "return_type_mismatch", "Return type mismatch between linked nodes",
                f"{name}, received_type({received}) mismatch input_type({config[0]})",
                input_name=name, input_config=config, received_type=received, linked_node=list(value)))
            return
        check.followed.append((name, src, index % len(return_types)))

    def _check_constant(self, spec: InputSpec, value: Any, check: _NodeCheck) -> dict[str, Any] | None:
        name, config = spec.name, check.configs[spec.name]
        if spec.is_socket:
            # ComfyUI lets a constant through here and the node fails when it runs; we refuse it
            # now, with the error that says what a socket input takes.
            return _error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                          name, input_name=name, input_config=config, received_value=value)
        raw = value
        convert = _CONVERTERS.get(spec.type)
        if convert is not None:
            # ComfyUI's coercion, quirks included: int(3.7) is 3, int("12") is 12, bool("false") is True.
            try:
                value = convert(value)
            except Exception as ex:
                return _invalid_type(spec, raw, config, str(ex))
        if isinstance(value, str) and not encodable(value):
            # JSON's "\ud800" parses to a lone surrogate, which is no character: the tokenizer, a file name, a PNG
            # text chunk and SQLite each fail on it with an error of their own. Refused here, named.
            shown = value.encode("utf-8", "backslashreplace").decode("utf-8")
            return _invalid_type(spec, shown, config, "it holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                                 "which is not a character: remove it, or write the character itself")
        if spec.min is not None and value < spec.min:
            return _error("value_smaller_than_min", f"Value {value} smaller than min of {spec.min}", name,
                          input_name=name, input_config=config, received_value=value)
        if spec.max is not None and value > spec.max:
            return _error("value_bigger_than_max", f"Value {value} bigger than max of {spec.max}", name,
                          input_name=name, input_config=config, received_value=value)
        if spec.type == "FLOAT" and not math.isfinite(value):
            # ComfyUI accepts NaN (every comparison with it is false) and yields a NaN image; we refuse.
            return _invalid_type(spec, raw, config, f"{value} is not a finite number")
        if spec.type == "COMBO":
            options = config[0]
            if value not in options and not _runs_as_safetensors(spec, value, options):
                listed = len(options) <= _MAX_LISTED_CHOICES
                return _error("value_not_in_list", "Value not in list",
                              f"{name}: '{value}' not in {options if listed else f'(list of length {len(options)})'}"
                              f"{_pickle_hint(spec, value)}{_suffix_case_hint(spec, value)}",
                              input_name=name, input_config=config if listed else None, received_value=value)
        check.constants[name] = value
        return None

    def _input_config(self, spec: InputSpec) -> list[Any]:
        """ComfyUI's `input_config`: [type or list of options, options dict]."""
        choices = None
        if spec.type == "COMBO":
            if spec.choices is not None:
                choices = list(spec.choices)
            elif spec.choices_from is not None:
                if spec.choices_from not in self.folder_choices:
                    self.folder_choices[spec.choices_from] = list(self.choices_for(spec.choices_from))
                choices = self.folder_choices[spec.choices_from]
            else:
                choices = []
        entry = spec.comfy_entry(choices)
        return [entry[0], dict(entry[1]) if len(entry) > 1 else {}]


def _pickle_stem(spec: InputSpec, value: Any) -> str | None:
    """`sub/x` for a pickle name `sub/x.ckpt` given to a models-folder input; None for anything else."""
    if spec.choices_from is None or spec.choices_from in INPUT_FOLDERS or not isinstance(value, str):
        return None
    from engine.models.detect import PICKLE_SUFFIXES  # here: detect needs torch, validation otherwise does not

    clean = value.replace("\\", "/")
    suffix = PurePosixPath(clean).suffix
    return clean[: -len(suffix)] if suffix.lower() in PICKLE_SUFFIXES else None


def _runs_as_safetensors(spec: InputSpec, value: Any, options: Sequence[Any]) -> bool:
    """A pickle name whose .safetensors of the same stem the folder lists: the run loads that file instead
    (ModelCatalog.safetensors_for, which the executor notes in the run's meta)."""
    stem = _pickle_stem(spec, value)
    return stem is not None and f"{stem}.safetensors" in options


def _pickle_hint(spec: InputSpec, value: Any) -> str:
    stem = _pickle_stem(spec, value)
    if stem is None:
        return ""
    file = stem.rsplit("/", 1)[-1] + ".safetensors"
    return (f"; '{value}' is a pickle file, and Noodle loads only .safetensors: it runs such a name on {file} "
            f"in {spec.choices_from}/ when that file is there. Convert the pickle once with `noodle convert "
            f"<models>/{spec.choices_from}/{value}`, or download the .safetensors release")


def _suffix_case_hint(spec: InputSpec, value: Any) -> str:
    """For 'x.SAFETENSORS', which the folder leaves out of its list (ModelCatalog.list): rename it."""
    if spec.choices_from is None or spec.choices_from in INPUT_FOLDERS or not isinstance(value, str):
        return ""
    suffix = value[-len(".safetensors"):]
    if suffix.lower() != ".safetensors" or suffix == ".safetensors":
        return ""
    return (f"; '{value}' ends in '{suffix}', and the loader reads a file as safetensors only by the lowercase "
            f"'.safetensors': rename it to '{value[:-len(suffix)]}.safetensors'")


def _types_match(received: str, expected: str) -> bool:
    """ComfyUI's validate_node_input, non-strict: equal, or comma-separated unions that overlap."""
    if received == expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


def encodable(text: str) -> bool:
    """Whether `text` is UTF-8 text (a lone surrogate, from JSON's "\\ud800" or bytes that were not UTF-8, is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _error(kind: str, message: str, details: str, **extra_info: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def _invalid_type(spec: InputSpec, raw: Any, config: list[Any], reason: str) -> dict[str, Any]:
    return _error("invalid_input_type", f"Failed to convert an input value to a {spec.type} value",
                  f"{spec.name}, {raw}, {reason}", input_name=spec.name, input_config=config,
                  received_value=raw, exception_message=reason)
