"""GenerationRequest: options checked against config and the models folder, then WorkflowParams by architecture."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.core.errors import RequestInvalid
from bot.core.requests.imagine import Allowed, GenerationRequest, ImageUpload, RequestContext, check_upload_meta, parse_request
from bot.settings import BotSettings, Settings
from engine.errors import ModelNotFound
from engine.models.detect import Arch
from engine.templates import build_workflow

ALLOWED = Allowed.from_settings(Settings())
CONTEXT = RequestContext(ALLOWED, ["tiny-sd15.safetensors", "tiny-sdxl.safetensors", "sd_xl_base_1.0.safetensors"],
                         ["tiny-lora-a.safetensors", "tiny-lora-b.safetensors"])


def _params(request: GenerationRequest, arch: Arch, **kwargs):  # type: ignore[no-untyped-def]
    return request.to_params(CONTEXT, checkpoint="x.safetensors", arch=arch, seed=7, **kwargs)


def test_the_limits_come_from_config() -> None:
    settings = Settings(bot=BotSettings(max_batch=2, max_cfg=12.0))
    allowed = Allowed.from_settings(settings.model_copy(update={"limits": settings.limits.model_copy(
        update={"max_steps": 40, "max_side": 1024})}))
    assert (allowed.max_steps, allowed.max_side, allowed.max_batch, allowed.max_cfg) == (40, 1024, 2, 12.0)


@pytest.mark.parametrize(("options", "words"), [
    ({"prompt": "  "}, "prompt is empty"),
    ({"prompt": "x" * 4001}, "prompt is 4001 characters; the limit is 4000"),
    ({"prompt": "fox", "steps": 151}, "steps 151 is outside 1..150"),
    ({"prompt": "fox", "cfg": 31.5}, "cfg 31.5 is outside 0..30"),
    ({"prompt": "fox", "batch": 5}, "batch 5 is outside 1..4"),
    ({"prompt": "fox", "width": 513}, "width 513 is not a multiple of 8 (SD latents are 1/8 of the image); use 512 or 520"),
    ({"prompt": "fox", "height": 32}, "height 32 is below this server's minimum of 64 (bot.min_side in config.toml)"),
    ({"prompt": "fox", "sampler": "eulr"}, "sampler 'eulr' is not available; choose one of euler"),
    ({"prompt": "fox", "denoise": 0.5}, "denoise applies to an attached image"),
    ({"prompt": "fox", "clip_skip": 13}, "clip_skip 13 is outside 1..12"),
    ({"prompt": "fox", "steps": "many"}, "steps 'many' is not a whole number"),
    ({"prompt": "fox", "sed": 4}, "sed 4 is not an option of /imagine"),
])
def test_a_bad_option_is_refused_with_what_is_allowed(options: dict, words: str) -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_request(options, CONTEXT)
    assert words in str(caught.value)


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_request({"prompt": "fox", "steps": 0, "width": 100}, CONTEXT)
    assert str(caught.value).count("\n") == 1


def test_unknown_models_name_the_closest_files() -> None:
    with pytest.raises(ModelNotFound, match="checkpoint 'sdxl-base' is not in models/checkpoints; closest: "):
        parse_request({"prompt": "fox", "model": "sdxl-base"}, CONTEXT)
    with pytest.raises(ModelNotFound, match="LoRA 'tiny-lora' is not in models/loras"):
        parse_request({"prompt": "fox", "loras": "tiny-lora:0.5"}, CONTEXT)


def test_attachments_are_refused_by_type_and_size_before_download() -> None:
    with pytest.raises(RequestInvalid, match="is application/pdf, not an image"):
        check_upload_meta("a.pdf", "application/pdf", 10, ALLOWED)
    with pytest.raises(RequestInvalid, match="the limit is 10.5 MB"):
        check_upload_meta("a.png", "image/png", 11 * 1024 * 1024, ALLOWED)
    with pytest.raises(RequestInvalid, match="does not look like an image"):
        check_upload_meta("a.txt", None, 10, ALLOWED)
    check_upload_meta("a.png", "image/png; charset=binary", 10, ALLOWED)


def test_default_size_follows_the_checkpoint_architecture() -> None:
    request = parse_request({"prompt": "fox"}, CONTEXT)
    assert (_params(request, Arch.of("sdxl", tiny=False)).width, _params(request, Arch.of("sd15", False)).width,
            _params(request, Arch.of("sd15", True)).height) == (1024, 512, 64)
    sd2 = Arch.of("sd2", tiny=False)
    assert (_params(request, sd2).width, _params(request, replace(sd2, prediction="v_prediction")).width) == (512, 768)
    with pytest.raises(RequestInvalid, match=r"cannot make this size: 4096x4096"):
        big = Allowed(**{**ALLOWED.__dict__, "max_side": 4096})
        request.to_params(RequestContext(big, [], [], defaults=BotSettings(size_sdxl=4096)),
                          checkpoint="x.safetensors", arch=Arch.of("sdxl", False), seed=1)


def test_options_become_a_template_workflow_with_loras_clip_skip_and_img2img() -> None:
    request = parse_request({"prompt": "a fox <lora:tiny-lora-b:0.3>", "loras": "tiny-lora-a:0.8", "clip_skip": 2,
                             "image": ImageUpload(filename="a.png", data=b"\x89PNG"), "denoise": 0.4}, CONTEXT)
    params = _params(request, Arch.of("sd15", False), init_image="up/a.png", image_size=(100, 71))
    assert (params.width, params.height, params.denoise, params.clip_skip) == (96, 64, 0.4, -2)
    assert [(l.name, l.strength_model) for l in params.loras] == [("tiny-lora-a.safetensors", 0.8),
                                                                   ("tiny-lora-b.safetensors", 0.3)]
    graph = build_workflow(params)
    assert graph["10"]["class_type"] == "CLIPSetLastLayer" and graph["12"]["inputs"]["image"] == "up/a.png"
    assert graph["lora2"]["inputs"]["clip"] == ["lora1", 1] and "5" not in graph
    assert request.stored()["image"] == {"filename": "a.png", "content_type": None, "bytes": 4}


@given(steps=st.integers(-5, 200), width=st.integers(0, 3000), cfg=st.floats(-1, 40, allow_nan=False))
def test_any_numbers_are_accepted_within_limits_or_refused_with_a_message(steps: int, width: int, cfg: float) -> None:
    try:
        request = parse_request({"prompt": "fox", "steps": steps, "width": width, "cfg": cfg}, CONTEXT)
    except RequestInvalid as err:
        assert str(err) and any(words in str(err) for words in ("outside", "multiple of 8", "above this server's limit",
                                                                "below this server's minimum"))
    else:
        assert 1 <= request.steps <= 150 and 64 <= request.width <= 2048 and request.width % 8 == 0


CN_CONTEXT = RequestContext(ALLOWED, CONTEXT.checkpoints, CONTEXT.loras,
                            controlnets=["control_v11p_sd15_canny.safetensors", "control_sd15_openpose.safetensors",
                                         "controlnet-sdxl-depth.safetensors"])
HINT = ImageUpload(filename="hint.png", content_type="image/png", data=b"\x89PNG")


@pytest.mark.parametrize(("options", "words"), [
    ({"control_image": HINT}, "control_image needs a ControlNet to guide with it: pick one with controlnet:"),
    ({"controlnet": "control_sd15_openpose"}, "controlnet 'control_sd15_openpose' needs a control image"),
    ({"control_image": HINT, "controlnet": "control_sd15_openpose", "control_strength": 2.01},
     "control_strength 2.01 is outside 0..2; 1 is ComfyUI's default"),
    ({"control_image": HINT, "controlnet": "control_sd15_openpose", "control_strength": -0.5},
     "control_strength -0.5 is outside 0..2"),
    ({"control_strength": 0.5}, "control_strength applies to a ControlNet; add controlnet: and control_image:"),
    ({"control_canny": True}, "control_canny applies to a ControlNet"),
    ({"control_image": ImageUpload(filename="a.gif", content_type="image/gif", data=b"GIF89a"),
      "controlnet": "control_sd15_openpose"}, "control_image: 'a.gif' is image/gif, not an image Noodle decodes"),
    ({"control_image": ImageUpload(filename="big.png", content_type="image/png", data=bytes(11 * 1024 * 1024)),
      "controlnet": "control_sd15_openpose"}, "control_image: 'big.png' is 11.5 MB; the limit is 10.5 MB"),
    ({"control_image": HINT, "controlnet": "control_sd15_openpose", "control_strength": "lots"},
     "control_strength 'lots' is not a number"),
])
def test_a_bad_controlnet_combination_is_refused_with_what_to_do(options: dict, words: str) -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_request({"prompt": "fox", **options}, CN_CONTEXT)
    assert words in str(caught.value)


def test_an_unknown_controlnet_names_the_closest_files() -> None:
    with pytest.raises(ModelNotFound, match="ControlNet 'control_sd15_canny' is not in models/controlnet; closest: "
                                            "'control_v11p_sd15_canny.safetensors'"):
        parse_request({"prompt": "fox", "controlnet": "control_sd15_canny", "control_image": HINT}, CN_CONTEXT)


def _control_params(options: dict, arch: Arch = Arch.of("sd15", False),  # type: ignore[no-untyped-def]
                    controlnet_arch: Arch | None = None):
    request = parse_request({"prompt": "fox", "control_image": HINT, **options}, CN_CONTEXT)
    return request.to_params(CN_CONTEXT, checkpoint="sd15.safetensors", arch=arch, seed=7,
                             control_image="uploads/hint.png", controlnet_arch=controlnet_arch)


def test_a_canny_controlnet_edge_detects_by_default_and_others_take_the_image_as_given() -> None:
    canny = _control_params({"controlnet": "control_v11p_sd15_canny"})
    assert (canny.controlnet, canny.control_canny, canny.control_strength) == (
        "control_v11p_sd15_canny.safetensors", True, 1.0)
    graph = build_workflow(canny)
    assert graph["21"]["class_type"] == "Canny" and graph["23"]["inputs"]["image"] == ["21", 0]
    assert graph["20"]["inputs"]["image"] == "uploads/hint.png"
    assert not _control_params({"controlnet": "control_v11p_sd15_canny", "control_canny": False}).control_canny
    pose = _control_params({"controlnet": "control_sd15_openpose", "control_strength": 0.6})
    assert not pose.control_canny and "21" not in build_workflow(pose)
    assert build_workflow(pose)["23"]["inputs"]["image"] == ["20", 0]
    assert _control_params({"controlnet": "control_sd15_openpose", "control_canny": True}).control_canny


def test_a_controlnet_for_another_family_is_refused_when_its_header_says_so() -> None:
    with pytest.raises(RequestInvalid, match=r"ControlNet 'controlnet-sdxl-depth.safetensors' is for SDXL "
                                             r"checkpoints and sd15 is SD1.x; pick a ControlNet made for SD1.x"):
        _control_params({"controlnet": "controlnet-sdxl-depth"}, controlnet_arch=Arch.of("sdxl", False))
    # no family known (controlnet_arch None, as for a pickle name): left to the engine's refusal when it runs
    assert _control_params({"controlnet": "controlnet-sdxl-depth"}).controlnet == "controlnet-sdxl-depth.safetensors"


def test_a_request_without_a_controlnet_or_transparency_makes_the_plain_graph() -> None:
    params = parse_request({"prompt": "fox"}, CONTEXT).to_params(CONTEXT, checkpoint="x.safetensors",
                                                                 arch=Arch.of("sd15", False), seed=1, inpaint=True)
    assert not params.inpaint and params.controlnet is None  # no image: nothing to inpaint
    graph = build_workflow(params)
    assert not {"15", "20", "21", "22", "23"} & set(graph)
    assert graph["3"]["inputs"]["positive"] == ["6", 0]


def test_stored_options_describe_the_control_image_never_its_bytes() -> None:
    request = parse_request({"prompt": "fox", "control_image": HINT, "controlnet": "control_sd15_openpose"},
                            CN_CONTEXT)
    assert request.stored()["control_image"] == {"filename": "hint.png", "content_type": "image/png", "bytes": 4}
