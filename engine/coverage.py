"""`noodle coverage`: would a shared ComfyUI workflow run here, and if not, what blocks it.

Reads API-format JSON, ComfyUI's POST /prompt body (`{"prompt": {...}, "client_id": ...}`) and PNGs whose
`prompt` text chunk holds the API workflow (what ComfyUI writes into every image it saves); a UI-format file
(`"nodes"` and `"links"`) is reported as such, since it needs ComfyUI's frontend to become a prompt. Per workflow
it lists the node types Noodle lacks (a ComfyUI built-in, one of ComfyUI's API nodes, or a custom node pack's,
from engine/data/comfyui_nodes.json), the sampler and scheduler names Noodle does not run
(engine/samplers/names.py), and the model folders those missing nodes load from that Noodle has none of
(controlnet, upscale_models, clip_vision ...). A workflow with none of those is validated as the executor would
(engine/validate.py), with every model and image name it gives taken as present: coverage judges the graph, not
what this machine's models folder holds; a prompt missing inputs that have defaults is named as an export older
than ComfyUI's current nodes (ComfyUI refuses it too). Workflows for other model families (Flux, SD3, Stable
Cascade, video ...: by their nodes, or a checkpoint named for one) are told apart, and the summary gives the share
of SD1.x / SD2.x / SDXL workflows of built-in nodes that would run.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.data import comfyui_node
from engine.errors import WorkflowInvalid
from engine.models.detect import PICKLE_SUFFIXES
from engine.models.paths import FOLDERS
from engine.nodes.base import Node
from engine.pngmeta import read_png_texts
from engine.samplers.names import SAMPLER_NAMES, SCHEDULER_NAMES, SUPPORTED_SAMPLERS
from engine.settings import Limits
from engine.validate import UI_ONLY_NODES, validate

__all__ = ["Verdict", "find_workflows", "judge_file", "judge_workflow", "other_family_nodes", "read_workflow",
           "summary"]

Kind = Literal["api", "ui", "unreadable"]
WORKFLOW_SUFFIXES = (".json", ".png")
UI_HINT = "in ComfyUI export it with Workflow > Export (API) (Save (API Format) in older versions)"
# ComfyUI's modules whose nodes serve only model families other than SD1.x / SD2.x / SDXL (DiT image models,
# video, audio, 3D), the nodes of mixed modules that do, and the model folders only those families load from.
_OTHER_FAMILY_SOURCES = frozenset(f"comfy_extras/nodes_{name}.py" for name in (
    "ace", "audio", "audio_encoder", "camera_trajectory", "chroma_radiance", "cosmos", "edit_model", "flux",
    "hidream", "hunyuan", "hunyuan3d", "load_3d", "lt", "lumina2", "mochi", "model_patch", "pixart", "qwen", "sd3",
    "slg", "stable3d", "stable_cascade", "video_model", "wan"))
_OTHER_FAMILY_NODES = frozenset({"ModelSamplingSD3", "ModelSamplingFlux", "ModelSamplingAuraFlow",
                                 "ModelSamplingStableCascade", "T5TokenizerOptions", "SkipLayerGuidanceSD3"})
_OTHER_FAMILY_FOLDERS = frozenset({"diffusion_models", "text_encoders"})  # UNETLoader, CLIPLoader and kin
# Checkpoint names of those families: AuraFlow and Hunyuan-DiT examples load through SD's own nodes
_OTHER_FAMILY_NAMES = re.compile(r"aura_?flow|hunyuan|flux|sd3|stable_cascade|stable_video|\bsvd|ltx|mochi|cosmos|"
                                 r"lumina|hidream|chroma|qwen|omnigen|wan2|kolors|pixart|zero123|stable_audio", re.I)


@dataclass(frozen=True)
class Verdict:
    """What `noodle coverage` found for one file."""

    path: Path
    kind: Kind
    reason: str = ""  # why a file is not an API workflow (ui, unreadable)
    missing: Mapping[str, str] = field(default_factory=dict)  # class_type -> builtin | api | custom | ui-only
    samplers: tuple[str, ...] = ()  # "sampler dpmpp_3m_sde", "scheduler align_your_steps"
    model_kinds: tuple[str, ...] = ()  # model folders the missing nodes load from that Noodle lacks
    problems: tuple[str, ...] = ()  # validation errors once every node type is known
    notes: tuple[str, ...] = ()  # what does not block the run but is worth knowing (pickle names)
    other_family: tuple[str, ...] = ()  # the nodes, or checkpoint names, of another model family than SD

    @property
    def sd_family(self) -> bool:
        """An API workflow for SD1.x / SD2.x / SDXL: no node of another model family (Flux, SD3, video ...)."""
        return self.kind == "api" and not self.other_family

    @property
    def runs(self) -> bool:
        """An API workflow with nothing in its way."""
        return self.kind == "api" and not (self.missing or self.samplers or self.model_kinds or self.problems)

    @property
    def builtin_only(self) -> bool:
        """An API workflow that uses only stock ComfyUI nodes (custom nodes and API nodes aside)."""
        return self.kind == "api" and all(origin == "builtin" for origin in self.missing.values())

    def blockers(self) -> list[str]:
        """What keeps it from running, one phrase per kind of problem."""
        parts = []
        for origin, label in (("builtin", "ComfyUI built-in nodes Noodle lacks"),
                              ("custom", "custom nodes (not part of ComfyUI)"), ("api", "ComfyUI API nodes"),
                              ("ui-only", "UI-only entries (export the workflow with Workflow > Export (API))")):
            names = sorted(name for name, o in self.missing.items() if o == origin)
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        if self.samplers:
            parts.append(f"not supported: {', '.join(self.samplers)}")
        if self.model_kinds:
            parts.append(f"model kinds Noodle has no folder for: {', '.join(self.model_kinds)}")
        parts += self.problems
        return parts

    def line(self) -> str:
        """One line for the terminal."""
        if self.kind != "api":
            lacks = f"; {'; '.join(self.blockers())}" if self.missing else ""
            return f"{self.kind:<10} {self.path}: {self.reason}{lacks}"
        if self.runs:
            notes = f" ({'; '.join(self.notes)})" if self.notes else ""
            return f"{'runs':<10} {self.path}{notes}"
        return f"{'blocked':<10} {self.path}: {'; '.join(self.blockers())}"

    def to_dict(self) -> dict[str, Any]:
        """The same as JSON (`noodle coverage --json`)."""
        return {"path": str(self.path), "kind": self.kind, "runs": self.runs, "reason": self.reason,
                "missing_nodes": dict(self.missing), "samplers": list(self.samplers),
                "model_kinds": list(self.model_kinds), "problems": list(self.problems), "notes": list(self.notes),
                "other_family": list(self.other_family)}


def read_workflow(path: Path) -> tuple[Kind, Any, str]:
    """(kind, what was read, why it is not an API workflow) for one JSON or PNG file: ("api", the prompt, ""),
    ("ui", the UI graph or None, reason) or ("unreadable", None, reason)."""
    try:
        if path.suffix.lower() == ".png":
            texts = read_png_texts(path)
            if "prompt" in texts:
                data: Any = json.loads(texts["prompt"])
            elif "workflow" in texts:
                reason = f"the PNG carries only ComfyUI's UI workflow, no API prompt; {UI_HINT}"
                return "ui", _json_or_none(texts["workflow"]), reason
            elif "parameters" in texts:
                return "unreadable", None, "an A1111 image (a `parameters` text), not a ComfyUI workflow"
            else:
                return "unreadable", None, "the PNG carries no workflow (no `prompt` text chunk)"
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, SyntaxError, RecursionError) as err:  # PIL: SyntaxError on a broken PNG
        return "unreadable", None, f"cannot read it ({type(err).__name__}: {err})"
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        return "ui", data, f"ComfyUI's UI format (\"nodes\" and \"links\"), not the API format; {UI_HINT}"
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]  # the body of ComfyUI's POST /prompt
    if not isinstance(data, dict) or not data or not all(isinstance(node, dict) and "class_type" in node
                                                          for node in data.values()):
        return "unreadable", None, "not a ComfyUI API workflow ({\"<id>\": {\"class_type\": ..., \"inputs\": ...}})"
    return "api", data, ""


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _ui_node_types(graph: Any) -> list[str]:
    """The node types of a UI-format graph that would reach an API prompt: muted (mode 2) and bypassed (mode 4)
    nodes and the frontend's own helpers (reroutes, notes, primitives) never do."""
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        return []
    return [str(node["type"]) for node in graph["nodes"]
            if isinstance(node, dict) and "type" in node and node.get("mode", 0) not in (2, 4)
            and node["type"] not in UI_ONLY_NODES]


