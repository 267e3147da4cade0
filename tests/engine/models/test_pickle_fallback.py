"""Pickle names in shared workflows: `v1-5-pruned-emaonly.ckpt` runs on `v1-5-pruned-emaonly.safetensors` beside it,
validation accepts the name then, the run's meta says which file ran; without that file the refusal says how to fix
it. Loading stays safetensors-only."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from engine.errors import UnsafeModelFile, WorkflowInvalid
from engine.models.paths import ModelCatalog
from engine.nodes import catalog
from engine.settings import Limits
from engine.validate import validate
from tests.conftest import tiny_executor
from tests.engine.conftest import txt2img


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # a hard link: the same bytes, no copy, and no symlink leaving the folder
    except OSError:
        shutil.copyfile(source, target)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    for name in ("checkpoints/v1-5-pruned-emaonly.safetensors", "checkpoints/sd/anime.safetensors",
                 "loras/detail.safetensors"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / "checkpoints" / "only-pickle.ckpt").write_bytes(b"x")
    return root


@pytest.mark.parametrize(("name", "expected"), [
    ("v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors"),
    ("v1-5-pruned-emaonly.CKPT", "v1-5-pruned-emaonly.safetensors"),
    ("sd/anime.pt", "sd/anime.safetensors"),
    ("sd\\anime.pth", "sd/anime.safetensors"),  # a Windows export's subfolder spelling
    ("sd/anime.bin", "sd/anime.safetensors"),
])
def test_a_pickle_name_resolves_to_the_safetensors_of_the_same_stem(models: Path, name: str, expected: str) -> None:
    catalog_ = ModelCatalog(models)
    assert catalog_.safetensors_for("checkpoints", name) == expected
    assert catalog_.resolve("checkpoints", name) == (models / "checkpoints" / expected).resolve()


def test_no_substitute_for_other_names_or_other_folders(models: Path) -> None:
    catalog_ = ModelCatalog(models)
    assert catalog_.safetensors_for("checkpoints", "v1-5-pruned-emaonly.safetensors") is None
    assert catalog_.safetensors_for("checkpoints", "missing.ckpt") is None
    assert catalog_.safetensors_for("loras", "v1-5-pruned-emaonly.ckpt") is None  # same stem, other folder
    assert catalog_.list("checkpoints") == ["sd/anime.safetensors", "v1-5-pruned-emaonly.safetensors"]


def test_a_pickle_name_that_leaves_its_folder_is_still_refused(models: Path) -> None:
    (models.parent / "outside.safetensors").write_bytes(b"x")
    with pytest.raises(UnsafeModelFile, match="'..'"):
        ModelCatalog(models).resolve("checkpoints", "../outside.ckpt")


def test_a_pickle_without_its_safetensors_is_refused_with_the_convert_command(models: Path) -> None:
    with pytest.raises(UnsafeModelFile) as err:
        ModelCatalog(models).resolve("checkpoints", "only-pickle.ckpt")
    message = str(err.value)
    assert "pickle files can run code" in message and "only .safetensors is loaded" in message
    assert f"`noodle convert {(models / 'checkpoints' / 'only-pickle.ckpt').as_posix()}`" in message
    assert "only-pickle.safetensors" in message and "download the .safetensors release" in message


def test_a_pickle_name_with_no_file_at_all_says_which_safetensors_to_put_there(models: Path) -> None:
    with pytest.raises(UnsafeModelFile) as err:
        ModelCatalog(models).resolve("checkpoints", "sd14.ckpt")
    assert "put sd14.safetensors (the .safetensors release of the same model) in models/checkpoints" in str(err.value)


def _loader(name: str) -> dict[str, Any]:
    return {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["4", 2]}},
            "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}}


def test_validation_accepts_a_pickle_name_when_its_safetensors_is_listed() -> None:
    listed = ["sd/anime.safetensors", "v1-5-pruned-emaonly.safetensors"]
    for name in ("v1-5-pruned-emaonly.ckpt", "sd\\anime.pth"):
        prompt = validate(_loader(name), catalog(), lambda folder: listed, Limits())
        assert prompt.constants["4"]["ckpt_name"] == name  # the name stays as the workflow gave it


def test_validation_refuses_a_lone_pickle_name_and_says_how_to_fix_it() -> None:
    with pytest.raises(WorkflowInvalid) as err:
        validate(_loader("sd14.ckpt"), catalog(), lambda folder: ["sd15.safetensors"], Limits())
    [error] = err.value.body["node_errors"]["4"]["errors"]
    assert error["type"] == "value_not_in_list"
    assert error["details"] == (
        "ckpt_name: 'sd14.ckpt' not in ['sd15.safetensors']; 'sd14.ckpt' is a pickle file, and Noodle loads only "
        ".safetensors: it runs such a name on sd14.safetensors in checkpoints/ when that file is there. Convert the "
        "pickle once with `noodle convert <models>/checkpoints/sd14.ckpt`, or download the .safetensors release")


def test_a_plain_missing_name_gets_no_pickle_hint() -> None:
    with pytest.raises(WorkflowInvalid) as err:
        validate(_loader("sd14.safetensors"), catalog(), lambda folder: ["sd15.safetensors"], Limits())
    [error] = err.value.body["node_errors"]["4"]["errors"]
    assert error["details"] == "ckpt_name: 'sd14.safetensors' not in ['sd15.safetensors']"


def test_a_workflow_naming_pickles_runs_on_the_safetensors_and_its_meta_says_so(tiny_models: Path,
                                                                               tmp_path: Path) -> None:
    models = tmp_path / "models"
    _place(tiny_models / "checkpoints" / "tiny-sd15.safetensors",
           models / "checkpoints" / "v1-5-pruned-emaonly.safetensors")
    _place(tiny_models / "loras" / "tiny-lora-a.safetensors", models / "loras" / "detail.safetensors")
    executor = tiny_executor(models, tmp_path / "run")
    workflow = txt2img(checkpoint="v1-5-pruned-emaonly.ckpt", loras=[("detail.pt", 0.8, 0.8)])
    assert json.dumps(workflow).count(".ckpt") == 1 and "detail.pt" in json.dumps(workflow)

    result = executor.run(workflow)
    assert result.meta["models"]["substituted"] == {
        "checkpoints": {"v1-5-pruned-emaonly.ckpt": "v1-5-pruned-emaonly.safetensors"},
        "loras": {"detail.pt": "detail.safetensors"}}
    assert result.meta["notes"] == [
        "checkpoints: 'v1-5-pruned-emaonly.ckpt' ran on 'v1-5-pruned-emaonly.safetensors' "
        "(Noodle loads .safetensors only)",
        "loras: 'detail.pt' ran on 'detail.safetensors' (Noodle loads .safetensors only)"]
    # the hash is the file that ran
    entry = result.meta["models"]["checkpoints"]["v1-5-pruned-emaonly.ckpt"]
    ran = models / "checkpoints" / "v1-5-pruned-emaonly.safetensors"
    assert entry["hash"] == executor.models.catalog.short_hash(ran)

    again = executor.run(workflow)  # served from the node cache: the note is still there
    assert again.meta["models"]["substituted"] == result.meta["models"]["substituted"]
    plain = executor.run(txt2img(checkpoint="v1-5-pruned-emaonly.safetensors",
                                 loras=[("detail.safetensors", 0.8, 0.8)]))
    assert "substituted" not in plain.meta["models"] and "notes" not in plain.meta
    pixels = _pixels(executor, result)
    assert pixels and pixels == _pixels(executor, plain)  # the same weights ran


def _pixels(executor: Any, result: Any) -> list[bytes]:
    from PIL import Image

    from engine.executor import written_paths

    return [Image.open(path).tobytes() for ui in result.outputs.values()
            for path in written_paths(executor.settings.output_dir, ui)]
