"""The whole graph's cost (engine/cost/) on the real executor and tiny models: each attack of issue 12 is
refused before anything runs, naming the node and the limit; ordinary template graphs pass with their cost
computed exactly, and what they write when run matches it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.cost import LIMIT_EXCEEDED, RULES, WorkflowCost, check_cost, validate_within_limits
from engine.errors import WorkflowInvalid
from engine.executor import Executor
from engine.nodes import catalog
from engine.samplers import plan as sampler_plan
from engine.settings import Limits
from tests.engine.conftest import txt2img

LIMITS = Limits()


def refusal(executor: Executor, workflow: dict[str, Any], limits: Limits = LIMITS) -> dict[str, Any]:
    """The node errors of a workflow the cost check must refuse (ComfyUI's body, our error type)."""
    with pytest.raises(WorkflowInvalid) as caught:
        validate_within_limits(workflow, catalog(), executor.models, limits)
    body = caught.value.body
    assert body["error"]["type"] == LIMIT_EXCEEDED, body
    return body["node_errors"]


def only_error(node_errors: dict[str, Any], node_id: str, class_type: str, limit: str) -> dict[str, Any]:
    """The one error of the one refused node, checked to name that node, its class and the limit."""
    assert list(node_errors) == [node_id], node_errors
    entry = node_errors[node_id]
    assert entry["class_type"] == class_type and entry["dependent_outputs"] == ["9"]
    [error] = entry["errors"]
    assert error["type"] == LIMIT_EXCEEDED and error["extra_info"]["limit"] == limit
    assert f"(limits.{limit} in config.toml)" in error["details"]
    return error


def cost_of(executor: Executor, workflow: dict[str, Any], limits: Limits = LIMITS) -> WorkflowCost:
    return check_cost(validate_within_limits(workflow, catalog(), executor.models, limits), limits, executor.models,
                      catalog())


def feed_sampler(workflow: dict[str, Any], node_id: str, class_type: str, **inputs: Any) -> dict[str, Any]:
    """Put a node between the latent and the sampler "3"."""
    latent = workflow["3"]["inputs"]["latent_image"]
    workflow[node_id] = {"class_type": class_type, "inputs": {**inputs, "samples": latent}}
    workflow["3"]["inputs"]["latent_image"] = [node_id, 0]
    return workflow


def chain(workflow: dict[str, Any], count: int, class_type: str, first: str, second: str, into: str) -> None:
    """`count` nodes each taking the previous one's output twice, the last feeding sampler "3"'s `into`."""
    previous = workflow["3"]["inputs"][into]
    for i in range(count):
        workflow[f"c{i}"] = {"class_type": class_type, "inputs": {first: previous, second: previous}}
        previous = [f"c{i}", 0]
    workflow["3"]["inputs"][into] = previous


def chained_samplers(count: int, steps: int) -> dict[str, Any]:
    workflow, previous = txt2img(steps=steps), ["3", 0]
    for i in range(count):
        workflow[f"k{i}"] = {"class_type": "KSampler", "inputs": {**workflow["3"]["inputs"], "latent_image": previous}}
        previous = [f"k{i}", 0]
    workflow["8"]["inputs"]["samples"] = previous
    return workflow


# -- the attacks of issue 12 ------------------------------------------------------------------------


def test_a_repeated_batch_past_max_batch_is_refused_at_the_repeat(executor: Executor) -> None:
    workflow = feed_sampler(txt2img(batch_size=8), "14", "RepeatLatentBatch", amount=4)
    error = only_error(refusal(executor, workflow), "14", "RepeatLatentBatch", "max_batch")
    assert error["details"] == ("makes a batch of 32 latents; this server's limit is 8 (limits.max_batch in "
                                "config.toml): make fewer at once")
    assert error["extra_info"]["received_value"] == 32


def test_a_side_of_zero_computed_from_the_aspect_ratio_is_held_to_max_side(executor: Executor) -> None:
    # 2048x16 passes every node's own check; LatentUpscale to height 2048 keeps the aspect: 262144 wide
    workflow = feed_sampler(txt2img(width=2048, height=16), "14", "LatentUpscale", upscale_method="nearest-exact",
                            width=0, height=2048, crop="disabled")
    error = only_error(refusal(executor, workflow), "14", "LatentUpscale", "max_side")
    assert error["details"].startswith("makes latents of 262,144x2,048 pixels; this server's limit is 2,048 a side")
    ok = feed_sampler(txt2img(width=128, height=64), "14", "LatentUpscale", upscale_method="nearest-exact",
                      width=0, height=128, crop="disabled")
    assert cost_of(executor, ok).side == 256


def test_an_upscale_by_a_factor_is_held_to_max_pixels(executor: Executor) -> None:
    workflow = feed_sampler(txt2img(width=768, height=768), "14", "LatentUpscaleBy",
                            upscale_method="nearest-exact", scale_by=1.5)
    error = only_error(refusal(executor, workflow, Limits(max_pixels=1024 * 1024)), "14", "LatentUpscaleBy",
                       "max_pixels")
    assert error["details"] == ("makes latents of 1,152x1,152 = 1,327,104 pixels; this server's limit is 1,048,576 "
                                "(limits.max_pixels in config.toml): choose a smaller size")


def test_an_image_scale_follows_the_upright_size_of_the_loaded_image(executor: Executor) -> None:
    # stored 16 wide and 2048 tall with EXIF orientation 6 (a quarter turn): LoadImage makes it 2048x16, so a
    # height of 2048 with width 0 would be 262144 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (16, 2048), "grey").save(executor.settings.input_dir / "turned.png", exif=exif)
    Image.new("RGB", (16, 2048), "grey").save(executor.settings.input_dir / "upright.png")
    workflow = txt2img(init_image="turned.png", denoise=0.5)
    workflow["15"] = {"class_type": "ImageScale", "inputs": {"image": ["12", 0], "upscale_method": "nearest-exact",
                                                             "width": 0, "height": 2048, "crop": "disabled"}}
    workflow["13"]["inputs"]["pixels"] = ["15", 0]
    error = only_error(refusal(executor, workflow), "15", "ImageScale", "max_side")
    assert error["details"].startswith("makes images of 262,144x2,048 pixels")
    workflow["12"]["inputs"]["image"] = "upright.png"
    assert cost_of(executor, workflow).side == 2048  # 16x2048 as stored: scaled to 16x2048


def test_twenty_chained_combines_are_refused_where_the_items_pass_the_limit(executor: Executor) -> None:
    workflow = txt2img()
    chain(workflow, 20, "ConditioningCombine", "conditioning_1", "conditioning_2", "positive")  # 2**20 items
    error = only_error(refusal(executor, workflow), "c4", "ConditioningCombine", "max_conditioning_items")
    assert error["details"].startswith("makes a conditioning of 32 items")  # c3 made 16: the limit, allowed
    assert error["extra_info"]["received_value"] == 32


def test_chained_concats_are_refused_where_the_tokens_pass_the_limit(executor: Executor) -> None:
    workflow = txt2img()
    chain(workflow, 20, "ConditioningConcat", "conditioning_to", "conditioning_from", "positive")
    # 77 tokens doubled each time: c4 makes 2,464, c5 4,928 (past the limit of 4,312)
    error = only_error(refusal(executor, workflow), "c5", "ConditioningConcat", "max_conditioning_tokens")
    assert error["details"].startswith("makes a conditioning of 4,928 tokens (ConditioningConcat adds")


def test_items_of_different_lengths_are_held_to_the_common_length_the_sampler_makes(executor: Executor) -> None:
    # 7 and 8 chunks of 77: a sampler repeats both to their least common multiple, 56 chunks
    workflow = txt2img(prompt="cat " * 500, negative="dog " * 560)
    # the default limit lets any prompt and negative within max_prompt_chunks run: 77 x lcm(7, 8)
    assert cost_of(executor, workflow).conditioning_tokens == 4312
    error = only_error(refusal(executor, workflow, Limits(max_conditioning_tokens=2464)), "3", "KSampler",
                       "max_conditioning_tokens")
    assert error["details"].startswith("repeats its conditionings' items of 539, 616 tokens to their least common "
                                       "multiple, 4,312, as ComfyUI does")
    # cfg 1 skips the negative pass, and so its length: each item alone is within the limit
    assert cost_of(executor, txt2img(prompt="cat " * 500, negative="dog " * 560, cfg=1.0)).conditioning_tokens == 616


def test_chained_samplers_are_held_to_the_job_steps(executor: Executor) -> None:
    nine_hundred = chained_samplers(900, 150)
    with pytest.raises(WorkflowInvalid) as caught:  # 907 nodes: refused before a node is looked at
        validate_within_limits(nine_hundred, catalog(), executor.models, LIMITS)
    assert caught.value.body["error"]["message"].startswith("the workflow has 907 nodes; this server's limit is 500 "
                                                            "(limits.max_workflow_nodes in config.toml)")
    roomy = Limits(max_workflow_nodes=10_000)
    node_errors = refusal(executor, nine_hundred, roomy)
    assert list(node_errors) == ["k5"]  # 150 each: "3" and k0-k4 make 900, k5 1,050
    [error] = node_errors["k5"]["errors"]
    assert error["details"] == ("brings the job's sampler steps to 1,050 (150 here); this server's limit is 1,000 a "
                                "job (limits.max_job_steps in config.toml): use fewer samplers or steps")
    assert cost_of(executor, chained_samplers(5, 150)).steps == 900


def test_many_save_nodes_are_held_to_the_job_images(executor: Executor) -> None:
    workflow = txt2img()
    for i in range(2790):
        workflow[f"s{i}"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}}
    assert "2,797 nodes" in str(pytest.raises(WorkflowInvalid, validate_within_limits, workflow, catalog(),
                                              executor.models, LIMITS).value)
    node_errors = refusal(executor, workflow, Limits(max_workflow_nodes=10_000))
    assert list(node_errors) == ["s31"]  # "9" writes the first image, s0-s30 the 2nd to the 32nd
    [error] = node_errors["s31"]["errors"]
    assert error["details"].startswith("brings the images the job writes to 33 (1 here); this server's limit is 32 "
                                       "a job (limits.max_job_images in config.toml)")


