"""UI-only entries of ComfyUI's editor (Note, MarkdownNote, PrimitiveNode, Reroute) never appear in an API export;
a submitted prompt holding one is refused with ComfyUI's error for an unknown node, and the details say what the
entry is and how to export the API format."""

from __future__ import annotations

from typing import Any

import pytest

from engine.errors import WorkflowInvalid
from engine.nodes import catalog
from engine.settings import Limits
from engine.validate import UI_ONLY_NODES, validate

TXT2IMG: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
    "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["4", 2]}},
    "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
}
# what the editor's graph holds for each (an API export has none of them)
UI_ENTRIES: dict[str, dict[str, Any]] = {
    "Note": {"text": "remember to raise the steps"},
    "MarkdownNote": {"text": "# Settings\nuse **euler**"},
    "PrimitiveNode": {"value": 42},
    "Reroute": {"": ["4", 0]},
}


def refused(workflow: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(WorkflowInvalid) as err:
        validate(workflow, catalog(), lambda folder: ["tiny-sd15.safetensors"], Limits())
    return err.value.body


def test_the_list_is_comfyuis_frontend_only_types_and_noodle_runs_none_of_them() -> None:
    assert UI_ONLY_NODES == set(UI_ENTRIES)
    assert not UI_ONLY_NODES & set(catalog())


@pytest.mark.parametrize("class_type", sorted(UI_ENTRIES))
def test_a_ui_only_entry_is_refused_with_the_export_hint(class_type: str) -> None:
    body = refused({**TXT2IMG, "12": {"class_type": class_type, "inputs": UI_ENTRIES[class_type]}})
    error = body["error"]
    # ComfyUI's type and message for a node it does not know, word for word
    assert error["type"] == "invalid_prompt"
    assert error["message"] == f"Cannot execute because node {class_type} does not exist."
    assert body["node_errors"] == {} and error["extra_info"] == {}
    details = error["details"]
    assert details.startswith(f"Node ID '#12': {class_type} is a UI-only entry of ComfyUI's editor")
    assert "do not appear in an API export" in details
    assert "Workflow > Export (API)" in details
    # not mistaken for a custom node pack's node or a built-in Noodle lacks
    assert "custom node pack" not in details and "does not run yet" not in details


def test_a_ui_only_entry_is_refused_even_when_nothing_links_to_it() -> None:
    # a Note is never linked; ComfyUI checks every node's class first, and so does Noodle
    body = refused({"1": {"class_type": "Note", "inputs": {"text": "hi"}}, **TXT2IMG})
    assert body["error"]["details"].startswith("Node ID '#1': Note is a UI-only entry")
