"""The SIGMAS nodes of engine/nodes/sigma_nodes.py against ComfyUI 0.3.64's numbers: its tables (rewritten compactly
here, with a few values copied by hand), its formulas rewritten in torch, the cost check's counts of what they make,
and a SamplerCustom run along them ending in SaveImageWebsocket."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import scipy.stats
import torch

from engine.cost import LIMIT_EXCEEDED, validate_within_limits
from engine.errors import WorkflowInvalid
from engine.executor import Executor, written_paths
from engine.nodes import catalog
from engine.object_info import node_info
from engine.pngmeta import parse_parameters, read_png_texts
from engine.samplers import DEFAULT_SAMPLING, ModelSampling, comfy_sigmas, model_sigmas
from engine.settings import Limits
from engine.values import ModelRef, Sigmas
from tests.engine.conftest import txt2img

# ComfyUI's AlignYourSteps levels to 4 digits (the test holds its own copy, tolerance 1e-4 relative)
AYS = {"SD1": (14.6146, 6.4746, 3.8637, 2.6946, 1.8842, 1.3944, 0.96426, 0.65237, 0.39775, 0.15152, 0.029167),
       "SDXL": (14.6146, 6.3184, 3.7682, 2.1811, 1.3405, 0.86207, 0.55507, 0.37985, 0.23324, 0.11142, 0.029167)}
# ComfyUI's GITS rows copied by hand from comfy_extras/nodes_gits.py
GITS_BY_HAND = {
    (0.80, 2): [14.61464119, 7.49001646, 0.02916753],
    (1.20, 10): [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823,
                 0.19894916, 0.09824532, 0.02916753],
    (1.50, 5): [14.61464119, 1.24153244, 0.54755926, 0.25053367, 0.09824532, 0.02916753],
}


def run(class_type: str, **inputs: Any) -> Any:
    cls = catalog()[class_type]
    # a MODEL input is taken as given, as the executor builds nodes (model_construct); the rest is validated
    node = cls.model_construct(**inputs) if "model" in inputs else cls.model_validate(inputs)
    return node.run(None)  # type: ignore[arg-type]


def model(sampling: ModelSampling = DEFAULT_SAMPLING) -> ModelRef:
    # the sigma nodes read only a MODEL's sampling: no pipeline is needed
    return ModelRef(None, None, sampling=sampling)  # type: ignore[arg-type]


def loglinear(levels: tuple[float, ...], count: int) -> torch.Tensor:
    """The log-linear stretch, rewritten in torch float64: `count` evenly spaced positions along the levels."""
    logs = torch.tensor(levels, dtype=torch.float64).log()
    at = torch.linspace(0, 1, count, dtype=torch.float64) * (len(levels) - 1)
    low = at.floor().long().clamp(max=len(levels) - 2)
    w = at - low
    return ((1 - w) * logs[low] + w * logs[low + 1]).exp()


def close(got: torch.Tensor, want: torch.Tensor | list[float], rtol: float = 1e-4) -> bool:
    want = torch.as_tensor(want, dtype=torch.float64)
    return got.shape == want.shape and torch.allclose(got.double(), want, rtol=rtol, atol=1e-7)


def test_align_your_steps_is_comfyuis_table_stretched_log_linearly() -> None:
    for model_type, levels in AYS.items():
        [got] = run("AlignYourStepsScheduler", model_type=model_type, steps=10)
        assert close(got.values, [*levels[:-1], 0.0])  # 10 steps: the table itself, its last level set to 0
        for steps in (1, 4, 17, 40):
            [got] = run("AlignYourStepsScheduler", model_type=model_type, steps=steps)
            assert close(got.values, [*loglinear(levels, steps + 1)[:-1].tolist(), 0.0])
    # 20 steps puts a sigma halfway between the first two levels: their geometric mean, by hand
    [got] = run("AlignYourStepsScheduler", model_type="SD1", steps=20)
    assert math.isclose(float(got.values[1]), math.sqrt(14.6146412293 * 6.4745760956), rel_tol=1e-6)
    [svd] = run("AlignYourStepsScheduler", model_type="SVD", steps=10)
    assert svd.values[0] == 700.0 and svd.values.dtype == torch.float32


def test_align_your_steps_denoise_keeps_the_last_round_steps_times_denoise() -> None:
    [full] = run("AlignYourStepsScheduler", model_type="SD1", steps=10)
    [half] = run("AlignYourStepsScheduler", model_type="SD1", steps=10, denoise=0.5)
    assert torch.equal(half.values, full.values[-6:])
    [banker] = run("AlignYourStepsScheduler", model_type="SD1", steps=5, denoise=0.5)
    assert len(banker.values) == 3  # Python's round(2.5) is 2, as in ComfyUI
    [none] = run("AlignYourStepsScheduler", model_type="SD1", steps=10, denoise=0.0)
    assert len(none.values) == 0


def sd1_sigma_at(timestep: float) -> float:
    """SD1.x's training sigma at a fractional timestep, log-linear between the table's entries."""
    logs = model_sigmas().log()
    low = math.floor(timestep)
    w = timestep - low
    return math.exp((1 - w) * float(logs[low]) + w * float(logs[min(low + 1, 999)]))


def test_gits_rows_are_comfyuis() -> None:
    from engine.nodes.sigma_tables import GITS_COEFFS

    for (coeff, steps), row in GITS_BY_HAND.items():
        [got] = run("GITSScheduler", coeff=coeff, steps=steps)
        assert got.values.tolist() == pytest.approx([*row[:-1], 0.0], rel=1e-7)
    # every level of ComfyUI's table is SD1.x's sigma near timestep 999 - 9.99 k: the rows are made of those
    grid = [sd1_sigma_at(999 - 9.99 * k) for k in range(101)]
    assert len(GITS_COEFFS) == 15 and GITS_COEFFS[0] == 0.80 and GITS_COEFFS[-1] == 1.50
    for coeff in GITS_COEFFS:
        for steps in range(2, 21):
            [got] = run("GITSScheduler", coeff=coeff, steps=steps)
            values = got.values.tolist()
            assert len(values) == steps + 1 and values[0] == pytest.approx(14.61464119) and values[-1] == 0.0
            assert all(a > b for a, b in zip(values, values[1:]))
            assert all(min(abs(v - g) / g for g in grid) < 3e-5 for v in values[:-1])


def test_gits_past_twenty_steps_stretches_the_twenty_step_row_and_cuts_for_denoise() -> None:
    [twenty] = run("GITSScheduler", coeff=1.2, steps=20)
    levels = (*twenty.values[:-1].tolist(), 0.02916753)
    [got] = run("GITSScheduler", coeff=1.2, steps=33)
    assert close(got.values, [*loglinear(levels, 34)[:-1].tolist(), 0.0], rtol=1e-6)
    [cut] = run("GITSScheduler", coeff=1.2, steps=10, denoise=0.3)
    [full] = run("GITSScheduler", coeff=1.2, steps=10)
    assert torch.equal(cut.values, full.values[-4:])


def test_gits_coeff_off_its_table_is_refused_with_the_allowed_values() -> None:
    cls = catalog()["GITSScheduler"]
    assert cls.check_values({"coeff": 1.25, "steps": 10}, Limits()) == []
    [(name, message)] = cls.check_values({"coeff": 1.23, "steps": 10}, Limits())
    assert name == "coeff" and "multiple of 0.05 from 0.80 to 1.50" in message
    info = node_info("GITSScheduler", cls, lambda folder: [])["input"]["required"]
    assert info["coeff"][1] == {**info["coeff"][1], "default": 1.2, "min": 0.8, "max": 1.5, "step": 0.05}
    assert info["steps"][1] == {**info["steps"][1], "default": 10, "min": 2, "max": 1000}


def test_laplace_vp_and_beta_are_comfyuis_formulas() -> None:
    n, lo, hi = 9, 0.0291675, 14.614642
    x = torch.linspace(0, 1, n)
    want = torch.exp(0.3 - 0.7 * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)).clamp(lo, hi)
    [got] = run("LaplaceScheduler", steps=n, mu=0.3, beta=0.7)
    assert torch.equal(got.values, want) and len(got.values) == n  # no 0 at the end, as ComfyUI's
    t = torch.linspace(1, 0.001, n)
    [got] = run("VPScheduler", steps=n)
    assert torch.equal(got.values, torch.cat([torch.sqrt(torch.special.expm1(19.9 * t**2 / 2 + 0.1 * t)),
                                              torch.zeros(1)]))
    [got] = run("BetaSamplingScheduler", model=model(), steps=12)
    assert torch.equal(got.values, comfy_sigmas("beta", 12, DEFAULT_SAMPLING))  # the `beta` scheduler's 0.6, 0.6
    table = model_sigmas().float()
    ts = [round(float(scipy.stats.beta.ppf(1 - i / 6, 2.0, 0.5)) * 999) for i in range(6)]
    [got] = run("BetaSamplingScheduler", model=model(), steps=6, alpha=2.0, beta=0.5)
    assert torch.equal(got.values, torch.tensor([*(float(table[t]) for t in ts), 0.0]))
    [lcm] = run("BetaSamplingScheduler", model=model(ModelSampling("lcm")), steps=4)
    assert float(lcm.values[0]) == pytest.approx(ModelSampling("lcm").sigma_max)
    [(name, _)] = catalog()["BetaSamplingScheduler"].check_values({"steps": 4, "alpha": 0.0}, Limits())
    assert name == "alpha"


def test_split_sigmas_denoise_and_set_first_sigma_are_comfyuis() -> None:
    sigmas = Sigmas(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]))
    high, low = run("SplitSigmasDenoise", sigmas=sigmas, denoise=0.4)  # round(5 * 0.4) = 2 low steps
    assert high.values.tolist() == [5, 4, 3, 2] and low.values.tolist() == [2, 1, 0]
    high, low = run("SplitSigmasDenoise", sigmas=sigmas, denoise=0.0)  # sigmas[:-0] is empty in ComfyUI too
    assert high.values.tolist() == [] and low.values.tolist() == [0]
    high, low = run("SplitSigmasDenoise", sigmas=sigmas, denoise=1.0)
    assert high.values.tolist() == [5] and low.values.tolist() == [5, 4, 3, 2, 1, 0]
    [first] = run("SetFirstSigma", sigmas=sigmas, sigma=136.0)
    assert first.values.tolist() == [136, 4, 3, 2, 1, 0] and sigmas.values[0] == 5.0  # the input stays as it was
    with pytest.raises(ValueError, match="empty schedule"):
        run("SetFirstSigma", sigmas=Sigmas(torch.zeros(0)))


def extended(values: list[float], steps: int, start: float, end: float, ease: Any) -> list[float]:
    """ExtendIntermediateSigmas, rewritten: ease(i / steps) of the way to the next sigma, inside the window."""
    out: list[float] = []
    for current, following in zip(values, values[1:]):
        out.append(current)
        if end <= current <= (math.inf if start < 0 else start):
            out += [current + ease(i / steps) * (following - current) for i in range(1, steps)]
    return out + values[-1:]


def test_extend_intermediate_sigmas_fills_the_window_with_each_spacing() -> None:
    sigmas = Sigmas(torch.tensor([14.0, 10.0, 5.0, 1.0, 0.0]))
    [got] = run("ExtendIntermediateSigmas", sigmas=sigmas, steps=3, end_at_sigma=5.0, spacing="linear")
    assert got.values.tolist() == pytest.approx([14, 38 / 3, 34 / 3, 10, 25 / 3, 20 / 3, 5, 11 / 3, 7 / 3, 1, 0])
    eases = {"linear": lambda x: x, "cosine": lambda x: math.sin(x * math.pi / 2),
             "sine": lambda x: 1 - math.cos(x * math.pi / 2)}
    for spacing, ease in eases.items():
        [got] = run("ExtendIntermediateSigmas", sigmas=sigmas, steps=4, start_at_sigma=10.0, end_at_sigma=1.0,
                    spacing=spacing)
        assert got.values.tolist() == pytest.approx(extended([14, 10, 5, 1, 0], 4, 10.0, 1.0, ease), rel=1e-6)
    [same] = run("ExtendIntermediateSigmas", sigmas=sigmas, steps=1, spacing="linear")
    assert torch.equal(same.values, sigmas.values)


def test_sampling_percent_to_sigma_reads_the_models_sampling() -> None:
    sd = model()
    [(half,)] = [run("SamplingPercentToSigma", model=sd, sampling_percent=0.5)]
    assert half == pytest.approx(sd1_sigma_at(499.5), rel=1e-6)
    assert run("SamplingPercentToSigma", model=sd, sampling_percent=0.0) == (999999999.9,)
    assert run("SamplingPercentToSigma", model=sd, sampling_percent=1.0) == (0.0,)
    [top] = run("SamplingPercentToSigma", model=sd, sampling_percent=0.0, return_actual_sigma=True)
    [bottom] = run("SamplingPercentToSigma", model=sd, sampling_percent=1.0, return_actual_sigma=True)
    assert top == pytest.approx(14.6146412, rel=1e-6) and bottom == pytest.approx(0.0291671582, rel=1e-6)
    [zsnr] = run("SamplingPercentToSigma", model=model(ModelSampling(zsnr=True)), sampling_percent=0.0,
                 return_actual_sigma=True)
    assert zsnr > 4000  # zero terminal SNR's largest sigma, about 4518
    info = node_info("SamplingPercentToSigma", catalog()["SamplingPercentToSigma"], lambda folder: [])
    assert info["output"] == ["FLOAT"] and info["output_name"] == ["sigma_value"]


def custom_along(sigmas_node: dict[str, Any], output: str = "SaveImage") -> dict[str, Any]:
    """txt2img with KSampler "3" replaced by SamplerCustom along `sigmas_node` ("20"), ending in `output` "9"."""
    flow = copy.deepcopy(txt2img(seed=7))
    k = flow["3"]["inputs"]
    flow["20"] = sigmas_node
    flow["21"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    flow["3"] = {"class_type": "SamplerCustom", "inputs": {
        "model": k["model"], "add_noise": True, "noise_seed": 7, "cfg": k["cfg"], "positive": k["positive"],
        "negative": k["negative"], "sampler": ["21", 0], "sigmas": ["20", 0], "latent_image": k["latent_image"]}}
    flow["9"]["class_type"] = output  # SaveImageWebsocket ignores the filename_prefix, as ComfyUI ignores extras
    return flow


def test_a_workflow_ending_in_save_image_websocket_gives_its_picture(executor: Executor) -> None:
    flow = custom_along({"class_type": "AlignYourStepsScheduler",
                         "inputs": {"model_type": "SD1", "steps": 3, "denoise": 1.0}}, "SaveImageWebsocket")
    result = executor.run(flow).to_dict()
    [image] = result["outputs"]["9"]["images"]
    assert image["type"] == "temp"
    [path] = written_paths(executor.settings.output_dir, result["outputs"]["9"])
    assert path.is_file() and path.stat().st_size > 0
    info = node_info("SaveImageWebsocket", catalog()["SaveImageWebsocket"], lambda folder: [])
    assert info["output_node"] is True and info["category"] == "api/image" and info["output"] == []


def test_a_linked_percent_sets_the_first_sigma_of_a_run(executor: Executor) -> None:
    flow = custom_along({"class_type": "GITSScheduler", "inputs": {"coeff": 1.2, "steps": 3, "denoise": 1.0}})
    flow["22"] = {"class_type": "SamplingPercentToSigma",
                  "inputs": {"model": flow["3"]["inputs"]["model"], "sampling_percent": 0.0,
                             "return_actual_sigma": True}}
    flow["23"] = {"class_type": "SetFirstSigma", "inputs": {"sigmas": ["20", 0], "sigma": ["22", 0]}}
    flow["3"]["inputs"]["sigmas"] = ["23", 0]
    outputs = executor.run(flow).to_dict()["outputs"]
    [path] = written_paths(executor.settings.output_dir, outputs["9"])
    _, _, fields = parse_parameters(read_png_texts(path)["parameters"])
    # the PNG's A1111 fields come from SamplerCustom's sampler and scheduler nodes
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"], fields["Seed"]) == \
        ("3", "Euler", "Align Your Steps GITS", "7")


def sigma_flow(*nodes: dict[str, Any]) -> dict[str, Any]:
    """A SamplerCustom along a chain of SIGMAS nodes, each taking the one before it as `sigmas`."""
    flow = custom_along(nodes[0])
    for i, node in enumerate(nodes[1:], start=30):
        flow[str(i)] = copy.deepcopy(node)
        flow[str(i)]["inputs"]["sigmas"] = ["20" if i == 30 else str(i - 1), 0]
        flow["3"]["inputs"]["sigmas"] = [str(i), 0]
    return flow


def test_cost_counts_the_steps_each_sigma_node_makes(executor: Executor) -> None:
    def steps_of(flow: dict[str, Any], limits: Limits = Limits()) -> int:
        from engine.cost import check_cost
        return check_cost(validate_within_limits(flow, catalog(), executor.models, limits), limits,
                          executor.models, catalog()).steps

    ays = {"class_type": "AlignYourStepsScheduler", "inputs": {"model_type": "SDXL", "steps": 12, "denoise": 0.5}}
    assert steps_of(sigma_flow(ays)) == 6
    split = {"class_type": "SplitSigmasDenoise", "inputs": {"denoise": 0.4}}
    assert steps_of(sigma_flow(ays, split)) == 6 - round(6 * 0.4)  # the high part: the steps before the cut
    laplace = {"class_type": "LaplaceScheduler",
               "inputs": {"steps": 9, "sigma_max": 14.614642, "sigma_min": 0.0291675, "mu": 0.0, "beta": 0.5}}
    assert steps_of(sigma_flow(laplace)) == 8  # 9 sigmas, no 0 appended
    extend = {"class_type": "ExtendIntermediateSigmas",
              "inputs": {"steps": 3, "start_at_sigma": -1.0, "end_at_sigma": 0.0, "spacing": "linear"}}
    vp = {"class_type": "VPScheduler", "inputs": {"steps": 20, "beta_d": 19.9, "beta_min": 0.1, "eps_s": 0.001}}
    assert steps_of(sigma_flow(vp, extend)) == 60  # every pair within the window: 2 more sigmas each


def test_extend_intermediate_sigmas_is_held_to_max_steps_at_validation(executor: Executor) -> None:
    basic = {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "normal", "steps": 100,
                                                        "denoise": 1.0}}
    extend = {"class_type": "ExtendIntermediateSigmas",
              "inputs": {"steps": 3, "start_at_sigma": -1.0, "end_at_sigma": 12.0, "spacing": "linear"}}
    with pytest.raises(WorkflowInvalid) as caught:
        validate_within_limits(sigma_flow(basic, extend), catalog(), executor.models, Limits())
    assert caught.value.body["error"]["type"] == LIMIT_EXCEEDED
    [error] = caught.value.body["node_errors"]["30"]["errors"]  # the extend node, not the sampler after it
    assert error["extra_info"]["limit"] == "max_steps" and error["extra_info"]["received_value"] == 300
    assert "may make 301 sigmas" in error["details"]
    # an empty window (end above start) extends nothing: the schedule's own 100 steps pass
    narrow = copy.deepcopy(extend)
    narrow["inputs"].update(start_at_sigma=1.0, end_at_sigma=2.0)
    validate_within_limits(sigma_flow(basic, narrow), catalog(), executor.models, Limits())


def test_every_node_that_makes_or_takes_sigmas_has_a_cost_rule() -> None:
    from engine.cost import RULES

    # without a rule a SIGMAS length is unknown, and the sampler along it would count no steps toward the limits
    for name, cls in catalog().items():
        if "SIGMAS" in cls.RETURN_TYPES or any(spec.type == "SIGMAS" for spec in cls.input_specs()):
            assert name in RULES, f"{name} makes or takes SIGMAS: engine/cost/ needs a rule for its length"


def test_a_vp_schedule_past_float32_is_refused_naming_its_inputs() -> None:
    """beta_d 5000 makes sqrt(e^2500 - 1): infinite in float32, a black picture in ComfyUI. The sampler's own check
    listed every one of the 10,001 sigmas in its message; it names three now."""
    from engine.samplers.plan import _checked_sigmas

    with pytest.raises(ValueError, match=r"beta_d / 2 \+ beta_min = 2500.1 .* past float32's range"):
        run("VPScheduler", steps=10_000, beta_d=5000.0)
    with pytest.raises(ValueError) as caught:
        _checked_sigmas(torch.tensor([float("inf")] * 10_000 + [0.0]))
    assert str(caught.value) == ("sigmas must be finite and >= 0: sigma 0 is inf, sigma 1 is inf, sigma 2 is inf and "
                                 "9997 more (of 10001)")