def _origin(class_type: str) -> str:
    if class_type in UI_ONLY_NODES:  # the ComfyUI editor's own entries: an API export never holds them
        return "ui-only"
    known = comfyui_node(class_type)
    return "custom" if known is None else known.kind


def other_family_nodes(class_types: Iterable[str]) -> tuple[str, ...]:
    """The stock ComfyUI nodes among `class_types` that only model families other than SD1.x / SD2.x / SDXL use
    (EmptySD3LatentImage, FluxGuidance, UNETLoader ...), sorted."""
    found = set()
    for class_type in class_types:
        known = comfyui_node(class_type)
        if known is not None and (known.source in _OTHER_FAMILY_SOURCES or class_type in _OTHER_FAMILY_NODES
                                  or _OTHER_FAMILY_FOLDERS & set(known.folders)):
            found.add(class_type)
    return tuple(sorted(found))


def _constants(workflow: Mapping[str, Any]) -> list[str]:
    return [value for node in workflow.values() if isinstance(node.get("inputs"), dict)
            for value in node["inputs"].values() if isinstance(value, str)]


def judge_workflow(path: Path, workflow: Mapping[str, Any], registry: Mapping[str, type[Node]],
                   limits: Limits) -> Verdict:
    """The verdict on one API workflow."""
    missing: dict[str, str] = {}
    samplers: list[str] = []
    kinds: set[str] = set()
    notes: list[str] = []
    for node in workflow.values():
        class_type = str(node.get("class_type"))
        known = comfyui_node(class_type)
        if class_type not in registry:
            missing[class_type] = _origin(class_type)
            if known is not None:
                kinds.update(folder for folder in known.folders if folder not in FOLDERS)
        inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
        if known is None and class_type not in registry:
            continue  # a custom node's sampler inputs may use names of its own
        sampler, scheduler = inputs.get("sampler_name"), inputs.get("scheduler")
        if isinstance(sampler, str) and sampler not in SUPPORTED_SAMPLERS:
            samplers.append(f"sampler {sampler}" + ("" if sampler in SAMPLER_NAMES else " (not ComfyUI's)"))
        if isinstance(scheduler, str) and scheduler not in SCHEDULER_NAMES:
            samplers.append(f"scheduler {scheduler}")
        for value in inputs.values():
            if isinstance(value, str) and value.lower().endswith(PICKLE_SUFFIXES):
                notes.append(f"{value} needs its .safetensors beside it")
    problems: list[str] = []
    if not missing and not samplers:
        names = _constants(workflow)  # every name the workflow gives is taken as a file that is there
        try:
            checked = validate(dict(workflow), registry, lambda folder: names, limits)
        except WorkflowInvalid as err:
            problems = [line for line in str(err).splitlines() if line.strip()] + _stale_export(err.body, registry)
        else:
            if checked.partial_errors:  # ComfyUI runs the outputs that pass: so would Noodle
                notes.append(f"outputs that fail validation are skipped (nodes {', '.join(checked.partial_errors)})")
    return Verdict(path, "api", missing=missing, samplers=tuple(dict.fromkeys(samplers)),
                   model_kinds=tuple(sorted(kinds)), problems=tuple(problems), notes=tuple(dict.fromkeys(notes)),
                   other_family=_other_family(workflow))


