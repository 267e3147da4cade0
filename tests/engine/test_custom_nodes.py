"""A node Noodle lacks is named: ComfyUI's `invalid_prompt` body, with details saying whether it is a ComfyUI
built-in Noodle does not run yet, one of ComfyUI's API nodes, or a custom node pack's; the list comes from
ComfyUI 0.3.64's source (engine/data/comfyui_nodes.json, written by engine/data/extract_comfy_nodes.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from engine.data import COMFYUI_VERSION, comfyui_node, comfyui_nodes
from engine.data.extract_comfy_nodes import extract
from engine.errors import WorkflowInvalid
from engine.nodes import catalog
from engine.settings import Limits
from engine.validate import validate

REPO = Path(__file__).resolve().parents[2]
TXT2IMG: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
    "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["4", 2]}},
    "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
}


def refused(workflow: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(WorkflowInvalid) as err:
        validate(workflow, catalog(), lambda folder: ["tiny-sd15.safetensors"], Limits())
    return err.value.body


def with_node(class_type: str) -> dict[str, Any]:
    return {**TXT2IMG, "12": {"class_type": class_type, "inputs": {"conditioning": ["4", 1]}}}


def test_a_builtin_noodle_lacks_gets_comfyuis_error_and_says_it_is_built_in() -> None:
    body = refused(with_node("StableCascade_StageB_Conditioning"))
    error = body["error"]
    assert error["type"] == "invalid_prompt"
    assert error["message"] == "Cannot execute because node StableCascade_StageB_Conditioning does not exist."
    assert error["details"] == ("Node ID '#12': StableCascade_StageB_Conditioning is a ComfyUI built-in node "
                                "(conditioning/stable_cascade) that Noodle does not run yet "
                                "(`noodle nodes` lists those it runs)")
    assert error["extra_info"] == {} and body["node_errors"] == {}  # ComfyUI's body, word for word up to details


def test_a_custom_node_is_named_as_one_with_nothing_to_install() -> None:
    error = refused(with_node("UltimateSDUpscale"))["error"]
    assert error["message"] == "Cannot execute because node UltimateSDUpscale does not exist."
    assert error["details"].startswith("Node ID '#12': UltimateSDUpscale is not part of ComfyUI: it comes from a "
                                       "custom node pack")
    assert "Noodle runs only ComfyUI's built-in nodes" in error["details"]
    assert "nothing to install" in error["details"]


def test_an_api_node_says_it_needs_a_paid_service() -> None:
    api = next(name for name, node in comfyui_nodes().items() if node.kind == "api")
    error = refused(with_node(api))["error"]
    assert error["type"] == "invalid_prompt"
    assert f"{api} is one of ComfyUI's API nodes" in error["details"] and "paid online service" in error["details"]


def test_the_message_people_see_names_the_node_and_its_origin() -> None:
    with pytest.raises(WorkflowInvalid) as err:
        validate(with_node("ControlNetApplyAdvanced-NotReally"), catalog(), lambda f: [], Limits())
    assert "ControlNetApplyAdvanced-NotReally is not part of ComfyUI" in str(err.value)


def test_the_list_is_comfyuis_own_and_holds_every_node_noodle_runs() -> None:
    nodes = comfyui_nodes()
    builtin = {name for name, node in nodes.items() if node.kind == "builtin"}
    assert COMFYUI_VERSION == "0.3.64"
    assert {"KSampler", "ControlNetApplyAdvanced", "UpscaleModelLoader", "GrowMask", "SamplerCustom"} <= builtin
    assert set(catalog()) <= builtin  # Noodle runs ComfyUI's built-in nodes and nothing else
    assert comfyui_node("ControlNetLoader").folders == ("controlnet",)  # type: ignore[union-attr]
    assert comfyui_node("UltimateSDUpscale") is None
    assert list(nodes) == sorted(builtin) + sorted(set(nodes) - builtin)  # sorted in the file, built-ins first


def test_the_list_ships_with_the_package() -> None:
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "data/*.json" in package_data["engine"]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_the_extractor_reads_mappings_and_schemas_from_a_comfyui_tree(tmp_path: Path) -> None:
    repo = tmp_path / "ComfyUI"
    (repo / "comfy_extras").mkdir(parents=True)
    (repo / "comfy_api_nodes").mkdir()
    (repo / "nodes.py").write_text(
        "class Base:\n    CATEGORY = 'loaders'\n"
        "class LoaderA(Base):\n"
        "    def INPUT_TYPES(s):\n        return {'required': {'n': (folder_paths.get_filename_list('controlnet'),)}}\n"
        "NODE_CLASS_MAPPINGS = {'LoaderA': LoaderA}\n"
        "async def init_builtin_extra_nodes():\n    extras_files = ['nodes_new.py']\n"
        "async def init_builtin_api_nodes():\n    api_nodes_files = ['nodes_paid.py']\n")
    (repo / "comfy_extras" / "nodes_new.py").write_text(
        "class NewNode(io.ComfyNode):\n    @classmethod\n    def define_schema(cls):\n"
        "        return io.Schema(node_id='NewNode', category='mask')\n")
    (repo / "comfy_extras" / "nodes_unloaded.py").write_text("NODE_CLASS_MAPPINGS = {'NotLoaded': object}\n")
    (repo / "comfy_api_nodes" / "nodes_paid.py").write_text(
        "class Paid(io.ComfyNode):\n    def define_schema(cls):\n        return io.Schema(node_id='PaidNode')\n")
    (repo / "comfyui_version.py").write_text('__version__ = "9.9.9"\n')
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tree")
    data = extract(repo / ".git")
    assert data["comfyui_version"] == "9.9.9"
    assert data["builtin"] == {
        "LoaderA": {"category": "loaders", "folders": ["controlnet"], "source": "nodes.py"},
        "NewNode": {"category": "mask", "folders": [], "source": "comfy_extras/nodes_new.py"},
    }
    assert list(data["api"]) == ["PaidNode"]  # type: ignore[arg-type]


def test_the_committed_list_is_what_the_extractor_writes() -> None:
    """Round trip of the file's format: the committed JSON reads back into the same entries it dumps."""
    from engine.data.extract_comfy_nodes import DEFAULT_OUT, dumps

    committed = DEFAULT_OUT.read_text(encoding="utf-8")
    assert dumps(json.loads(committed)) == committed
    assert subprocess.run([sys.executable, str(REPO / "engine/data/extract_comfy_nodes.py"), "--help"],
                          capture_output=True, text=True).returncode == 0
