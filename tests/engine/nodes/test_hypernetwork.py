"""HypernetworkLoader: ComfyUI 0.3.64's load_hypernetwork_patch on A1111's format, hooked at attn1/attn2's k and v."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.errors import WorkflowInvalid
from engine.executor import Executor
from engine.models.convert import convert_file
from engine.models.hypernetwork import build_hypernetwork, hypernetwork_file, read_hypernetwork
from engine.models.unet_hooks import unet_patched
from tests.conftest import tiny_executor
from tests.engine.conftest import txt2img

WIDTHS = (32, 64)  # the tiny SD1.5 UNet's attention widths (attn1 at 32 and 64, attn2's context at 32)


def comfy_hypernetwork(sd: dict[Any, Any], strength: float) -> Any:
    """comfy_extras/nodes_hypernetwork.py load_hypernetwork_patch on a loaded A1111 dict, compactly."""
    valid = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "swish": torch.nn.Hardswish}
    activation_func = sd.get("activation_func", "linear")
    is_layer_norm, use_dropout = sd.get("is_layer_norm", False), sd.get("use_dropout", False)
    activate_output, last_layer_dropout = sd.get("activate_output", False), sd.get("last_layer_dropout", False)
    out = {}
    for d in sd:
        try:
            dim = int(d)
        except (TypeError, ValueError):
            continue
        output = []
        for index in [0, 1]:
            attn_weights = sd[dim][index]
            linears = [a[:-len(".weight")] for a in attn_weights.keys() if a.endswith(".weight")]
            layers: list[torch.nn.Module] = []
            i = 0
            while i < len(linears):
                last_layer, penultimate_layer = i == len(linears) - 1, i == len(linears) - 2
                w, b = attn_weights[f"{linears[i]}.weight"], attn_weights[f"{linears[i]}.bias"]
                layer = torch.nn.Linear(w.shape[1], w.shape[0])
                layer.load_state_dict({"weight": w, "bias": b})
                layers.append(layer)
                if activation_func != "linear" and ((not last_layer) or activate_output):
                    layers.append(valid[activation_func]())
                if is_layer_norm:
                    i += 1
                    ln = torch.nn.LayerNorm(attn_weights[f"{linears[i]}.weight"].shape[0])
                    ln.load_state_dict({"weight": attn_weights[f"{linears[i]}.weight"],
                                        "bias": attn_weights[f"{linears[i]}.bias"]})
                    layers.append(ln)
                if use_dropout and (not last_layer) and (not penultimate_layer or last_layer_dropout):
                    layers.append(torch.nn.Dropout(p=0.3))
                i += 1
            output.append(torch.nn.Sequential(*layers))
        out[dim] = torch.nn.ModuleList(output)

    def patch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dim = k.shape[-1]
        if dim in out:
            k = k + out[dim][0](k) * strength
            v = v + out[dim][1](v) * strength
        return q, k, v
    return patch


def a1111_dict(path: Path) -> dict[Any, Any]:
    """The A1111 .pt layout of a hypernetwork file in Noodle's flat one (widths -> two state dicts, options)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        meta = file.metadata()
    tensors = load_file(str(path))
    data: dict[Any, Any] = {"activation_func": meta["activation_func"], "name": "tiny", "step": 10}
    data |= {flag: meta[flag] == "True" for flag in ("is_layer_norm", "use_dropout", "activate_output",
                                                     "last_layer_dropout")}
    for width in sorted({int(key.split(".")[0]) for key in tensors}):
        data[width] = tuple({key.split(".", 2)[2]: value for key, value in sorted(
            tensors.items(), key=lambda kv: [int(p) if p.isdigit() else p for p in kv[0].split(".")])
                             if key.startswith(f"{width}.{index}.")} for index in (0, 1))
    return data


@pytest.mark.parametrize(("activation", "layer_norm", "structure"),
                         [("relu", False, (1, 2, 1)), ("tanh", True, (1, 2, 1)), ("linear", False, (1, 1.5, 2, 1)),
                          ("swish", True, (1, 2, 2, 2, 2, 1))])
