"""The Sampler* nodes with options (engine/nodes/sampler_nodes.py): the sampler name and options each makes from
its inputs, as comfy_extras/nodes_custom_sampler.py 0.3.64 does; options reaching the step function through
SamplerCustom on the tiny models (the same latent as the step function called directly with them, another than
at ComfyUI's defaults); denoised_output being the last step's estimate; bad options refused at validation by name;
and /object_info showing ComfyUI's inputs."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import WorkflowInvalid
from engine.executor import Executor
from engine.nodes import catalog
from engine.object_info import node_info
from engine.samplers.kdiffusion import KDIFFUSION
from engine.samplers.kdiffusion import base as kdiffusion_base
from engine.settings import Limits
from engine.validate import validate
from engine.values import Sampler
from tests.engine.conftest import txt2img

pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")  # torchsde at the tree's ends

# (class_type, inputs, the sampler ComfyUI's node picks, the options it hands that sampler)
NODES: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = [
    ("SamplerDPMPP_3M_SDE", {"eta": 0.6, "s_noise": 0.9, "noise_device": "cpu"}, "dpmpp_3m_sde",
     {"eta": 0.6, "s_noise": 0.9}),
    ("SamplerDPMPP_2M_SDE", {"solver_type": "heun", "eta": 0.5, "s_noise": 1.1, "noise_device": "gpu"},
     "dpmpp_2m_sde_gpu", {"eta": 0.5, "s_noise": 1.1, "solver_type": "heun"}),
    ("SamplerDPMPP_SDE", {"eta": 0.7, "s_noise": 1.0, "r": 0.4, "noise_device": "cpu"}, "dpmpp_sde",
     {"eta": 0.7, "s_noise": 1.0, "r": 0.4}),
    ("SamplerDPMPP_2S_Ancestral", {"eta": 0.4, "s_noise": 0.8}, "dpmpp_2s_ancestral", {"eta": 0.4, "s_noise": 0.8}),
    ("SamplerEulerAncestral", {"eta": 0.5, "s_noise": 1.2}, "euler_ancestral", {"eta": 0.5, "s_noise": 1.2}),
    ("SamplerEulerAncestralCFGPP", {"eta": 0.3, "s_noise": 0.9}, "euler_ancestral_cfg_pp",
     {"eta": 0.3, "s_noise": 0.9}),
    ("SamplerLMS", {"order": 2}, "lms", {"order": 2}),
    ("SamplerDPMAdaptative", {"order": 2, "rtol": 0.1, "atol": 0.02, "h_init": 0.2, "pcoeff": 0.0, "icoeff": 1.0,
                              "dcoeff": 0.0, "accept_safety": 0.81, "eta": 0.0, "s_noise": 1.0}, "dpm_adaptive",
     {"order": 2, "rtol": 0.1, "atol": 0.02, "h_init": 0.2, "pcoeff": 0.0, "icoeff": 1.0, "dcoeff": 0.0,
      "accept_safety": 0.81, "eta": 0.0, "s_noise": 1.0}),
    ("SamplerER_SDE", {"solver_type": "Reverse-time SDE", "max_stage": 2, "eta": 0.5, "s_noise": 0.9}, "er_sde",
     {"s_noise": 0.9, "max_stage": 2, "noise_scaler": 0.5}),
    ("SamplerSASolver", {"model": ["4", 0], "eta": 0.8, "sde_start_percent": 0.1, "sde_end_percent": 0.9,
                         "s_noise": 1.0, "predictor_order": 2, "corrector_order": 3, "use_pece": True,
                         "simple_order_2": False}, "sa_solver",
     {"eta": 0.8, "sde_start_percent": 0.1, "sde_end_percent": 0.9, "s_noise": 1.0, "predictor_order": 2,
      "corrector_order": 3, "use_pece": True, "simple_order_2": False}),
]
IDS = [class_type for class_type, *_ in NODES]


def sampler_workflow(class_type: str, inputs: dict[str, Any], seed: int = 13) -> dict[str, Any]:
    """txt2img with BasicScheduler + the Sampler* node + SamplerCustom, both its latents saved as .latent files."""
    flow = txt2img(seed=seed)
    k = flow.pop("3")["inputs"]
    del flow["8"], flow["9"]
    flow["20"] = {"class_type": "BasicScheduler", "inputs": {"model": k["model"], "scheduler": "karras",
                                                             "steps": k["steps"], "denoise": 1.0}}
    flow["21"] = {"class_type": class_type, "inputs": inputs}
    flow["3"] = {"class_type": "SamplerCustom", "inputs": {
        "model": k["model"], "add_noise": True, "noise_seed": seed, "cfg": k["cfg"], "positive": k["positive"],
        "negative": k["negative"], "sampler": ["21", 0], "sigmas": ["20", 0], "latent_image": k["latent_image"]}}
    flow["40"] = {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "out"}}
    flow["41"] = {"class_type": "SaveLatent", "inputs": {"samples": ["3", 1], "filename_prefix": "denoised"}}
    return flow


def saved_latents(executor: Executor, workflow: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    executor.cache.clear()
    outputs = executor.run(workflow).to_dict()["outputs"]

    def read(node: str) -> torch.Tensor:
        [entry] = outputs[node]["latents"]
        path: Path = executor.settings.output_dir / entry["subfolder"] / entry["filename"]
        return load_file(path)["latent_tensor"]
    return read("40"), read("41")


@pytest.mark.parametrize(("class_type", "inputs", "name", "options"), NODES, ids=IDS)
def test_the_node_picks_comfys_sampler_with_its_options(class_type: str, inputs: dict[str, Any], name: str,
                                                       options: dict[str, Any]) -> None:
    node = catalog()[class_type].model_construct(**{**inputs, **({"model": None} if "model" in inputs else {})})
    [sampler] = node.run(None)  # type: ignore[arg-type]
    assert sampler == Sampler(name, tuple(sorted(options.items())))
    assert name in KDIFFUSION and KDIFFUSION[name].options(sampler.option_dict) == {
        **KDIFFUSION[name].defaults, **options}


def test_noise_device_gpu_picks_the_gpu_twin() -> None:
    for class_type, base_name, extra in (("SamplerDPMPP_3M_SDE", "dpmpp_3m_sde", {}),
                                         ("SamplerDPMPP_2M_SDE", "dpmpp_2m_sde", {"solver_type": "midpoint"}),
                                         ("SamplerDPMPP_SDE", "dpmpp_sde", {})):
        for device, name in (("gpu", f"{base_name}_gpu"), ("cpu", base_name)):
            node = catalog()[class_type].model_validate({**extra, "noise_device": device})
            assert node.run(None)[0].name == name  # type: ignore[arg-type, index]


@pytest.mark.parametrize(("class_type", "inputs", "name", "options"), NODES, ids=IDS)
def test_options_reach_the_step_function_through_sampler_custom(executor: Executor, monkeypatch: pytest.MonkeyPatch,
                                                                class_type: str, inputs: dict[str, Any], name: str,
                                                                options: dict[str, Any]) -> None:
    entry = KDIFFUSION[name]
    calls: list[dict[str, Any]] = []

    def spy(model: Any, x: torch.Tensor, sigmas: torch.Tensor, run: Any, **given: Any) -> torch.Tensor:
        reports: list[tuple[int, torch.Tensor]] = []
        callback = run.callback

        def watch(i: int, x_now: torch.Tensor, denoised: torch.Tensor) -> None:
            reports.append((i, denoised.clone()))
            if callback is not None:
                callback(i, x_now, denoised)
        run.callback = watch
        out = entry.fn(model, x.clone(), sigmas, run, **given)
        calls.append({"model": model, "x": x, "sigmas": sigmas, "run": run, "options": given, "out": out,
                      "reports": reports})
        return out

    monkeypatch.setitem(kdiffusion_base._REGISTRY, name, dataclasses.replace(entry, fn=spy))
    output, denoised = saved_latents(executor, sampler_workflow(class_type, inputs))
    [call] = calls
    assert call["options"] == {**entry.defaults, **options}
    run = call["run"]
    run.callback = None
    with torch.inference_mode():
        direct = entry.fn(call["model"], call["x"].clone(), call["sigmas"], run, **{**entry.defaults, **options})
        at_defaults = entry.fn(call["model"], call["x"].clone(), call["sigmas"], run, **entry.defaults)
    scale = float(executor.models.checkpoint("tiny-sd15.safetensors").pipe.vae.config.scaling_factor)
    assert torch.equal(direct, call["out"])
    torch.testing.assert_close(output, direct / scale, rtol=1e-6, atol=1e-6)
    assert (direct - at_defaults).abs().max() > 1e-3  # the options changed the run
    # denoised_output: the denoised estimate the step function reported last, for the last step
    last_index, last_denoised = call["reports"][-1]
    assert last_index == len(call["sigmas"]) - 2
    torch.testing.assert_close(denoised, last_denoised / scale, rtol=1e-6, atol=1e-6)


def refusal(workflow: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(WorkflowInvalid) as caught:
        validate(workflow, catalog(), lambda folder: ["tiny-sd15.safetensors"], Limits())
    [error] = caught.value.body["node_errors"]["21"]["errors"]
    return error


@pytest.mark.parametrize(("class_type", "bad", "kind"), [
    ("SamplerLMS", {"order": 0}, "value_smaller_than_min"),
    ("SamplerLMS", {"order": 101}, "value_bigger_than_max"),
    ("SamplerDPMAdaptative", {"order": 4}, "value_bigger_than_max"),
    ("SamplerEulerAncestralCFGPP", {"eta": 1.5}, "value_bigger_than_max"),
    ("SamplerDPMPP_3M_SDE", {"noise_device": "tpu"}, "value_not_in_list"),
    ("SamplerDPMPP_2M_SDE", {"solver_type": "euler"}, "value_not_in_list"),
    ("SamplerER_SDE", {"solver_type": "SDE"}, "value_not_in_list"),
    ("SamplerSASolver", {"corrector_order": 7}, "value_bigger_than_max"),
    ("SamplerDPMAdaptative", {"h_init": 0.0}, "custom_validation_failed"),
    ("SamplerDPMAdaptative", {"accept_safety": 3.0}, "custom_validation_failed"),
    ("SamplerDPMAdaptative", {"rtol": 0.0, "atol": 0.0}, "custom_validation_failed"),
])
def test_a_bad_option_is_refused_at_validation_naming_the_input(class_type: str, bad: dict[str, Any],
                                                               kind: str) -> None:
    [(_, inputs, _, _)] = [row for row in NODES if row[0] == class_type]
    error = refusal(sampler_workflow(class_type, {**inputs, **bad}))
    assert error["type"] == kind
    assert error["extra_info"]["input_name"] == list(bad)[-1]
    if kind == "custom_validation_failed":
        assert error["details"].startswith(f"{list(bad)[-1]} - ")


def test_object_info_shows_comfys_inputs_categories_and_outputs() -> None:
    def info(name: str) -> dict[str, Any]:
        return node_info(name, catalog()[name], lambda folder: [])
    for class_type, *_ in NODES:
        entry = info(class_type)
        assert entry["category"] == "sampling/custom_sampling/samplers"
        assert entry["output"] == ["SAMPLER"] and entry["output_name"] == ["SAMPLER"]
        assert entry["python_module"] == "comfy_extras.nodes_custom_sampler"
    eta = ["FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01, "round": False}]
    assert info("SamplerDPMPP_2M_SDE")["input"]["required"] == {
        "solver_type": [["midpoint", "heun"], {}], "eta": eta, "s_noise": eta, "noise_device": [["gpu", "cpu"], {}]}
    assert list(info("SamplerDPMPP_SDE")["input"]["required"]) == ["eta", "s_noise", "r", "noise_device"]
    cfgpp = info("SamplerEulerAncestralCFGPP")
    assert cfgpp["display_name"] == "SamplerEulerAncestralCFG++"
    assert cfgpp["input"]["required"]["eta"][1]["max"] == 1.0 and cfgpp["input"]["required"]["s_noise"][1]["max"] == 10
    assert info("SamplerLMS")["input"]["required"] == {"order": ["INT", {"default": 4, "min": 1, "max": 100}]}
    adaptive = info("SamplerDPMAdaptative")["input"]["required"]
    assert list(adaptive) == ["order", "rtol", "atol", "h_init", "pcoeff", "icoeff", "dcoeff", "accept_safety", "eta",
                              "s_noise"]
    assert adaptive["order"] == ["INT", {"default": 3, "min": 2, "max": 3}]
    assert [adaptive[name][1]["default"] for name in list(adaptive)[1:]] == [0.05, 0.0078, 0.05, 0.0, 1.0, 0.0, 0.81,
                                                                             0.0, 1.0]
    er_sde = info("SamplerER_SDE")["input"]["required"]
    assert er_sde["solver_type"][0] == ["ER-SDE", "Reverse-time SDE", "ODE"]
    assert er_sde["max_stage"] == ["INT", {"default": 3, "min": 1, "max": 3}]
    sa = info("SamplerSASolver")["input"]["required"]
    assert list(sa) == ["model", "eta", "sde_start_percent", "sde_end_percent", "s_noise", "predictor_order",
                        "corrector_order", "use_pece", "simple_order_2"]
    assert sa["eta"][1]["max"] == 10.0 and sa["sde_start_percent"][1] == {"default": 0.2, "min": 0.0, "max": 1.0,
                                                                           "step": 0.001}
    assert sa["predictor_order"] == ["INT", {"default": 3, "min": 1, "max": 6}]
    assert sa["corrector_order"] == ["INT", {"default": 4, "min": 0, "max": 6}]
    assert sa["use_pece"][0] == "BOOLEAN" and sa["model"] == ["MODEL"]


def test_a_sampler_value_from_a_node_keys_the_cache_by_its_options(executor: Executor) -> None:
    """Changing an option re-runs the sampler: the SAMPLER value compares by its options."""
    flow = sampler_workflow("SamplerEulerAncestral", {"eta": 0.5, "s_noise": 1.0})
    first, _ = saved_latents(executor, flow)
    changed = copy.deepcopy(flow)
    changed["21"]["inputs"]["eta"] = 0.25
    second, _ = saved_latents(executor, changed)
    assert not torch.equal(first, second)
