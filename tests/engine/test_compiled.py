"""[engine] compile: the tiny UNet through a real inductor compile (about a minute on 2 cores, once a module).

The compiled picture is the eager one up to float rounding; a new seed or a longer prompt never compiles again; a
run with a LoRA stays eager (bit for bit); another UNet of the same shapes gets its own weights; inductor's caches
land in [engine] compile_cache; an unloaded UNet is freed with its compiled forward.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from engine.executor import Executor, create_executor
from engine.models.compiled import FROZEN_GRAPH_SHARE, UnetCompiler
from engine.settings import EngineSettings, Limits, ModelsSettings
from engine.values import ModelRef
from tests.conftest import TINY_MODELS_DIR, tiny_executor
from tests.engine.conftest import txt2img

LONG_PROMPT = ", ".join(["a red fox in the deep snow under a pale winter sky"] * 10)  # 2 chunks of 75 tokens


@pytest.fixture(scope="module")
def compiled(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    root = tmp_path_factory.mktemp("compiled")
    # the inductor cache beside the tiny models, kept between test runs as they are
    settings = EngineSettings(output_dir=root / "output", input_dir=root / "input", device="cpu", compile=True,
                              compile_cache=TINY_MODELS_DIR.parent / "torch-compile")
    return create_executor(ModelsSettings(dir=tiny_models), settings, Limits())


def _picture(executor: Executor, workflow: dict) -> np.ndarray:
    image = executor.run(workflow).to_dict()["outputs"]["9"]["images"][0]
    path = executor.settings.output_dir / image["subfolder"] / image["filename"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def test_the_compiled_unet_draws_the_eager_picture_and_a_new_seed_or_prompt_never_recompiles(
        compiled: Executor, executor: Executor) -> None:
    before = _graphs()
    _picture(compiled, txt2img(seed=1))
    after_first = _graphs()
    assert after_first > before, "the first run compiled nothing: the compiled forward was not used"

    workflow = txt2img(seed=2, prompt=LONG_PROMPT)
    compiled_pixels = _picture(compiled, workflow)
    assert _graphs() == after_first, "a new seed and a 2-chunk prompt compiled new graphs"
    eager_pixels = _picture(executor, workflow)
    assert np.abs(compiled_pixels - eager_pixels).max() <= 2  # float rounding, not another picture

    cache = compiled.models.compiler.cache_dir
    assert cache is not None and any(p.is_file() for p in cache.rglob("*"))


def test_a_lora_run_stays_eager_and_equal_to_the_eager_engine(compiled: Executor, executor: Executor) -> None:
    workflow = txt2img(seed=3, loras=[("tiny-lora-a.safetensors", 0.8, 0.8)])
    before = _graphs()
    assert np.array_equal(_picture(compiled, workflow), _picture(executor, workflow))
    assert _graphs() == before


class _Block(torch.nn.Module):
    """A stand-in UNet: compiles in seconds, called as the UNet is."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.conv(x) * t.reshape(-1, 1, 1, 1)


def test_another_unet_of_the_same_shapes_is_compiled_with_its_own_weights(tmp_path: Path) -> None:
    # frozen, as on the CPU: the graph holds its UNet's weights as constants, so a graph cached for the same shapes
    # must not lend one checkpoint's weights to another file of the same architecture (each is its own module). The
    # stand-in compiles in seconds where a second tiny UNet took 35 s; the guard that decides is the same
    compiler = UnetCompiler(tmp_path / "cache", freeze=True)
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 0.5)
    first, second = _Block(), _Block()
    with torch.inference_mode():
        first_out = compiler.forward(first)(x, t)
        second_out = compiler.forward(second)(x, t)
        assert torch.allclose(first_out, first(x, t), atol=1e-5)
        assert torch.allclose(second_out, second(x, t), atol=1e-5)
        assert (first_out - second_out).abs().max() > 0.1  # the two blocks' weights draw apart


def test_an_unloaded_unet_is_freed_with_its_compiled_forward(tmp_path: Path) -> None:
    # unfrozen, as on a GPU: nothing but the module holds its compiled forward (a registry keyed by the module kept
    # every unloaded UNet alive, since the compiled module holds its UNet)
    compiler = UnetCompiler(tmp_path / "cache", freeze=False)
    block = _Block()
    forward = compiler.forward(block)
    with torch.inference_mode():
        out = forward(torch.ones(2, 4, 8, 8), torch.full((2,), 0.5))
        assert torch.allclose(out, block(torch.ones(2, 4, 8, 8), torch.full((2,), 0.5)), atol=1e-5)
    held = block.__dict__["_noodle_compiled"]
    compiler.forward(block)
    assert block.__dict__["_noodle_compiled"] is held  # compiled once, reused
    module, weight = weakref.ref(block), weakref.ref(block.conv.weight)
    compiler.forget(block)
    del block, forward, held
    gc.collect()
    assert module() is None and weight() is None