def _other_family(workflow: Mapping[str, Any]) -> tuple[str, ...]:
    """What makes a workflow one for another model family than SD: its nodes, then its checkpoint names."""
    checkpoints = {node["inputs"].get("ckpt_name") for node in workflow.values()
                   if isinstance(node.get("inputs"), dict)}
    named = sorted(f"checkpoint {name}" for name in checkpoints
                   if isinstance(name, str) and _OTHER_FAMILY_NAMES.search(name))
    return other_family_nodes(str(node.get("class_type")) for node in workflow.values()) + tuple(named)


def _stale_export(body: Mapping[str, Any], registry: Mapping[str, type[Node]]) -> list[str]:
    """Why a prompt misses widget inputs that have defaults: it was exported before ComfyUI added them, and ComfyUI
    refuses it too (its editor fills such inputs in when it loads the file's UI graph)."""
    added = []
    for entry in body.get("node_errors", {}).values():
        cls = registry.get(str(entry.get("class_type")))
        if cls is None:
            continue
        specs = {spec.name: spec for spec in cls.input_specs()}
        for error in entry.get("errors", ()):
            spec = specs.get(str(error.get("extra_info", {}).get("input_name")))
            if error.get("type") == "required_input_missing" and spec is not None and spec.default is not None:
                added.append(f"{cls.__name__}'s {spec.name} (default {spec.default!r})")
    if not added:
        return []
    return [f"probably exported before ComfyUI added {', '.join(dict.fromkeys(added))}: ComfyUI refuses this "
            "prompt too; open the file in ComfyUI's editor, which fills in the defaults, and export it again"]


