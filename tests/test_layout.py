"""The layout shows the flow: imports point downstream (bot -> engine -> prompts), modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"engine": {"bot"}, "prompts": {"bot", "engine"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_downstream(package: str) -> None:
    offenders = [f"{path.relative_to(REPO)} imports {sorted(imported_packages(path) & FORBIDDEN[package])}"
                 for path in sorted((REPO / package).rglob("*.py"))
                 if imported_packages(path) & FORBIDDEN[package]]
    assert not offenders, offenders


def test_no_weights_in_the_tree() -> None:
    tracked = [p for p in REPO.rglob("*") if p.suffix in {".safetensors", ".ckpt", ".pt", ".bin"}
               and ".cache" not in p.parts and ".venv" not in p.parts and "output" not in p.parts]
    assert not tracked, tracked
