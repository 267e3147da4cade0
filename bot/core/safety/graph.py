"""What a workflow graph asks for, read the way the rules need it, and the enforced negative written into it.

Every door ends in one or more ComfyUI API graphs (Noodle's own templates, or a member's /workflow), so the
rules are checked on those graphs, after everything that could hide a word has been expanded:

- `prompt_texts`: every prompt box of the graph (the multiline STRING inputs: CLIPTextEncode's `text`,
  CLIPTextEncodeSDXL's `text_g` and `text_l`, ...), positive or negative;
- `model_files`: every checkpoint and LoRA a loader names (the inputs whose choices are those folders);
- `with_negative`: the graph with the server's enforced negative in every sampler's negative conditioning;
  `negative_only`: the text encodes that feed negatives alone (where the owner's own negative words are not the
  member's to answer for); `guidance_below_one`: the cfg inputs under 1, where a sampler draws toward its
  negative (at cfg 0 it draws the negative alone), which a server that enforces a negative cannot allow.

The node catalog (engine/nodes) says which inputs are prompt boxes, model names and conditioning, so a node
added to the engine later is covered without a list here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bot.core.safety.words import holds_phrase
from prompts.plan import Syntax
from engine.graph import is_link
from engine.nodes import catalog
from engine.nodes.base import InputSpec

__all__ = ["NegativeNotApplied", "PromptText", "guidance_below_one", "model_files", "negative_only", "prompt_texts",
           "with_negative"]

CONDITIONING = "CONDITIONING"


class NegativeNotApplied(ValueError):
    """A sampler whose negative input cannot take the enforced negative (no CLIP anywhere near it)."""


@dataclass(frozen=True)
class PromptText:
    """One prompt box: its node, input name and text."""

    node_id: str
    class_type: str
    name: str
    text: str


def _specs(class_type: str) -> dict[str, InputSpec]:
    cls = catalog().get(class_type)
    return {} if cls is None else {spec.name: spec for spec in cls.input_specs()}


def _nodes(workflow: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for node_id, node in workflow.items():
        if isinstance(node, dict) and isinstance(node.get("inputs"), dict):
            yield str(node_id), str(node.get("class_type", "")), node["inputs"]


def _prompt_inputs(class_type: str) -> list[str]:
    return [name for name, spec in _specs(class_type).items() if spec.type == "STRING" and spec.multiline]


def prompt_texts(workflow: dict[str, Any]) -> list[PromptText]:
    """Every prompt box's text (an unknown node's text inputs too: the validator refuses it, but not before us)."""
    found = []
    for node_id, class_type, inputs in _nodes(workflow):
        names = _prompt_inputs(class_type) if class_type in catalog() else \
            [name for name, value in inputs.items() if isinstance(value, str) and "text" in name.lower()]
        found += [PromptText(node_id, class_type, name, inputs[name]) for name in names
                  if isinstance(inputs.get(name), str)]
    return found


def model_files(workflow: dict[str, Any]) -> dict[str, list[str]]:
    """`{"checkpoints": [...], "loras": [...]}`: the file names the graph's loaders ask for."""
    found: dict[str, list[str]] = {"checkpoints": [], "loras": []}
    for _, class_type, inputs in _nodes(workflow):
        for name, spec in _specs(class_type).items():
            value = inputs.get(name)
            if spec.choices_from in found and isinstance(value, str):
                found[spec.choices_from].append(value)
    return found


def _returns(class_type: str) -> tuple[str, ...]:
    cls = catalog().get(class_type)
    return tuple(getattr(cls, "RETURN_TYPES", ())) if cls is not None else ()


def _encodes_behind(workflow: dict[str, Any], link: Any) -> set[str]:
    """The text encodes whose conditioning reaches `link` (through ControlNet applies, combines, area sets...)."""
    found: set[str] = set()
    seen: set[tuple[str, int]] = set()
    todo = [link]
    while todo:
        current = todo.pop()
        if not is_link(current):
            continue
        source, index = str(current[0]), int(current[1])
        if (source, index) in seen or not isinstance(workflow.get(source), dict):
            continue
        seen.add((source, index))
        node = workflow[source]
        class_type, inputs = str(node.get("class_type", "")), node.get("inputs", {})
        if _prompt_inputs(class_type):
            found.add(source)
            continue
        if "positive" in inputs and "negative" in inputs:  # (positive, negative, ...) out, as ControlNetApplyAdvanced
            if index < 2:
                todo.append(inputs["positive" if index == 0 else "negative"])
            continue
        specs = _specs(class_type)
        todo += [value for name, value in inputs.items() if specs.get(name) and specs[name].type == CONDITIONING]
    return found


def negative_only(workflow: dict[str, Any]) -> set[str]:
    """The text encodes whose conditioning reaches samplers only as their negative (never as a positive)."""
    samplers = _samplers(workflow)
    negatives = set().union(*(_encodes_behind(workflow, workflow[s]["inputs"]["negative"]) for s in samplers)) \
        if samplers else set()
    return negatives - _positives(workflow)


