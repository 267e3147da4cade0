"""`noodle convert`: pickle model files become .safetensors beside them through torch's weights-only loader, with
the nesting ComfyUI's loaders unwrap, one progress line per file and a clear error per bad one."""

from __future__ import annotations

import argparse
import collections
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import add_engine_commands
from engine.errors import UnsafeModelFile
from engine.models.convert import ConvertError, convert_file, convert_files, unwrap_state_dict
from engine.models.paths import ModelCatalog
from engine.settings import EngineSettings, Limits, ModelsSettings


class Payload:
    """Stands for whatever a pickle may carry besides tensors (a class torch's weights-only loader refuses)."""


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4)}


def _same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_a_lightning_checkpoint_loses_its_state_dict_level_and_its_bookkeeping(tmp_path: Path) -> None:
    source = tmp_path / "checkpoints" / "v1-5-pruned-emaonly.ckpt"
    source.parent.mkdir()
    torch.save({"state_dict": _weights(), "global_step": 470000, "epoch": 3}, source)
    done = convert_file(source)
    assert done.target == source.with_suffix(".safetensors")
    assert _same(load_file(done.target), _weights())
    assert done.dropped == ()  # the bookkeeping sat beside state_dict, which was taken whole
    assert done.line() == f"{source} -> v1-5-pruned-emaonly.safetensors: 2 tensors, 0.0 MB"
    # and the workflow's pickle name now runs on it
    assert ModelCatalog(tmp_path).resolve("checkpoints", "v1-5-pruned-emaonly.ckpt") == done.target.resolve()


@pytest.mark.parametrize("nesting", [
    lambda w: {"params_ema": w, "params": {k: torch.zeros_like(v) for k, v in w.items()}},  # Real-ESRGAN
    lambda w: {"params": w},
    lambda w: {"state_dict": {"state_dict": w}},
    lambda w: {"model": w},  # one entry holding a dict: ComfyUI's load_torch_file takes it
    lambda w: w,
])
def test_the_nesting_comfyuis_loaders_unwrap(nesting, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert _same(unwrap_state_dict(nesting(_weights())), _weights())
    source = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save(nesting(_weights()), source)
    assert _same(load_file(convert_file(source).target), _weights())


def test_non_tensor_entries_are_left_out_and_named(tmp_path: Path) -> None:
    source = tmp_path / "lora.pt"
    torch.save({**_weights(), "alpha_note": 4, "version": "1.0"}, source)
    done = convert_file(source)
    assert done.dropped == ("alpha_note", "version")
    assert "left out 2 non-tensor entries (alpha_note, version)" in done.line()
    assert set(load_file(done.target)) == {"conv.weight", "conv.bias"}


def test_shared_and_viewed_tensors_are_written_as_their_own_copies(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32)
    tied = torch.randn(3, 2)
    source = tmp_path / "tied.bin"
    # a transposed view (not contiguous), two slices of one storage, and one tensor under two names
    torch.save(collections.OrderedDict(
        t=tied.t(), first=base[:6], second=base[6:], emb=tied, head=tied), source)
    loaded = load_file(convert_file(source).target)
    assert torch.equal(loaded["t"], tied.t()) and torch.equal(loaded["second"], base[6:])
    assert torch.equal(loaded["emb"], loaded["head"])


def test_a_pickle_holding_more_than_weights_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    source = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _weights(), "callback": Payload()}, source)  # an object of a class: code
    with pytest.raises(UnsafeModelFile, match="weights-only loader refused it") as err:
        convert_file(source)
    assert "Payload was not an allowed global" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt"]


def test_an_existing_safetensors_is_kept_unless_forced(tmp_path: Path) -> None:
    source = tmp_path / "vae.pt"
    torch.save(_weights(), source)
    target = source.with_suffix(".safetensors")
    target.write_bytes(b"mine")
    with pytest.raises(ConvertError, match=r"vae.safetensors exists already; .*--force rewrites it"):
        convert_file(source)
    assert target.read_bytes() == b"mine"
    convert_file(source, force=True)
    assert _same(load_file(target), _weights())


