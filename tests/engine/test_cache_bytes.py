"""Memory bounds: the node cache by the bytes of its tensors ([engine] node_cache_bytes), merged models in the
model manager's budget ([engine] model_memory_bytes), each evicting the least recently used first."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from engine.cache import CacheEntry, OutputCache, nbytes_of, node_cache_budget
from engine.device import memory_budget
from engine.executor import Executor
from engine.executor import create_executor
from engine.settings import EngineSettings, Limits, ModelsSettings
from engine.values import CondItem, Conditioning, ImageBatch, Latent, ModelRef
from tests.engine.conftest import txt2img

MIB = 2**20


def latent_of(mib: int) -> Latent:
    return Latent(torch.zeros(mib, 4, 256, 256))  # 4 * 256 * 256 float32 = 1 MiB per item


def engine(tiny_models: Path, root: Path, **settings: Any) -> Executor:
    """An executor of its own (own caches, own model manager) with these [engine] settings."""
    return create_executor(ModelsSettings(dir=tiny_models), EngineSettings(
        output_dir=root / "output", input_dir=root / "input", device="cpu", **settings), Limits())


def test_tensor_sizes_count_whole_storages_once_and_model_handles_not_at_all(executor: Executor) -> None:
    embeds, pooled, ids = torch.zeros(1, 77, 32), torch.zeros(1, 32), torch.zeros(1, 6)
    conditioning = Conditioning((CondItem(embeds, pooled, {"time_ids": ids}),))
    assert nbytes_of((conditioning,)) == (77 * 32 + 32 + 6) * 4
    batch = latent_of(4)
    # a LatentFromBatch-style slice keeps its whole batch alive, and the batch is not counted twice
    assert nbytes_of((Latent(batch.samples[:1], (0,)), batch)) == 4 * MIB
    assert nbytes_of((ImageBatch(torch.zeros(2, 64, 64, 3)),)) == 2 * 64 * 64 * 3 * 4
    loaded = executor.models.checkpoint("tiny-sd15.safetensors")
    assert nbytes_of((ModelRef(loaded, loaded.pipe), loaded.pipe.vae)) == 0


def test_the_output_cache_evicts_the_least_recently_used_past_its_byte_budget() -> None:
    cache = OutputCache(max_entries=100, max_bytes=int(2.5 * MIB))
    cache.put("a", CacheEntry((latent_of(1),), {}))
    cache.put("b", CacheEntry((latent_of(1),), {}))
    assert cache.nbytes == 2 * MIB
    assert cache.get("a") is not None  # a is now the most recent: b goes first
    cache.put("c", CacheEntry((latent_of(1),), {}))
    assert (cache.get("b"), cache.nbytes, cache.evictions) == (None, 2 * MIB, 1)
    assert cache.get("a") is not None and cache.get("c") is not None
    # one value over the whole budget is not kept, and pushes nothing out
    cache.put("huge", CacheEntry((latent_of(3),), {}))
    assert (cache.get("huge"), cache.too_big, len(cache), cache.nbytes) == (None, 1, 2, 2 * MIB)
    cache.put("a", CacheEntry((latent_of(2),), {}))  # a new value under a kept key replaces it
    assert cache.nbytes == 2 * MIB and cache.get("c") is None  # c went to make room for the bigger a
    cache.clear()
    assert (len(cache), cache.nbytes) == (0, 0)


def test_a_real_run_keeps_its_node_outputs_within_the_byte_budget(tiny_models: Path, tmp_path: Path) -> None:
    # on the tiny models: each prompt's conditioning is 9,856 bytes, a 64x64 latent 1,024, its image 49,152
    budget = 25_000
    executor = engine(tiny_models, tmp_path, node_cache_bytes=budget)
    assert executor.cache.max_bytes == budget
    executor.run(txt2img(prompt="a red fox"))
    assert executor.cache.nbytes == 2 * 9_856 + 2 * 1_024 and executor.cache.too_big == 1  # the image: too big
    again = executor.run(txt2img(prompt="a red fox")).meta["cached"]
    assert "8" not in again and {"3", "6", "7"} <= set(again)  # VAEDecode ran again, the rest came from cache

    executor.run(txt2img(prompt="a grey wolf"))  # a third conditioning does not fit beside the other two
    assert executor.cache.nbytes <= budget and executor.cache.evictions >= 1
    back = executor.run(txt2img(prompt="a red fox", seed=43)).meta["cached"]
    assert "6" not in back and "7" in back  # the fox's encoding was the least recently used; the negative stayed


def merged_txt2img(seed: int) -> dict[str, Any]:
    """txt2img sampling with merge(tiny-sd15, tiny-sd15-b, 0.5) as its model."""
    graph = copy.deepcopy(txt2img(seed=seed))
    graph["10"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15-b.safetensors"}}
    graph["11"] = {"class_type": "ModelMergeSimple", "inputs": {"model1": ["4", 0], "model2": ["10", 0],
                                                                "ratio": 0.5}}
    graph["3"]["inputs"]["model"] = ["11", 0]
    return graph


def test_a_merge_counts_in_the_model_budget_and_is_evicted_as_the_least_recently_used(
        tiny_models: Path, tmp_path: Path) -> None:
    a, b = "tiny-sd15.safetensors", "tiny-sd15-b.safetensors"
    # measured on a fresh engine: the session executor's UNet may carry LoRA adapters from other tests
    checkpoint = engine(tiny_models, tmp_path / "measure").models.checkpoint(a)
    unet = sum(p.numel() * p.element_size() for p in checkpoint.pipe.unet.parameters())
    # room for both checkpoints, or for one and a merge: not for all three
    budget = 2 * checkpoint.nbytes + unet // 2
    limited = engine(tiny_models, tmp_path, model_memory_bytes=budget)
    models = limited.models

    limited.run(merged_txt2img(seed=1))
    assert models.loaded_names() == [a] and models.merge_labels() == [f"merge({a}, {b}, 0.5)"]
    assert models.stats.evictions == 1  # b made room for the merge; a stays, the merge shares its VAE and CLIP
    assert models.resident_bytes() == checkpoint.nbytes + unet <= budget

    limited.run(txt2img(seed=2))  # a runs again: now the merge is the least recently used
    limited.run(txt2img(seed=3, checkpoint=b))
    assert models.loaded_names() == [a, b] and models.merge_labels() == []
    assert models.stats.evictions == 2 and models.resident_bytes() == 2 * checkpoint.nbytes

    cached = limited.run(merged_txt2img(seed=1)).meta["cached"]
    assert "11" not in cached and "4" in cached  # the evicted merge's output left the node cache with it


def test_the_automatic_node_cache_budget_is_a_share_of_the_machine_at_most_2_gib() -> None:
    cpu = torch.device("cpu")
    automatic = node_cache_budget(0, cpu)
    assert 0 < automatic <= min(2 * 1024**3, memory_budget(cpu) // 8)
    assert node_cache_budget(12345, cpu) == 12345