def judge_file(path: Path, registry: Mapping[str, type[Node]], limits: Limits) -> Verdict:
    """Read one file and judge the workflow in it."""
    kind, found, reason = read_workflow(path)
    if kind == "ui":
        # what the export would need: the graph's node types alone (its widget values are not named in the UI format)
        missing = {name: _origin(name) for name in _ui_node_types(found) if name not in registry}
        known = "its nodes are all ones Noodle runs" if found is not None and not missing else ""
        return Verdict(path, kind, reason="; ".join(filter(None, (reason, known))), missing=missing)
    if kind != "api":
        return Verdict(path, kind, reason=reason)
    return judge_workflow(path, found, registry, limits)


def find_workflows(paths: Iterable[Path]) -> list[Path]:
    """The files to judge: each file given, and the .json and .png files under each folder given (sorted)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in WORKFLOW_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            found.append(path)
    return found


def summary(verdicts: list[Verdict], *, top: int = 10) -> list[str]:
    """The closing lines: how many would run, of all API workflows and of those using only built-in nodes, and
    what blocks the rest most often."""
    api = [v for v in verdicts if v.kind == "api"]
    runs = [v for v in api if v.runs]
    builtin = [v for v in api if v.builtin_only]
    builtin_runs = [v for v in builtin if v.runs]

    def share(part: int, whole: int) -> str:
        return f"{part} of {whole} ({100 * part / whole:.0f}%)" if whole else f"{part} of 0"

    ui = sum(v.kind == "ui" for v in verdicts)
    unreadable = sum(v.kind == "unreadable" for v in verdicts)
    lines = [f"{len(verdicts)} files: {len(api)} API workflows, {ui} UI-format, {unreadable} unreadable",
             f"would run here: {share(len(runs), len(api))} API workflows; "
             f"{share(len(builtin_runs), len(builtin))} of those using only ComfyUI's built-in nodes"]
    if ui:
        known = sum(v.kind == "ui" and not v.missing for v in verdicts)
        lines.append(f"UI-format files whose node types Noodle all runs: {share(known, ui)} "
                     "(exported as API workflows, those may run)")
    nodes = Counter(name for v in api for name, origin in v.missing.items() if origin == "builtin")
    if nodes:
        lines.append("built-in nodes most missed (workflows): "
                     + ", ".join(f"{name} ({count})" for name, count in nodes.most_common(top)))
    custom = Counter(name for v in api for name, origin in v.missing.items() if origin != "builtin")
    if custom:
        lines.append("custom and API nodes seen (workflows): "
                     + ", ".join(f"{name} ({count})" for name, count in custom.most_common(top)))
    samplers = Counter(name for v in api for name in v.samplers)
    if samplers:
        lines.append("samplers/schedulers not supported (workflows): "
                     + ", ".join(f"{name} ({count})" for name, count in samplers.most_common(top)))
    sd = [v for v in builtin if v.sd_family]
    if len(sd) != len(builtin):  # Flux, SD3, video ... workflows of built-in nodes aside: what Noodle is for
        lines.append(f"for SD1.x / SD2.x / SDXL: {share(sum(v.runs for v in sd), len(sd))} of the workflows using "
                     "only built-in nodes would run here")
    return lines
