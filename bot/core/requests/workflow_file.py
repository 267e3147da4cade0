"""An uploaded workflow file before it is queued: read, parsed, checked, its outputs renamed, its seeds found;
and ComfyUI's validation body summarised one line per node for the person who uploaded it.

Plain functions over ComfyUI's API format (`{"<id>": {"class_type": ..., "inputs": {...}}}`), no I/O
except `read_workflow_file`; bot/core/services/workflows.py strings them together for /workflow and its 🔁.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.core.cards.card import truncate
from bot.core.errors import RequestInvalid
from bot.core.requests.uploads import local_path, read_capped
from bot.core.storage.records import Generation
from engine.cost import LIMIT_EXCEEDED
from engine.nodes import catalog
from engine.input_folder import INPUT_FOLDERS
from engine.nodes.base import SEED_MAX

__all__ = ["SEED_INPUTS", "SOURCE", "UploadRead", "check_size", "checkpoints_of", "is_workflow", "node_lines",
           "parse_workflow", "read_workflow_file", "refuse_blocked", "reseed", "seeds_of", "summarise",
           "upload_refused", "uploads_read", "with_outputs"]

SOURCE = "workflow"  # params["source"] of a /workflow result and of its rerolls
SEED_INPUTS = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed"}  # what 🔁 changes
EXPORT_HINT = "in ComfyUI export it with Save (API Format) (Workflow → Export (API) in newer versions)"
# a refusal lists this many nodes, each line cut to this length: a Discord reply holds 2000 characters
SHOWN_NODES, LINE_CHARS, SHOWN_CHOICES = 12, 300, 8
# why a blocked node type is blocked, for the ones whose reason we know
REASONS = {"CheckpointSave": "it writes a multi-GB checkpoint file on the bot's machine",
           "SaveLatent": "it writes a file on the bot's machine that is never posted or removed"}
# The longest integer a workflow may hold: a KSampler seed reaches 2**64 - 1, 20 digits, and no input takes more.
# Python's json refuses past 4,300 digits with a ValueError of its own, which escaped as a crash (issue 12).
MAX_INT_DIGITS = len(str(SEED_MAX))


class _LongInteger(ValueError):
    """An integer in the JSON longer than MAX_INT_DIGITS, raised from inside json.loads."""

    def __init__(self, digits: str) -> None:
        super().__init__(f"an integer of {len(digits)} digits")
        self.digits = digits


def _bounded_int(digits: str) -> int:
    """json's parse_int: refuse before converting, so no length of digits costs more than a glance."""
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _LongInteger(digits)
    return int(digits)


def is_workflow(generation: Generation) -> bool:
    """A result of /workflow (or a reroll of one), rather than of /imagine's template."""
    return generation.params.get("source") == SOURCE


def check_size(filename: str, size: int, limit: int) -> None:
    """Refuse a file by its size alone: Discord's attachment metadata, a file's stat, or the bytes."""
    if size > limit:
        raise RequestInvalid(f"workflow: {filename!r} is {size / 1024:,.1f} KiB; the limit is {limit / 1024:,.1f} KiB "
                             "([limits] max_workflow_bytes in config.toml). An API-format export is a few KiB: "
                             f"{EXPORT_HINT}")


def read_workflow_file(path_text: str, limit: int) -> tuple[bytes, str]:
    """A local workflow file's bytes and name (`noodle chat`), its size checked before it is read."""
    if not path_text.strip():
        raise RequestInvalid("write /workflow PATH, e.g. /workflow my-graph.json (a ComfyUI API-format export)")
    wanted = "a ComfyUI API-format .json file"
    path = local_path(path_text, "workflow", wanted)
    try:
        check_size(path.name, path.stat().st_size, limit)
        data = read_capped(path, limit)
        check_size(path.name, len(data), limit)  # a file that grew, or a device whose stat() size says nothing
        return data, path.name
    except OSError as err:
        raise RequestInvalid(f"workflow: cannot read {path} ({err.strerror}); give the path of {wanted}") from None