@pytest.mark.parametrize(("name", "content", "message"), [
    ("model.safetensors", b"x", "is already .safetensors"),
    ("notes.txt", b"x", "is a .txt file"),
    ("broken.ckpt", b"not a pickle", r"could not be read as a PyTorch file \(Unsupported operand"),
    ("short.ckpt", b"junk", "could not be read as a PyTorch file"),
    ("missing.ckpt", None, "no such file"),
])
def test_bad_files_get_a_clear_error(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConvertError, match=message):
        convert_file(path)


def test_convert_files_reports_each_file_and_goes_on_past_a_bad_one(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.pth", tmp_path / "bad.ckpt"
    torch.save(_weights(), good)
    bad.write_bytes(b"junk")
    lines: list[str] = []
    assert convert_files([bad, good], report=lines.append) == 1
    assert lines[0].startswith(f"error: {bad}: could not be read")
    assert lines[1].startswith(f"{good} -> good.safetensors: 2 tensors")
    assert convert_files([good], report=lines.append, force=True) == 0


def test_noodle_convert_is_a_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "x.ckpt"
    torch.save(_weights(), source)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_engine_commands(sub, argparse.Namespace(models=ModelsSettings(), engine=EngineSettings(), limits=Limits()))
    args = parser.parse_args(["convert", str(source)])
    assert args.handler(args) == 0
    assert capsys.readouterr().out == f"{source} -> x.safetensors: 2 tensors, 0.0 MB\n"
    assert args.handler(args) == 1  # the second time the .safetensors exists
    assert "exists already" in capsys.readouterr().out
    assert os.path.getsize(source.with_suffix(".safetensors")) > 0


def test_a_real_checkpoint_layout_round_trips(tiny_models: Path, tmp_path: Path) -> None:
    """The tiny SD1.5 single file saved as a Lightning .ckpt converts back to exactly its tensors."""
    original = load_file(tiny_models / "checkpoints" / "tiny-sd15.safetensors")
    source = tmp_path / "checkpoints" / "tiny.ckpt"
    source.parent.mkdir()
    torch.save({"state_dict": original, "global_step": 1}, source)
    done = convert_file(source)
    assert done.tensors == len(original) and _same(load_file(done.target), original)


class _RunsCode:
    """A pickle whose loading calls a function: what a malicious checkpoint holds."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.getcwd, ())


def test_a_pickle_calling_a_function_is_called_unsafe_without_torchs_advice_to_load_it_anyway(tmp_path: Path) -> None:
    source = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _RunsCode()}, source)
    with pytest.raises(UnsafeModelFile, match="holds more than weights") as err:
        convert_file(source)
    assert "getcwd" in str(err.value) and "weights_only set to False" not in str(err.value)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # deprecated: still what old files hold
@pytest.mark.parametrize(("make", "kind"), [(lambda: torch.eye(3).to_sparse(), "sparse_coo"),
                                            (lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
                                             "quantized")])
def test_a_tensor_safetensors_cannot_hold_is_refused_by_name_and_nothing_is_written(
        tmp_path: Path, make: Callable[[], torch.Tensor], kind: str) -> None:
    tensor = make()
    source = tmp_path / "odd.pt"
    torch.save({"fine": torch.ones(2), "odd": tensor}, source)
    with pytest.raises(ConvertError, match=f"odd.pt: tensor 'odd' is .*{kind}"):
        convert_file(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.pt"]


def test_a_target_that_cannot_be_written_is_an_error_of_that_file_and_the_next_is_converted(tmp_path: Path) -> None:
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    torch.save(_weights(), first)
    torch.save(_weights(), second)
    (tmp_path / "first.safetensors").mkdir()  # a folder where the file goes
    lines: list[str] = []
    assert convert_files([first, second], force=True, report=lines.append) == 1
    assert lines[0].startswith("error: ") and "first.pt: could not be written as first.safetensors" in lines[0]
    assert (tmp_path / "second.safetensors").is_file() and not list(tmp_path.glob(".*.part"))
