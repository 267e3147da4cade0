"""Each `prompts` module holds one idea; past ~400 lines it holds two (DESIGN)."""

from __future__ import annotations

from pathlib import Path

import prompts


def test_modules_stay_under_400_lines() -> None:
    folder = Path(prompts.__file__).parent
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in folder.rglob("*.py")}
    assert all(n < 400 for n in sizes.values()), sizes