def parse_workflow(data: bytes, filename: str) -> dict[str, Any]:
    """The API-format workflow in `data`; ComfyUI's UI format and anything else that is no workflow are refused.

    `{"prompt": {...}, "client_id": ...}` (the body of ComfyUI's POST /prompt) is unwrapped. Malformed
    nodes are left for validation, which names them.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RequestInvalid(f"workflow: {filename!r} is not UTF-8 text (byte {err.start} is not); attach the .json "
                             f"file itself: {EXPORT_HINT}") from None
    try:
        parsed = json.loads(text, parse_int=_bounded_int)
    except _LongInteger as err:
        raise RequestInvalid(f"workflow: {filename!r} holds an integer of {len(err.digits.lstrip('-')):,} digits"
                             f"{_where(text, err.digits)}; no input takes more than {MAX_INT_DIGITS} (a seed goes up "
                             f"to {SEED_MAX}): fix that value and attach the file again") from None
    except json.JSONDecodeError as err:
        raise RequestInvalid(f"workflow: {filename!r} is not valid JSON: {err.msg} at line {err.lineno}, column "
                             f"{err.colno}; {EXPORT_HINT}") from None
    except RecursionError:
        raise RequestInvalid(f"workflow: {filename!r} nests too deeply to be a workflow; {EXPORT_HINT}") from None
    if isinstance(parsed, dict) and isinstance(parsed.get("nodes"), list) and "links" in parsed:
        raise RequestInvalid(f"workflow: {filename!r} is ComfyUI's UI format (the \"nodes\" and \"links\" that Save "
                             f"writes); /workflow runs the API format: {EXPORT_HINT} and attach that file")
    if isinstance(parsed, dict) and isinstance(parsed.get("prompt"), dict) and "class_type" not in parsed["prompt"]:
        parsed = parsed["prompt"]
    if not isinstance(parsed, dict):
        raise RequestInvalid(f"workflow: {filename!r} holds a JSON {type(parsed).__name__}, not a workflow; the API "
                             "format is an object of nodes, {\"3\": {\"class_type\": \"KSampler\", \"inputs\": "
                             f"{{...}}}}, ...}}: {EXPORT_HINT}")
    return parsed


def _where(text: str, digits: str) -> str:
    """` at line L, column C` of a JSON number (a value: after `:`, `[` or `,`), or "" if it cannot be found."""
    found = re.search(r"[:\[,]\s*(" + re.escape(digits) + r")(?![0-9.eE])", text)
    if found is None:
        return ""
    start = found.start(1)
    line, column = text.count("\n", 0, start) + 1, start - text.rfind("\n", 0, start)
    return f" at line {line}, column {column}"


def _nodes(workflow: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    """The well-formed nodes (validation reports the others)."""
    return ((str(node_id), node) for node_id, node in workflow.items() if isinstance(node, dict))


def refuse_blocked(workflow: dict[str, Any], filename: str, blocked: Iterable[str]) -> None:
    """Refuse node types this bot does not run for chat users ([bot] workflow_blocked_nodes)."""
    names = set(blocked)
    found = [(node_id, str(node.get("class_type"))) for node_id, node in _nodes(workflow)
             if node.get("class_type") in names]
    if found:
        listed = "; ".join(f"node {node_id} ({kind})" + (f": {REASONS[kind]}" if kind in REASONS else "")
                           for node_id, kind in found)
        raise RequestInvalid(f"workflow: {filename!r} uses node types this bot does not run from chat ([bot] "
                             f"workflow_blocked_nodes in config.toml): {listed}. Take them out, or run the workflow "
                             "in ComfyUI")


@dataclass(frozen=True)
class UploadRead:
    """A node input of a workflow that names a file among the bot's uploads."""

    node_id: str
    class_type: str
    given: str  # the name as the workflow spells it
    name: str  # the same file as the store records uploads: relative to the input folder, "/"-separated


def uploads_read(workflow: dict[str, Any], input_dir: Path, uploads_folder: str) -> list[UploadRead]:
    """The inputs that load a file from the bot's uploads ([bot] uploads_folder inside the input folder).

    Those are members' /imagine attachments, seen only by the member who sent them (their command is answered
    privately), but named by their content on every result's ℹ️ and in its PNG: a LoadImage of that name feeding
    a SaveImage would post another member's picture, so /workflow lets a member load only their own. Any input
    that names an input-folder file counts, with the name resolved as the engine resolves it (so
    "x/../noodle-uploads/..." and links count too), compared without case (a case-insensitive disk reads
    "NOODLE-UPLOADS" as the same folder).
    """
    root = input_dir.resolve()
    uploads = str((root / uploads_folder).resolve()).casefold()
    found = []
    for node_id, node in _nodes(workflow):
        cls = catalog().get(str(node.get("class_type")))
        inputs = node.get("inputs")
        if cls is None or not isinstance(inputs, dict):
            continue
        for spec in cls.input_specs():
            given = inputs.get(spec.name)
            if spec.choices_from not in INPUT_FOLDERS or not isinstance(given, str):
                continue
            try:
                target = (root / given.replace("\\", "/")).resolve()
            except (OSError, ValueError):  # a NUL in the name, a loop of links: the engine refuses it by name
                continue
            folded = str(target).casefold()
            if folded == uploads or folded.startswith(uploads.rstrip(os.sep) + os.sep):
                relative = target.relative_to(root).as_posix() if target.is_relative_to(root) else given
                found.append(UploadRead(node_id, str(node.get("class_type")), given, relative))
    return found