def _positives(workflow: dict[str, Any]) -> set[str]:
    """The text encodes whose conditioning reaches a sampler or guider through any input but `negative`: a
    KSampler's positive, and as well DualCFGGuider's cond1 and cond2 and BasicGuider's conditioning (an encode
    wired as cond1 and as the negative is a positive, and the server's own words in it are the member's)."""
    found: set[str] = set()
    for _, class_type, inputs in _nodes(workflow):
        if CONDITIONING in _returns(class_type):
            continue  # passes conditioning on: what it feeds is found from the consumer
        specs = _specs(class_type)
        for name, value in inputs.items():
            if name != "negative" and name in specs and specs[name].type == CONDITIONING:
                found |= _encodes_behind(workflow, value)
    return found


def guidance_below_one(workflow: dict[str, Any]) -> list[str]:
    """Each cfg input (cfg, DualCFGGuider's cfg_conds and cfg_cond2_negative ...) of a node that takes a negative,
    set under 1 or from another node's output (a value not known before the run): `node 3 (KSampler) cfg 0.0`."""
    found = []
    for node_id, class_type, inputs in _nodes(workflow):
        if not is_link(inputs.get("negative")):
            continue
        for name, spec in _specs(class_type).items():
            value = inputs.get(name)
            if not name.startswith("cfg") or spec.type != "FLOAT" or value is None:
                continue
            if is_link(value) or not isinstance(value, (int, float)) or value < 1:
                shown = "from another node" if is_link(value) else repr(value)
                found.append(f"node {node_id} ({class_type}) {name} {shown}")
    return found


def _samplers(workflow: dict[str, Any]) -> list[str]:
    """Nodes that consume a negative conditioning rather than pass one on (KSampler, CFGGuider, ...)."""
    return [node_id for node_id, class_type, inputs in _nodes(workflow)
            if is_link(inputs.get("negative")) and CONDITIONING not in _returns(class_type)]


def _contains(text: str, enforced: str, syntax: Syntax) -> bool:
    return holds_phrase(text, enforced, syntax)


def _appended(text: str, enforced: str) -> str:
    return f"{text.rstrip().rstrip(',')}, {enforced}" if text.strip() else enforced


def with_negative(workflow: dict[str, Any], enforced: str, syntax: Syntax = "noodle") -> dict[str, Any]:
    """`workflow` with `enforced` in every sampler's negative conditioning; unchanged where it is already there.

    A negative text encode that feeds only negatives gets the text appended (as /imagine's negative is); one
    that also feeds a positive, or a negative made without a text encode (ConditioningZeroOut), gets a new
    CLIPTextEncode of `enforced` joined on by ConditioningConcat, with the CLIP of the sampler's own encodes.
    NegativeNotApplied when a sampler has no text encode to take a CLIP from."""
    enforced = enforced.strip()
    if not enforced:
        return workflow
    graph = copy.deepcopy(workflow)
    samplers = _samplers(graph)
    positives = _positives(graph)
    for sampler in samplers:
        inputs = graph[sampler]["inputs"]
        negatives = _encodes_behind(graph, inputs["negative"])
        texts = {node: {name: graph[node]["inputs"].get(name) for name in _prompt_inputs(graph[node]["class_type"])}
                 for node in negatives}
        if negatives and all(isinstance(text, str) and _contains(text, enforced, syntax)
                             for boxes in texts.values() for text in boxes.values()):
            continue
        if any(node.startswith("noodle_negative_") and texts[node].get("text") == enforced for node in negatives):
            continue  # joined on before (a reroll of a /workflow result this rule already changed)
        if negatives and not negatives & positives and all(isinstance(text, str) for boxes in texts.values()
                                                           for text in boxes.values()):
            appended = {(node, name): text if _contains(text, enforced, syntax) else _appended(text, enforced)
                        for node, boxes in texts.items() for name, text in boxes.items()}
            # held at full weight after the append too: an unclosed `[` in the member's text weighs down what
            # follows it, so such a negative takes the enforced words in an encode of their own (below)
            if all(_contains(text, enforced, syntax) for text in appended.values()):
                for (node, name), text in appended.items():
                    graph[node]["inputs"][name] = text
                continue
        clip = next((graph[node]["inputs"].get("clip") for node in sorted(negatives | _encodes_behind(
            graph, inputs.get("positive"))) if is_link(graph[node]["inputs"].get("clip"))), None)
        if clip is None:
            raise NegativeNotApplied(f"node {sampler} ({graph[sampler].get('class_type')}) has no text encode "
                                     "to take a CLIP from, so this server's enforced negative prompt cannot be "
                                     "added to it; give its negative input a CLIPTextEncode")
        encode_id = _free_id(graph, f"noodle_negative_{sampler}")
        graph[encode_id] = {"class_type": "CLIPTextEncode", "inputs": {"text": enforced, "clip": list(clip)}}
        join_id = _free_id(graph, f"noodle_negative_{sampler}_join")
        graph[join_id] = {"class_type": "ConditioningConcat",
                          "inputs": {"conditioning_to": list(inputs["negative"]), "conditioning_from": [encode_id, 0]}}
        inputs["negative"] = [join_id, 0]
    return graph


def _free_id(graph: dict[str, Any], wanted: str) -> str:
    candidate, n = wanted, 1
    while candidate in graph:
        n += 1
        candidate = f"{wanted}_{n}"
    return candidate
