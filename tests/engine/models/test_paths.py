"""ModelCatalog: listing, safe name resolution and the refusals users see; fingerprints and A1111 hashes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import ModelNotFound, NoodleError, UnsafeModelFile, UnsupportedModel
from engine.models.paths import ModelCatalog, display_name, file_fingerprint


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    _touch(models / "checkpoints" / "sd15.safetensors")
    _touch(models / "checkpoints" / "sdxl_base_1.0.safetensors")
    _touch(models / "checkpoints" / "anime" / "pastel.safetensors")
    _touch(models / "checkpoints" / "old.ckpt")
    _touch(models / "checkpoints" / "notes.txt")
    _touch(models / "loras" / "style.safetensors")
    _touch(tmp_path / "outside.safetensors")
    return models


def test_a_safetensors_suffix_in_other_letters_is_not_listed_and_is_refused_with_its_new_name(root: Path) -> None:
    # diffusers' single-file loader reads 'X.SAFETENSORS' as a pickle and fails with an OSError quoting the path
    for name in ("Upper.SAFETENSORS", "Mixed.SafeTensors"):
        _touch(root / "checkpoints" / name)
    catalog = ModelCatalog(root)
    assert "Upper.SAFETENSORS" not in catalog.list("checkpoints")
    assert "Mixed.SafeTensors" not in catalog.list("checkpoints")
    with pytest.raises(UnsupportedModel, match=r"^checkpoint 'Mixed.SafeTensors' ends in '.SafeTensors'; .*rename "
                                               r"it to 'Mixed.safetensors'$"):
        catalog.resolve("checkpoints", "Mixed.SafeTensors")


def test_list_gives_sorted_posix_names_of_safetensors_only(root: Path) -> None:
    catalog = ModelCatalog(root)
    expected = ["anime/pastel.safetensors", "sd15.safetensors", "sdxl_base_1.0.safetensors"]
    assert catalog.list("checkpoints") == expected
    assert catalog.list("loras") == ["style.safetensors"]
    assert catalog.list("embeddings") == []  # folder does not exist yet


def test_list_includes_pickles_only_when_the_owner_allows_them(root: Path) -> None:
    assert "old.ckpt" not in ModelCatalog(root).list("checkpoints")
    assert "old.ckpt" in ModelCatalog(root, allow_weights_only_pickle=True).list("checkpoints")


def test_resolve_returns_the_file_inside_its_folder(root: Path) -> None:
    catalog = ModelCatalog(root)
    assert catalog.resolve("checkpoints", "sd15.safetensors") == (root / "checkpoints" / "sd15.safetensors").resolve()
    assert catalog.resolve("checkpoints", "anime/pastel.safetensors").name == "pastel.safetensors"


def test_windows_separators_from_comfyui_workflows_resolve_to_the_subfolder(root: Path) -> None:
    path = ModelCatalog(root).resolve("checkpoints", "anime\\pastel.safetensors")
    assert path == (root / "checkpoints" / "anime" / "pastel.safetensors").resolve()


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "anime/../../outside.safetensors", "..\\outside.safetensors"]
)
def test_dot_dot_is_refused_with_the_name_and_the_rule(root: Path, name: str) -> None:
    with pytest.raises(UnsafeModelFile) as err:
        ModelCatalog(root).resolve("checkpoints", name)
    assert repr(name) in str(err.value) and "'..'" in str(err.value) and "inside" in str(err.value)


@pytest.mark.parametrize("name", ["/etc/passwd", "C:\\models\\x.safetensors", "c:/x.safetensors"])
def test_absolute_paths_are_refused(root: Path, name: str) -> None:
    with pytest.raises(UnsafeModelFile, match="absolute path") as err:
        ModelCatalog(root).resolve("checkpoints", name)
    assert "relative to models/checkpoints" in str(err.value)


def test_symlink_leaving_the_folder_is_refused_and_not_listed(root: Path, tmp_path: Path) -> None:
    (root / "checkpoints" / "escape.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (root / "checkpoints" / "outdir").symlink_to(tmp_path, target_is_directory=True)
    catalog = ModelCatalog(root)
    for name in ("escape.safetensors", "outdir/outside.safetensors"):
        with pytest.raises(UnsafeModelFile, match="symlink whose target leaves models/checkpoints") as err:
            catalog.resolve("checkpoints", name)
        assert repr(name) in str(err.value)
    assert not any(n.startswith(("escape", "outdir")) for n in catalog.list("checkpoints"))


def test_symlink_staying_inside_the_folder_resolves(root: Path) -> None:
    (root / "checkpoints" / "alias.safetensors").symlink_to(root / "checkpoints" / "sd15.safetensors")
    catalog = ModelCatalog(root)
    assert catalog.resolve("checkpoints", "alias.safetensors").name == "sd15.safetensors"
    assert "alias.safetensors" in catalog.list("checkpoints")


@pytest.mark.parametrize("name", ["old.ckpt", "model.pt", "model.PTH", "pytorch_model.bin"])
def test_pickle_files_are_refused_with_the_reason_and_the_setting(root: Path, name: str) -> None:
    with pytest.raises(UnsafeModelFile) as err:
        ModelCatalog(root).resolve("checkpoints", name)
    message = str(err.value)
    assert repr(name) in message
    assert "pickle files can run code" in message
    assert "only .safetensors is loaded" in message
    assert "models.allow_weights_only_pickle = true" in message and "config.toml" in message


def test_pickle_files_resolve_when_the_owner_allows_weights_only_loading(root: Path) -> None:
    path = ModelCatalog(root, allow_weights_only_pickle=True).resolve("checkpoints", "old.ckpt")
    assert path.name == "old.ckpt"


def test_missing_name_lists_the_closest_names(root: Path) -> None:
    with pytest.raises(ModelNotFound) as err:
        ModelCatalog(root).resolve("checkpoints", "sdxl-bse.safetensors")
    assert str(err.value).startswith("checkpoint 'sdxl-bse.safetensors' is not in models/checkpoints; closest:")
    assert "'sdxl_base_1.0.safetensors'" in str(err.value)


def test_other_file_types_are_refused_as_unsupported(root: Path) -> None:
    with pytest.raises(UnsupportedModel, match="only .safetensors"):
        ModelCatalog(root).resolve("checkpoints", "notes.txt")


def test_unknown_folder_is_a_programming_error(root: Path) -> None:
    with pytest.raises(ValueError, match="checkpoints, loras, vae, embeddings"):
        ModelCatalog(root).resolve("styles", "x.safetensors")


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(max_size=80))
def test_any_name_resolves_inside_its_folder_or_fails_with_a_message(root: Path, name: str) -> None:
    base = (root / "checkpoints").resolve()
    try:
        path = ModelCatalog(root).resolve("checkpoints", name)
    except NoodleError as err:
        assert str(err)
    else:
        assert path.is_relative_to(base) and path.is_file()


def test_fingerprint_changes_when_the_file_is_rewritten(tmp_path: Path) -> None:
    path = _touch(tmp_path / "m.safetensors", b"one")
    before = file_fingerprint(path)
    path.write_bytes(b"other")
    assert file_fingerprint(path) != before


def test_short_hash_is_a1111_model_hash_and_follows_the_file(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    path = _touch(tmp_path / "m.safetensors", data)
    catalog = ModelCatalog(tmp_path)
    assert catalog.short_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    path.write_bytes(b"changed")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert catalog.short_hash(path) == hashlib.sha256(b"changed").hexdigest()[:10]


@pytest.mark.parametrize(("name", "shown"), [
    ("tiny-sd15.safetensors", "tiny-sd15"), ("anime/sub/detail.safetensors", "detail"), ("plain", "plain"),
    ("old.ckpt", "old.ckpt"),  # only .safetensors is dropped: a pickle keeps its suffix, so it shows as one
])
def test_display_name_drops_the_folder_and_safetensors_only(name: str, shown: str) -> None:
    assert display_name(name) == shown