def test_the_patch_is_comfys_hypernetwork_patch(tmp_path: Path, activation: str, layer_norm: bool,
                                                structure: tuple[float, ...]) -> None:
    # six layers and more: "linear.10" must come after "linear.2", as the Sequential has them
    path = hypernetwork_file(tmp_path / "h.safetensors", WIDTHS, structure, activation=activation,
                             layer_norm=layer_norm, seed=3)
    ours, theirs = read_hypernetwork(path, "h", 0.7), comfy_hypernetwork(a1111_dict(path), 0.7)
    gen = torch.Generator().manual_seed(0)
    for width in (*WIDTHS, 48):
        k, v = torch.randn(2, 77, width, generator=gen), torch.randn(2, 77, width, generator=gen)
        _, k_ref, v_ref = theirs(None, k, v)
        assert torch.equal(ours.key(k), k_ref) and torch.equal(ours.value(v), v_ref)


def test_an_a1111_pt_converts_with_its_options_and_loads_as_comfy_reads_the_pt(tmp_path: Path) -> None:
    source = hypernetwork_file(tmp_path / "src.safetensors", WIDTHS, activation="tanh", layer_norm=True, seed=5)
    data = a1111_dict(source)
    torch.save(data, tmp_path / "anime.pt")
    converted = convert_file(tmp_path / "anime.pt")
    assert converted.target.name == "anime.safetensors"
    ours, theirs = read_hypernetwork(converted.target, "anime", 1.0), comfy_hypernetwork(data, 1.0)
    k = torch.randn(1, 5, 64)
    assert torch.equal(ours.key(k), theirs(None, k, k)[1])


def test_a_broken_file_is_refused_with_what_is_wrong() -> None:
    with pytest.raises(Exception, match="activation_func 'gelu' is not one ComfyUI loads"):
        build_hypernetwork("x", {"32.0.linear.0.weight": torch.zeros(2, 2)}, {"activation_func": "gelu"}, 1.0)
    with pytest.raises(Exception, match="key 'linear.0.weight' is not '<width>.<0|1>.<layer>'"):
        build_hypernetwork("x", {"linear.0.weight": torch.zeros(2, 2)}, {}, 1.0)


