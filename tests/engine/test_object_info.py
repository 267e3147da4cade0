"""`noodle nodes`: the node catalog in the shape of ComfyUI 0.3.64's `/object_info` (server.py `node_info`).

The expected entries below are ComfyUI's own for these nodes (nodes.py INPUT_TYPES, RETURN_TYPES, CATEGORY,
OUTPUT_NODE), less the "tooltip" options our nodes do not carry.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from engine.cli import add_engine_commands
from engine.models.manager import ModelManager
from engine.models.paths import ModelCatalog
from engine.nodes import catalog
from engine.object_info import object_info
from engine.settings import EngineSettings, Limits, ModelsSettings

NODE_KEYS = {"input", "input_order", "output", "output_is_list", "output_name", "name", "display_name",
             "description", "python_module", "category", "output_node", "deprecated", "experimental", "api_node"}
TINY_CHECKPOINTS = ["tiny-sd15-b.safetensors", "tiny-sd15-inpainting.safetensors", "tiny-sd15.safetensors",
                    "tiny-sd2-v.safetensors", "tiny-sdxl-inpainting.safetensors", "tiny-sdxl.safetensors"]


@pytest.fixture(scope="module")
def info(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    inputs = tmp_path_factory.mktemp("input")
    (inputs / "cat.png").write_bytes(b"")
    (inputs / "notes.txt").write_text("not an image")
    manager = ModelManager(ModelCatalog(tiny_models), device=torch.device("cpu"), dtype=torch.float32,
                           memory_budget=0, input_dir=inputs)
    return object_info(catalog(), manager.choices)


def test_ksampler_inputs_in_order_with_comfyui_types_and_ranges(info: dict) -> None:
    ksampler = info["KSampler"]
    required = ksampler["input"]["required"]
    assert list(required) == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                              "latent_image", "denoise"]
    assert ksampler["input_order"] == {"required": list(required)}
    assert required["model"] == ["MODEL"]
    assert required["seed"] == ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                        "control_after_generate": True}]
    assert required["steps"] == ["INT", {"default": 20, "min": 1, "max": 10000}]
    assert required["cfg"] == ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}]
    assert required["denoise"] == ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}]
    samplers, options = required["sampler_name"]
    assert "euler" in samplers and "dpmpp_2m" in samplers and options == {}
    assert required["scheduler"][0][:3] == ["simple", "sgm_uniform", "karras"]
    assert [required[name] for name in ("positive", "negative", "latent_image")] == [
        ["CONDITIONING"], ["CONDITIONING"], ["LATENT"]]
    assert ksampler["output"] == ["LATENT"] and ksampler["output_is_list"] == [False]
    assert ksampler["output_name"] == ["LATENT"]
    assert (ksampler["name"], ksampler["display_name"], ksampler["category"]) == ("KSampler", "KSampler", "sampling")
    assert ksampler["output_node"] is False and "optional" not in ksampler["input"]


def test_checkpoint_loader_lists_the_checkpoints_in_the_models_folder(info: dict) -> None:
    loader = info["CheckpointLoaderSimple"]
    assert loader["input"] == {"required": {"ckpt_name": [TINY_CHECKPOINTS, {}]}}
    assert loader["output"] == ["MODEL", "CLIP", "VAE"] and loader["output_name"] == ["MODEL", "CLIP", "VAE"]
    assert (loader["display_name"], loader["category"]) == ("Load Checkpoint", "loaders")
    assert info["LoraLoader"]["input"]["required"]["lora_name"][0] == [
        "tiny-lora-a.safetensors", "tiny-lora-b.safetensors", "tiny-lora-sdxl.safetensors"]


def test_load_image_lists_the_images_of_the_input_folder_with_an_upload_button(info: dict) -> None:
    assert info["LoadImage"]["input"]["required"]["image"] == [["cat.png"], {"image_upload": True}]
    assert info["LoadImage"]["output"] == ["IMAGE", "MASK"]
    assert info["LoadImageMask"]["input"]["required"] == {
        "image": [["cat.png"], {"image_upload": True}], "channel": [["alpha", "red", "green", "blue"], {}]}


def test_widget_options_declared_on_a_field_pass_through(info: dict) -> None:
    assert info["KSamplerAdvanced"]["input"]["required"]["noise_seed"] == [
        "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}]


def test_save_image_is_an_output_node_with_comfyuis_hidden_inputs(info: dict) -> None:
    save = info["SaveImage"]
    assert save["output_node"] is True
    assert save["input"] == {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                             "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}
    assert save["input_order"] == {"required": ["images", "filename_prefix"], "hidden": ["prompt", "extra_pnginfo"]}
    assert save["output"] == [] and save["output_is_list"] == [] and save["output_name"] == []
    assert (save["display_name"], save["category"]) == ("Save Image", "image")


def test_vae_decode_outputs_one_image(info: dict) -> None:
    decode = info["VAEDecode"]
    assert decode["input"] == {"required": {"samples": ["LATENT"], "vae": ["VAE"]}}
    assert decode["output"] == ["IMAGE"] and decode["output_name"] == ["IMAGE"] and decode["output_is_list"] == [False]
    assert (decode["display_name"], decode["category"]) == ("VAE Decode", "latent")


def test_prompt_boxes_are_multiline_dynamic_prompt_strings(info: dict) -> None:
    text = info["CLIPTextEncode"]["input"]["required"]["text"]
    assert text[0] == "STRING" and text[1]["multiline"] is True and text[1]["dynamicPrompts"] is True


def test_every_registered_node_is_listed_sorted_with_every_key_and_the_json_round_trips(info: dict) -> None:
    assert list(info) == sorted(catalog())
    assert json.loads(json.dumps(info)) == info
    for name, entry in info.items():
        assert set(entry) == NODE_KEYS, name
        assert entry["name"] == name and isinstance(entry["description"], str), name
        assert len(entry["output"]) == len(entry["output_name"]) == len(entry["output_is_list"]), name
        assert entry["input_order"] == {section: list(inputs) for section, inputs in entry["input"].items()}, name
        for section in ("required", "optional"):
            for input_name, spec in entry["input"].get(section, {}).items():
                assert isinstance(spec, list) and 1 <= len(spec) <= 2, (name, input_name)
                assert isinstance(spec[0], (str, list)), (name, input_name)
                assert len(spec) == 1 or isinstance(spec[1], dict), (name, input_name)


def test_noodle_nodes_prints_object_info_through_its_argparse_entry(
        tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    defaults = argparse.Namespace(models=ModelsSettings(), engine=EngineSettings(), limits=Limits())
    parser = argparse.ArgumentParser(prog="noodle")
    add_engine_commands(parser.add_subparsers(dest="command", required=True), defaults)
    (tmp_path / "dog.webp").write_bytes(b"")
    args = parser.parse_args(["nodes", "--models", str(tiny_models), "--input", str(tmp_path)])
    assert args.handler(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == sorted(catalog())
    assert printed["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == TINY_CHECKPOINTS
    assert printed["LoadImage"]["input"]["required"]["image"][0] == ["dog.webp"]
    assert printed["KSampler"]["input"]["required"]["steps"] == ["INT", {"default": 20, "min": 1, "max": 10000}]


def test_noodle_nodes_lists_empty_combos_when_the_folders_are_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    defaults = argparse.Namespace(models=ModelsSettings(), engine=EngineSettings(), limits=Limits())
    parser = argparse.ArgumentParser(prog="noodle")
    add_engine_commands(parser.add_subparsers(dest="command", required=True), defaults)
    args = parser.parse_args(["nodes", "--models", str(tmp_path / "none"), "--input", str(tmp_path / "none")])
    assert args.handler(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"] == [[], {}]
    assert printed["LoadImage"]["input"]["required"]["image"] == [[], {"image_upload": True}]


def test_python_module_is_comfyuis_own_for_each_node(info: dict) -> None:
    assert info["KSampler"]["python_module"] == "nodes"
    assert info["SamplerCustom"]["python_module"] == "comfy_extras.nodes_custom_sampler"
    assert info["ImageBlur"]["python_module"] == "comfy_extras.nodes_post_processing"