def _mask_batches(doublings: int, side: int = 64) -> dict[str, Any]:
    """SolidMask -> MaskToImage -> `doublings` ImageBatch(x, x) -> SaveImage "9"."""
    workflow: dict[str, Any] = {"1": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": side,
                                                                           "height": side}},
                                "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}}}
    previous = ["2", 0]
    for i in range(doublings):
        workflow[f"b{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": previous, "image2": previous}}
        previous = [f"b{i}", 0]
    workflow["9"] = {"class_type": "SaveImage", "inputs": {"images": previous, "filename_prefix": "masks"}}
    return workflow


def test_a_masks_size_is_followed_into_the_images_and_latents_made_of_it(executor: Executor) -> None:
    # a MASK had no shape: 64 images where max_batch is 8, or 1,024 of 2048x2048 (48 GiB) passed validation
    assert cost_of(executor, _mask_batches(3)).batch == 8
    error = only_error(refusal(executor, _mask_batches(6)), "b3", "ImageBatch", "max_batch")
    assert "makes a batch of 16 images" in error["details"]
    grown = txt2img()
    grown.update({"20": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 512, "height": 512}},
                  "21": {"class_type": "GrowMask", "inputs": {"mask": ["20", 0], "expand": 4,
                                                               "tapered_corners": True}},
                  "22": {"class_type": "InvertMask", "inputs": {"mask": ["21", 0]}},
                  "23": {"class_type": "MaskComposite", "inputs": {"destination": ["22", 0], "source": ["20", 0],
                                                                    "x": 0, "y": 0, "operation": "add"}},
                  "24": {"class_type": "MaskToImage", "inputs": {"mask": ["23", 0]}},
                  "25": {"class_type": "VAEEncode", "inputs": {"pixels": ["24", 0], "vae": ["4", 2]}},
                  "26": {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["25", 0], "amount": 64}}})
    grown["3"]["inputs"]["latent_image"] = ["26", 0]
    error = only_error(refusal(executor, grown), "26", "RepeatLatentBatch", "max_batch")
    assert "makes a batch of 64 latents" in error["details"]
    grown["26"]["inputs"]["amount"] = 2
    assert cost_of(executor, grown).pixels == 512 * 512