@pytest.fixture(scope="module")
def hyper_executor(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    """An executor over the tiny checkpoints and a hypernetworks folder of this module's own."""
    root = tmp_path_factory.mktemp("hyper")
    models = root / "models"
    models.mkdir()
    (models / "checkpoints").symlink_to(tiny_models / "checkpoints", target_is_directory=True)
    hypernetwork_file(models / "hypernetworks" / "tiny-hyper.safetensors", WIDTHS, seed=7, scale=0.3)
    (models / "hypernetworks" / "old.pt").write_bytes(b"not loaded")
    return tiny_executor(models, root / "run")


def with_hypernetwork(workflow: dict[str, Any], strength: float, name: str = "tiny-hyper.safetensors",
                      repeat: int = 1) -> dict[str, Any]:
    changed, source = copy.deepcopy(workflow), ["4", 0]
    for i in range(repeat):
        changed[f"2{i}"] = {"class_type": "HypernetworkLoader",
                            "inputs": {"model": source, "hypernetwork_name": name, "strength": strength}}
        source = [f"2{i}", 0]
    changed["3"]["inputs"]["model"] = source
    return changed


def pixels(executor: Executor, workflow: dict[str, Any]) -> np.ndarray:
    [image] = executor.run(workflow).outputs["9"]["images"]
    return np.asarray(Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"])).astype(int)


def test_the_folder_is_listed_like_loras(hyper_executor: Executor) -> None:
    assert hyper_executor.models.choices("hypernetworks") == ["tiny-hyper.safetensors"]


def test_a_hypernetwork_workflow_changes_the_picture_and_a_plain_one_after_it_does_not(
        hyper_executor: Executor) -> None:
    plain = txt2img(seed=1504)
    before = pixels(hyper_executor, plain)
    patched = pixels(hyper_executor, with_hypernetwork(plain, 1.0))
    twice = pixels(hyper_executor, with_hypernetwork(plain, 1.0, repeat=2))  # patches compose
    assert pixels(hyper_executor, with_hypernetwork(plain, 0.0)).tolist() == before.tolist()
    hyper_executor.cache.clear()
    assert np.array_equal(pixels(hyper_executor, plain), before)
    assert np.abs(patched - before).max() > 0 and np.abs(twice - patched).max() > 0
    meta = hyper_executor.run(with_hypernetwork(plain, 0.5)).meta
    assert "tiny-hyper.safetensors" in str(meta)


def test_a_pickle_hypernetwork_is_refused_with_the_convert_command(hyper_executor: Executor) -> None:
    with pytest.raises(WorkflowInvalid) as err:
        hyper_executor.validate(with_hypernetwork(txt2img(), 1.0, name="old.pt"))
    message = str(err.value.body)
    assert "pickle file" in message and "noodle convert" in message


def test_attn1_and_attn2_see_shifted_keys_and_values(hyper_executor: Executor) -> None:
    unet = hyper_executor.models.checkpoint("tiny-sd15.safetensors").pipe.unet
    patch = read_hypernetwork(hyper_executor.models.resolve("hypernetworks", "tiny-hyper.safetensors"), "h", 0.8)
    block = unet.up_blocks[1].attentions[0].transformer_blocks[0]
    gen = torch.Generator().manual_seed(1)
    n, context = torch.randn(1, 16, 32, generator=gen), torch.randn(1, 77, 32, generator=gen)
    comfy = comfy_hypernetwork(a1111_dict(hyper_executor.models.resolve("hypernetworks",
                                                                        "tiny-hyper.safetensors")), 0.8)

    def by_hand(attention: torch.nn.Module, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        _, k, v = comfy(None, source, source)  # ComfyUI: the patch, then to_k / to_v
        heads = attention.heads
        q, k, v = attention.to_q(x), attention.to_k(k), attention.to_v(v)
        split = lambda t: t.view(1, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return attention.to_out[0](out.transpose(1, 2).reshape(1, -1, q.shape[-1]))

    with torch.inference_mode():
        with unet_patched(unet, (patch,)):
            hooked_self, hooked_cross = block.attn1(n), block.attn2(n, encoder_hidden_states=context)
        plain_cross = block.attn2(n, encoder_hidden_states=context)
        assert torch.allclose(hooked_self, by_hand(block.attn1, n, n), atol=1e-5)
        assert torch.allclose(hooked_cross, by_hand(block.attn2, n, context), atol=1e-5)
        assert not torch.allclose(plain_cross, hooked_cross, atol=1e-4)


def test_every_patch_composes_in_one_workflow_and_leaves_the_unet_as_it_was(hyper_executor: Executor) -> None:
    plain = txt2img(seed=1505)
    before = pixels(hyper_executor, plain)
    graph = with_hypernetwork(plain, 0.8)
    graph["40"] = {"class_type": "FreeU_V2", "inputs": {"model": ["20", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9,
                                                        "s2": 0.2}}
    graph["41"] = {"class_type": "ModelSamplingContinuousEDM",
                   "inputs": {"model": ["40", 0], "sampling": "eps", "sigma_max": 14.6, "sigma_min": 0.03}}
    graph["42"] = {"class_type": "DifferentialDiffusion", "inputs": {"model": ["41", 0], "strength": 1.0}}
    graph["43"] = {"class_type": "SolidMask", "inputs": {"value": 0.7, "width": 64, "height": 64}}
    graph["44"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["43", 0]}}
    graph["45"] = {"class_type": "RescaleCFG", "inputs": {"model": ["42", 0], "multiplier": 0.7}}
    graph["46"] = {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["45", 0], "scale": 3.0}}
    graph["3"]["inputs"].update(model=["46", 0], latent_image=["44", 0])
    run = hyper_executor.run(graph)
    # seven patches on the loaded checkpoint: nothing is read from disk again
    assert run.meta["models"]["misses"] == 0 and run.meta["models"]["loaded"] == ["tiny-sd15.safetensors"]
    composed = pixels(hyper_executor, graph)
    without_freeu = copy.deepcopy(graph)
    without_freeu["41"]["inputs"]["model"] = ["20", 0]
    assert np.abs(composed - pixels(hyper_executor, without_freeu)).max() > 0
    unet = hyper_executor.models.checkpoint("tiny-sd15.safetensors").pipe.unet
    assert sum(len(m._forward_pre_hooks) for m in unet.modules()) == 0
    hyper_executor.cache.clear()
    assert np.array_equal(pixels(hyper_executor, plain), before)