class _Mixed(torch.nn.Module):
    """A stand-in whose frozen graph keeps its weights both ways: a Linear's (a view of it, as a constant) and a
    conv's (a prepacked copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.conv(x) + self.proj(x.reshape(-1, 8)).reshape(x.shape) * t.reshape(-1, 1, 1, 1)


def _frozen_constants() -> int:
    """Tensors held by the modules inductor generated (a frozen graph's constants live there)."""
    return sum(isinstance(value, torch.Tensor) for name, module in list(sys.modules.items())
               if name.startswith("torch._inductor.runtime.compile_tasks.") for value in vars(module).values())


def test_forgetting_a_frozen_unet_frees_its_weights_and_the_others_compile_again(tmp_path: Path) -> None:
    # frozen, as on the CPU: dynamo's cache entries kept the traced graph (the original weights) and the generated
    # module the frozen constants, after the module was gone; forget clears both
    compiler = UnetCompiler(tmp_path / "cache", freeze=True)
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 0.5)
    gone, kept = _Mixed(), _Mixed()
    with torch.inference_mode():
        compiler.forward(gone)(x, t)
        compiler.forward(kept)(x, t)
        graphs = _graphs()
        compiler.forget(_Mixed())  # loaded, never compiled (a LoRA run, say): the compiled graphs stay
        compiler.forward(kept)(x, t)
        assert _graphs() == graphs
    assert _frozen_constants() > 0
    held = [weakref.ref(gone), *(weakref.ref(p) for p in gone.parameters())]
    compiler.forget(gone)
    del gone
    gc.collect()
    assert [ref() is None for ref in held] == [True] * len(held)
    assert _frozen_constants() == 0
    with torch.inference_mode():  # the other UNet compiles again, with its own weights
        before = _graphs()
        assert torch.allclose(compiler.forward(kept)(x, t), kept(x, t), atol=1e-5)
        assert _graphs() > before


def test_a_frozen_graphs_copy_of_the_weights_counts_in_the_model_budget(
        tiny_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # frozen, each size's graph keeps a copy of the UNet's weights (prepacked): the model budget counts it, evicts
    # other models for it, then older graphs, and a size that still does not fit runs eager
    models = tiny_executor(tiny_models, tmp_path).models
    models.compiler = UnetCompiler(tmp_path / "cache", freeze=True)
    first = models.checkpoint("tiny-sd15.safetensors")
    models.checkpoint("tiny-sd15-b.safetensors")
    block = _Mixed()
    copy = int(FROZEN_GRAPH_SHARE * sum(p.numel() * p.element_size() for p in block.parameters()))
    models.memory_budget = models.resident_bytes() + copy  # both checkpoints and one graph
    forward = models.unet_forward(ModelRef(first, first.pipe), block, hooked=False)
    assert forward is not None
    t = torch.full((2,), 0.5)

    def run(size: int) -> None:
        x = torch.randn(2, 4, size, size)
        with torch.inference_mode():
            assert torch.allclose(forward(x, t), block(x, t), atol=1e-5)

    run(8)
    assert models.compiler.nbytes == copy and len(models.loaded_names()) == 2
    run(16)  # a second graph: the other checkpoint goes, not the one sampling
    assert models.loaded_names() == ["tiny-sd15.safetensors"] and models.compiler.nbytes == 2 * copy
    models.memory_budget = models.resident_bytes()
    run(24)  # nothing else to evict: the older graphs go, and this one compiles
    assert models.compiler.nbytes == copy and models.loaded_names() == ["tiny-sd15.safetensors"]
    models.memory_budget = first.nbytes + copy - 1
    before = _graphs()
    with caplog.at_level(logging.WARNING, logger="engine.models.compiled"):
        run(32)  # its copy alone is over: it runs eager, and the checkpoint stays
        run(32)  # said once
    assert _graphs() == before and models.compiler.nbytes == 0
    assert sum("run eager" in r.getMessage() for r in caplog.records) == 1
    assert models.loaded_names() == ["tiny-sd15.safetensors"]
    assert "run eager" in caplog.text and "model_memory_bytes" in caplog.text


class _Sized(torch.nn.Module):
    """A stand-in of its own (its forward's code object counts its own compiles)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.conv(x) + t.reshape(-1, 1, 1, 1)


def test_the_compilers_recompile_limit_holds_in_the_engines_own_thread(tmp_path: Path) -> None:
    # torch keeps its config per context, and the engine samples in a thread of its own (engine/queue/worker.py):
    # a limit set when the executor was made never reached it, and it compiled 8 sizes at most. A limit of 1, below
    # torch's 8, shows whose limit counts there: the second size runs eager
    compiler = UnetCompiler(tmp_path / "cache", freeze=False, recompile_limit=1)
    module = _Sized()
    forward = compiler.forward(module)
    right: list[bool] = []

    def engine_thread() -> None:
        with torch.inference_mode():
            for side in (4, 5):
                x, t = torch.ones(2, 4, side, side), torch.full((2,), 0.5)
                right.append(torch.allclose(forward(x, t), module(x, t), atol=1e-5))

    before = _graphs()
    thread = threading.Thread(target=engine_thread)
    thread.start()
    thread.join()
    assert right == [True, True]
    assert _graphs() == before + 1