def test_a_resize_to_nothing_is_refused_before_torch_fails_on_it(executor: Executor) -> None:
    shrunk = feed_sampler(txt2img(), "12", "LatentUpscaleBy", upscale_method="bislerp", scale_by=0.01)
    with pytest.raises(WorkflowInvalid) as caught:  # not a server's limit: nothing could compute on it
        validate_within_limits(shrunk, catalog(), executor.models, LIMITS)
    assert caught.value.body["error"]["type"] == "prompt_outputs_failed_validation"
    [error] = caught.value.body["node_errors"]["12"]["errors"]
    assert error["type"] == "custom_validation_failed"
    assert error["details"] == "makes latents of 0x0 pixels; latents need at least 8x8: use a larger size or scale factor"
    tiny = txt2img()
    tiny["12"] = {"class_type": "ImageScale", "inputs": {"image": ["8", 0], "upscale_method": "bilinear", "width": 1,
                                                         "height": 1, "crop": "disabled"}}
    tiny["13"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["4", 2]}}
    tiny["9"]["inputs"]["images"] = ["12", 0]
    tiny["14"] = {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "tiny"}}
    with pytest.raises(WorkflowInvalid, match="node 13 .VAEEncode.: .*makes latents of 0x0 pixels"):
        validate_within_limits(tiny, catalog(), executor.models, LIMITS)
    del tiny["13"], tiny["14"]
    assert cost_of(executor, tiny).side == 64  # a 1x1 picture is still a picture