def upload_refused(read: UploadRead, filename: str) -> RequestInvalid:
    """Why a workflow may not load another member's upload."""
    return RequestInvalid(f"workflow: {filename!r} node {read.node_id} ({read.class_type}) loads "
                          f"{truncate(read.given, 80)!r} from the bot's uploads ([bot] uploads_folder), which hold "
                          "members' /imagine attachments: a workflow may load only your own, and the images the owner "
                          "put in the input folder. To start from a picture of yours, use /imagine image:")


def with_outputs(workflow: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A copy whose images are written as new files under `prefix` (the results folder, a fresh random token).

    SaveImage is cached like any node (as in ComfyUI), so the same graph twice would hand back the first
    run's files, which a 🗑️ on that first result then removes: each run names its own. A PreviewImage
    becomes a SaveImage for the same reason (its temp name cannot be changed, so it cannot be made
    fresh), and because its images are posted and kept like any other result; so does a SaveImageWebsocket
    (an API client's way to get the pictures back over its socket: here they come back as posted files).
    """
    ready = copy.deepcopy(workflow)
    for node_id, node in _nodes(ready):
        if node.get("class_type") in ("PreviewImage", "SaveImageWebsocket"):
            node["class_type"] = "SaveImage"
        inputs = node.get("inputs")
        if node.get("class_type") == "SaveImage" and isinstance(inputs, dict):
            inputs["filename_prefix"] = f"{prefix}-{re.sub(r'[^A-Za-z0-9_-]', '_', node_id)[:24]}"
    return ready


def seeds_of(workflow: dict[str, Any]) -> dict[str, int]:
    """The constant seed of every KSampler (`seed`) and KSamplerAdvanced (`noise_seed`), by node id."""
    seeds = {}
    for node_id, node in _nodes(workflow):
        name = SEED_INPUTS.get(str(node.get("class_type")))
        inputs = node.get("inputs")
        if name and isinstance(inputs, dict):
            value = inputs.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                seeds[node_id] = value
    return seeds


def reseed(workflow: dict[str, Any], pick: Callable[[], int]) -> tuple[dict[str, Any], dict[str, int]]:
    """A copy with a new seed from `pick()` in every sampler whose seed is a constant; and those seeds."""
    fresh = copy.deepcopy(workflow)
    seeds = {}
    for node_id, node in _nodes(fresh):
        name = SEED_INPUTS.get(str(node.get("class_type")))
        inputs = node.get("inputs")
        # a seed linked from another node is that node's to give: it stays as it is
        if name and isinstance(inputs, dict) and not isinstance(inputs.get(name), list):
            inputs[name] = seeds[node_id] = pick()
    return fresh, seeds


def checkpoints_of(workflow: dict[str, Any]) -> list[str]:
    """The checkpoint files the workflow loads, in node order, each once."""
    names = [node["inputs"].get("ckpt_name") for _, node in _nodes(workflow)
             if node.get("class_type") == "CheckpointLoaderSimple" and isinstance(node.get("inputs"), dict)]
    return list(dict.fromkeys(name for name in names if isinstance(name, str)))


def summarise(body: dict[str, Any], filename: str) -> str:
    """ComfyUI's validation body as a person reads it: one line per node (`node 3 (KSampler): sampler_name: value
    not in list: 'foo' (allowed: euler, ...)`), or the prompt-level error when no node is to blame."""
    node_errors = body.get("node_errors") or {}
    error = body.get("error") or {}
    if node_errors:
        verdict = "asks more than this server allows" if error.get("type") == LIMIT_EXCEEDED else \
            "did not pass validation"
        return "\n".join([f"workflow: {filename!r} {verdict}:", *node_lines(node_errors)])
    message, details = str(error.get("message") or "invalid workflow"), str(error.get("details") or "")
    hint = ""  # an unknown node's details already say whose it is (engine/validate.py)
    if error.get("type") == "prompt_no_outputs":
        hint = "; add a SaveImage or PreviewImage node for the images to come back"
    text = f"{message} ({details})" if details else message
    return f"workflow: {filename!r} cannot run: {_one_line(text, LINE_CHARS * 2)}{hint}"


def node_lines(node_errors: dict[str, Any]) -> list[str]:
    """One line per node of ComfyUI's `node_errors`, at most SHOWN_NODES of them."""
    lines = []
    for node_id, info in list(node_errors.items())[:SHOWN_NODES]:
        problems = "; ".join(_problem(item, info.get("class_type")) for item in info.get("errors", [])) or "invalid"
        lines.append(_one_line(f"node {node_id} ({info.get('class_type')}): {problems}", LINE_CHARS))
    if len(node_errors) > SHOWN_NODES:
        lines.append(f"… and {len(node_errors) - SHOWN_NODES} more node(s)")
    return lines


def _one_line(text: str, limit: int) -> str:
    """`text` on one line (a node id or an exception may hold line breaks), cut to `limit`."""
    return truncate(" ".join(text.split()), limit)


def _problem(item: dict[str, Any], class_type: Any = None) -> str:
    """One ComfyUI error item in a few words, led by the input it is about."""
    kind, info = item.get("type"), item.get("extra_info") or {}
    message, details = str(item.get("message", "")), str(item.get("details", ""))
    name = info.get("input_name")
    lowered = message[:1].lower() + message[1:]
    if kind == "value_not_in_list" and name == "image":
        # LoadImage's choices are the input folder: other people's uploads. Never list them to a stranger.
        return f"image: {info.get('received_value')!r} is not in Noodle's input folder (an uploaded workflow cannot " \
               "bring images; use /imagine image: for image-to-image)"
    if kind == "value_not_in_list":
        return f"{name}: value not in list: {info.get('received_value')!r} ({_allowed(info, details, class_type)})"
    if kind == "required_input_missing":
        return f"{name}: required input is missing"
    if kind in ("value_smaller_than_min", "value_bigger_than_max"):
        return f"{name}: {lowered}"
    if kind == "invalid_input_type":
        return f"{name}: {lowered} ({info.get('exception_message')})"
    if kind == "return_type_mismatch":
        expected = (info.get("input_config") or ["?"])[0]
        return f"{name}: linked to a {info.get('received_type')} output; it takes {expected}"
    if kind == "bad_linked_input":
        return f"{name}: {lowered} (got {info.get('received_value')!r})"
    if kind == "custom_validation_failed":
        return details.replace(" - ", ": ", 1)
    if kind == LIMIT_EXCEEDED:  # the cost of the whole graph, said in full by engine/cost/
        return details
    if kind in ("exception_during_validation", "exception_during_inner_validation"):
        return details or lowered
    return f"{lowered}: {details}" if details else lowered


def _fixed_choices(class_type: Any, name: Any) -> list[str] | None:
    """A node input's fixed choice list (KSampler's 42 samplers), not a folder listing; None for anything else."""
    cls = catalog().get(str(class_type))
    spec = next((spec for spec in cls.input_specs() if spec.name == name), None) if cls is not None else None
    return list(spec.choices) if spec is not None and spec.choices and not spec.choices_from else None


def _allowed(info: dict[str, Any], details: str, class_type: Any = None) -> str:
    """The choices of a COMBO, the closest first when there are many."""
    config = info.get("input_config")
    options = config[0] if isinstance(config, list) and config and isinstance(config[0], list) else None
    if options is None:  # past 20 choices ComfyUI leaves the list out of the body: a fixed one is ours to say
        options = _fixed_choices(class_type, info.get("input_name"))
    if options is None:  # ComfyUI leaves long lists (a big models folder) out of the body
        return "not one of its choices; /models lists the model files" if "list of length" in details else details
    if not options:
        return "nothing to choose from: the folder is empty"
    names = [str(option) for option in options]
    if len(names) <= SHOWN_CHOICES:
        return f"allowed: {', '.join(names)}"
    close = difflib.get_close_matches(str(info.get("received_value")), names, n=3, cutoff=0.3)
    if close:
        return f"closest: {', '.join(close)}; {len(names)} choices in all"
    return f"allowed: {', '.join(names[:SHOWN_CHOICES])}, … ({len(names)} in all)"
