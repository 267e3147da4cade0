"""Building an engine from settings: the catalog of model files, the manager, the executor."""

from __future__ import annotations

from engine.device import memory_budget, pick_device, pick_dtype
from engine.executor import Executor
from engine.models.hashes import hash_book
from engine.models.manager import ModelManager
from engine.models.paths import ModelCatalog
from engine.settings import EngineSettings, Limits, ModelsSettings


def create_executor(models: ModelsSettings, engine: EngineSettings, limits: Limits) -> Executor:
    """One executor with its own model manager and output cache, on the configured device."""
    device = pick_device(engine.device)
    hash_book.use_file(models.hash_cache)
    manager = ModelManager(
        ModelCatalog(models.dir, allow_weights_only_pickle=models.allow_weights_only_pickle),
        device=device,
        dtype=pick_dtype(engine.dtype, device),
        memory_budget=memory_budget(device, engine.model_memory_bytes),
        input_dir=engine.input_dir,
    )
    return Executor(manager, engine, limits)