def test_independent_problems_are_all_named_and_what_follows_a_refused_node_is_not(executor: Executor) -> None:
    workflow = feed_sampler(txt2img(batch_size=8), "14", "RepeatLatentBatch", amount=2)
    feed_sampler(workflow, "15", "RepeatLatentBatch", amount=2)
    chain(workflow, 5, "ConditioningCombine", "conditioning_1", "conditioning_2", "negative")
    node_errors = refusal(executor, workflow)
    assert list(node_errors) == ["c4", "14"]  # in run order; node 15 only repeats 14's batch


def test_a_tiny_denoise_is_refused_before_its_schedule_is_computed(executor: Executor) -> None:
    with pytest.raises(WorkflowInvalid) as caught:
        executor.validate(txt2img(denoise=0.00001, scheduler="simple"))
    [error] = caught.value.body["node_errors"]["3"]["errors"]
    assert error["extra_info"]["input_name"] == "denoise"
    assert "denoise 1e-05 with 4 steps needs a schedule of 400,000 steps" in error["details"]
    assert "use a denoise of at least 0.0004" in error["details"]


def test_the_executor_checks_the_cost_for_every_front_end(executor: Executor) -> None:
    with pytest.raises(WorkflowInvalid, match=r"node 14 \(RepeatLatentBatch\): .*makes a batch of 32 latents"):
        executor.validate(feed_sampler(txt2img(batch_size=8), "14", "RepeatLatentBatch", amount=4))


# -- ordinary graphs ---------------------------------------------------------------------------------


def test_txt2img_img2img_and_hires_cost_what_they_will_run(executor: Executor) -> None:
    assert cost_of(executor, txt2img()) == WorkflowCost(
        nodes=7, steps=4, images=1, batch=1, side=64, pixels=64 * 64, conditioning_items=1, conditioning_tokens=77)
    Image.new("RGB", (100, 60), "teal").save(executor.settings.input_dir / "cost-source.png")
    # VAEEncode crops to 96x56; RepeatLatentBatch makes 3; denoise 0.5 runs the last 4 of 8 steps
    img2img = txt2img(init_image="cost-source.png", denoise=0.5, batch_size=3)
    assert cost_of(executor, img2img) == WorkflowCost(
        nodes=9, steps=4, images=3, batch=3, side=100, pixels=100 * 60, conditioning_items=1, conditioning_tokens=77)
    advanced = txt2img()
    advanced["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **{k: v for k, v in advanced["3"]["inputs"].items() if k not in ("seed", "denoise")}, "add_noise": "enable",
        "noise_seed": 1, "steps": 20, "start_at_step": 5, "end_at_step": 15, "return_with_leftover_noise": "disable"}}
    assert cost_of(executor, advanced).steps == 10  # steps 5 to 15 of 20
    hires = hires_fix(txt2img(prompt="fox " * 100))
    assert cost_of(executor, hires) == WorkflowCost(
        nodes=11, steps=7, images=2, batch=1, side=96, pixels=96 * 96, conditioning_items=1, conditioning_tokens=154)


