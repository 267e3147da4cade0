"""Stored params: what 🔁 and 🔀 read back, versioned, migrated, typed, and refused by name when they do not fit."""

from __future__ import annotations

import json

import pytest

from bot.core.storage.params import PARAMS_VERSION, StoredParamsInvalid, dump_params, load_params
from engine.nodes.base import SEED_MAX
from engine.templates import LoraChoice, WorkflowParams

PARAMS = WorkflowParams(checkpoint="tiny-sd15.safetensors", prompt="a fox", seed=SEED_MAX, cfg=6.5,
                        loras=(LoraChoice("tiny-lora-a.safetensors", 0.8, 0.4),), clip_skip=-2,
                        init_image="uploads/ab.png", denoise=0.55)


def test_params_survive_json_whole_and_typed() -> None:
    stored = json.loads(json.dumps(dump_params(PARAMS)))  # what SQLite's params_json gives back
    assert stored["version"] == PARAMS_VERSION
    loaded = load_params(stored)
    assert loaded == PARAMS and isinstance(loaded.loras[0], LoraChoice) and loaded.seed == SEED_MAX


def test_a_row_from_before_versions_is_migrated() -> None:
    old = {k: v for k, v in json.loads(json.dumps(dump_params(PARAMS))).items() if k != "version"}
    assert load_params({**old, "extra": {}}) == PARAMS


def test_a_field_without_a_migration_is_refused_by_name() -> None:
    stored = dump_params(PARAMS)
    stored["cfg_scale"] = stored.pop("cfg")
    with pytest.raises(StoredParamsInvalid, match="cfg_scale, which WorkflowParams has no field for"):
        load_params(stored)


@pytest.mark.parametrize("version", [PARAMS_VERSION + 1, -1, "1"])
def test_a_version_this_noodle_does_not_know_is_refused(version: object) -> None:
    with pytest.raises(StoredParamsInvalid, match="not one this Noodle reads"):
        load_params({**dump_params(PARAMS), "version": version})


def test_a_value_of_the_wrong_type_is_refused_with_its_field() -> None:
    with pytest.raises(StoredParamsInvalid, match="steps"):
        load_params({**dump_params(PARAMS), "steps": "many"})
    with pytest.raises(StoredParamsInvalid, match="checkpoint"):
        load_params({k: v for k, v in dump_params(PARAMS).items() if k != "checkpoint"})


def test_a_version_1_row_migrates_with_no_controlnet_and_no_inpaint() -> None:
    """Version 2 added the ControlNet and inpaint fields; a v1 row had neither and rerolls as it ran then, even
    when its init image has transparency (v1 made plain img2img of it)."""
    new = ("inpaint", "control_image", "controlnet", "control_strength", "control_canny")
    v1 = {k: v for k, v in json.loads(json.dumps(dump_params(PARAMS))).items() if k not in new}
    assert load_params({**v1, "version": 1}) == PARAMS
    loaded = load_params({**v1, "version": 1})
    assert (loaded.inpaint, loaded.controlnet, loaded.control_image, loaded.control_strength,
            loaded.control_canny) == (False, None, None, 1.0, False)


def test_the_controlnet_and_inpaint_fields_survive_json() -> None:
    params = WorkflowParams(checkpoint="tiny-sd15.safetensors", prompt="a fox", init_image="uploads/ab.png",
                            inpaint=True, control_image="uploads/cd.png", controlnet="tiny-controlnet-sd15.safetensors",
                            control_strength=0.65, control_canny=True)
    stored = json.loads(json.dumps(dump_params(params)))
    assert stored["version"] == PARAMS_VERSION and load_params(stored) == params
