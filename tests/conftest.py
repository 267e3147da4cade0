"""Shared fixtures: offline mode for every test, and the tiny models built once per run into a cache."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: no test may reach a model hub (none is reachable anyway,
# and a lookup would only add a timeout).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY_MODELS_DIR = Path(__file__).parents[1] / ".cache" / "tiny-models"


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """A models folder (checkpoints/, loras/, vae/, embeddings/) holding the tiny test models.

    Built by `engine.tiny.write_tiny_models` into .cache/tiny-models and reused across runs until
    the generator's format version changes.
    """
    from engine.tiny import write_tiny_models

    write_tiny_models(TINY_MODELS_DIR)
    return TINY_MODELS_DIR


def tiny_executor(models: Path, root: Path, limits: object | None = None):  # type: ignore[no-untyped-def]
    """An executor over `models`, writing into root/output and reading root/input.

    On the CPU, where the expected numbers were measured; NOODLE_TEST_DEVICE=cuda runs the same tests
    on a GPU in fp16, to find what breaks there (exact-pixel comparisons may then differ slightly).
    """
    from engine.executor import create_executor
    from engine.settings import EngineSettings, Limits, ModelsSettings

    for name in ("output", "input"):
        (root / name).mkdir(parents=True, exist_ok=True)
    settings = EngineSettings(output_dir=root / "output", input_dir=root / "input",
                              device=os.environ.get("NOODLE_TEST_DEVICE", "cpu"))
    return create_executor(ModelsSettings(dir=models), settings, limits or Limits())  # type: ignore[arg-type]