def hires_fix(workflow: dict[str, Any]) -> dict[str, Any]:
    """txt2img at 64, then its latent upscaled by 1.5 and sampled again at denoise 0.5 for 3 steps, both saved."""
    workflow = copy.deepcopy(workflow)
    workflow["20"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "bilinear",
                                                                  "scale_by": 1.5}}
    workflow["21"] = {"class_type": "KSampler", "inputs": {**workflow["3"]["inputs"], "latent_image": ["20", 0],
                                                           "steps": 3, "denoise": 0.5}}
    workflow["22"] = {"class_type": "VAEDecode", "inputs": {"samples": ["21", 0], "vae": ["4", 2]}}
    workflow["23"] = {"class_type": "SaveImage", "inputs": {"images": ["22", 0], "filename_prefix": "hires"}}
    return workflow


def test_what_a_hires_graph_writes_when_run_is_what_its_cost_said(executor: Executor) -> None:
    workflow = hires_fix(txt2img(seed=11, prompt="a cost check"))
    cost = cost_of(executor, workflow)
    result = executor.run(workflow)
    files = [Path(executor.settings.output_dir, item["subfolder"], item["filename"])
             for output in result.outputs.values() for item in output["images"]]
    assert len(files) == cost.images == 2
    assert max(max(Image.open(path).size) for path in files) == cost.side == 96


def test_every_node_that_makes_a_latent_image_or_conditioning_has_a_rule() -> None:
    shaped = {"LATENT", "IMAGE", "MASK", "CONDITIONING"}
    for name, cls in catalog().items():
        takes_images = any(spec.type == "IMAGE" for spec in cls.input_specs())
        if shaped & set(cls.RETURN_TYPES) or (cls.OUTPUT_NODE and takes_images):
            assert name in RULES, f"{name} makes or writes images, latents or conditioning: engine/cost/ needs a rule"


def test_validating_many_samplers_builds_each_sampler_pair_once(executor: Executor,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    configure = sampler_plan._configure

    def counted(spec: Any, target: Any) -> Any:
        built.append(spec.cls.__name__)
        return configure(spec, target)

    monkeypatch.setattr(sampler_plan, "_configure", counted)
    sampler_plan._pair_problem.cache_clear()
    workflow = chained_samplers(300, 3)
    for i in range(300):
        workflow[f"k{i}"]["inputs"].update(sampler_name=("dpm_2", "heun")[i % 2], steps=1 + i % 3, denoise=0.5)
    executor.validate(workflow)
    # 301 samplers: node "3" (euler) and 300 of dpm_2 or heun at 1-3 steps; three pairs, each built once
    assert sorted(built) == ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler"]
    sampler_plan._pair_problem.cache_clear()


# -- any graph of these nodes: within the limits, or refused with a limit named ----------------------


@st.composite
def resized_graphs(draw: st.DrawFn) -> dict[str, Any]:
    side = st.integers(16, 2048).map(lambda n: n // 8 * 8)
    workflow = txt2img(width=draw(side), height=draw(side), batch_size=draw(st.integers(1, 8)))
    for index in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["LatentUpscale", "LatentUpscaleBy", "RepeatLatentBatch"]))
        inputs = {"LatentUpscale": lambda: {"upscale_method": "bilinear", "crop": "disabled",
                                            "width": draw(st.sampled_from([0, 64, 512, 4096, 16384])),
                                            "height": draw(st.sampled_from([0, 64, 1024, 8192]))},
                  "LatentUpscaleBy": lambda: {"upscale_method": "bilinear", "scale_by": draw(st.floats(0.01, 8.0))},
                  "RepeatLatentBatch": lambda: {"amount": draw(st.integers(1, 64))}}[kind]()
        feed_sampler(workflow, f"r{index}", kind, **inputs)
    return workflow


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resized_graphs())
def test_any_resized_graph_is_within_the_limits_or_refused_naming_one(executor: Executor,
                                                                      workflow: dict[str, Any]) -> None:
    try:
        cost = cost_of(executor, workflow)
    except WorkflowInvalid as err:
        for entry in err.body["node_errors"].values():
            for error in entry["errors"]:
                assert error["type"] != LIMIT_EXCEEDED or error["extra_info"]["limit"] in Limits.model_fields
        return
    assert cost.batch <= LIMITS.max_batch and cost.side <= LIMITS.max_side and cost.pixels <= LIMITS.max_pixels
