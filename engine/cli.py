"""The engine's commands of the `noodle` CLI: run, nodes, convert, coverage, tiny-models, tokens, bench (bot/cli.py
adds the rest).

`noodle run WF.json ... --models DIR --out DIR [--input DIR]` is a contract other tools call:
one JSON line per workflow (ComfyUI's history shape plus `meta`), exit 0 when all ran, 2 when
a workflow was invalid, 1 when one failed while running.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import JobCancelled, NodeExecutionError, NoodleError, WorkflowInvalid
from engine.events import Event, Executing, Progress
from engine.executor import Executor
from engine.executor import create_executor
from engine.settings import EngineSettings, Limits, ModelsSettings


@dataclass(frozen=True)
class Bench:
    """One `noodle bench WHAT`: what it runs, and the options of its own it adds to `noodle bench`."""

    run: Callable[[argparse.Namespace], int]
    add_options: Callable[[argparse.ArgumentParser], None] | None = None


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a bench of 0 repeats has no median to print)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def add_engine_commands(sub: argparse._SubParsersAction, defaults: Any, *,
                        benches: Mapping[str, Bench] | None = None) -> None:
    """Register the engine's subcommands; `defaults` is the loaded Settings (config.toml).

    `benches` are a front end's benchmarks, offered by `noodle bench` beside the engine's own.
    """
    run = sub.add_parser("run", help="run ComfyUI API-format workflow files in one engine")
    run.add_argument("workflows", nargs="+", type=Path)
    run.add_argument("--models", type=Path, default=defaults.models.dir)
    run.add_argument("--out", type=Path, default=defaults.engine.output_dir)
    run.add_argument("--input", type=Path, default=defaults.engine.input_dir)
    run.set_defaults(handler=lambda a: cmd_run(a, defaults))

    nodes = sub.add_parser("nodes", help="print the node catalog as ComfyUI's /object_info JSON")
    nodes.add_argument("--models", type=Path, default=defaults.models.dir)
    nodes.add_argument("--input", type=Path, default=defaults.engine.input_dir,
                       help="folder whose images LoadImage lists")
    nodes.set_defaults(handler=lambda a: cmd_nodes(a, defaults))

    tiny = sub.add_parser("tiny-models", help="write the tiny random test models (offline, seconds)")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--force", action="store_true", help="rewrite files that exist")
    tiny.set_defaults(handler=cmd_tiny_models)

    tokens = sub.add_parser("tokens", help="print the CLIP token usage of a prompt as JSON")
    tokens.add_argument("text")
    tokens.add_argument("--models", type=Path, default=defaults.models.dir,
                        help="models folder whose embeddings/ the prompt may name")
    tokens.set_defaults(handler=lambda a: cmd_tokens(a, defaults))

    convert = sub.add_parser("convert", help="write a .safetensors copy beside each pickle model file "
                                             "(.ckpt, .pt, .pth, .bin), read with torch's weights-only loader")
    convert.add_argument("files", nargs="+", type=Path)
    convert.add_argument("--force", action="store_true", help="rewrite a .safetensors file that exists")
    convert.set_defaults(handler=cmd_convert)

    coverage = sub.add_parser("coverage", help="say per workflow (API JSON, /prompt body, ComfyUI PNG, or a folder "
                                               "of them) whether it would run here and what blocks it")
    coverage.add_argument("paths", nargs="+", type=Path)
    coverage.add_argument("--json", action="store_true", help="one JSON object per file, then the summary lines")
    coverage.set_defaults(handler=lambda a: cmd_coverage(a, defaults))

    worker = sub.add_parser("worker", help="add this machine's devices to a running Noodle cluster on Ray "
                                           "([engine] workers = \"ray\" on the bot's machine)")
    worker.add_argument("--address", required=True,
                        help="the Ray head's GCS address, host:6379 (what `ray start --head` printed)")
    worker.add_argument("--name", default=None, help="the workers' name in /queue (default: this host's name)")
    worker.add_argument("--workers", type=int, default=0,
                        help="engine workers here (default: one per GPU, one CPU worker where there is none)")
    worker.set_defaults(handler=lambda a: _worker(a, defaults))

    every = {"engine": Bench(_bench_engine), "queue": Bench(_bench_queue), "cluster": Bench(_bench_cluster),
             "comfy": Bench(lambda a: _bench_comfy(a, defaults), _bench_comfy_options),
             "gpu": Bench(lambda a: _bench_gpu(a, defaults), _bench_gpu_options), **(benches or {})}
    bench = sub.add_parser("bench", help="benchmarks that print side-by-side ratios")
    bench.add_argument("what", choices=list(every))
    bench.add_argument("--models", type=Path, default=Path(".cache/models"))
    bench.add_argument("--repeats", type=positive_int, default=5)
    bench.add_argument("--real-size", choices=["sd15", "sdxl"], default=None,
                       help="engine: a full-size checkpoint with random weights (written once into --models) "
                            "at 512 or 1024 pixels, 20 steps, instead of the tiny model; meant for a GPU")
    for one in every.values():
        if one.add_options is not None:
            one.add_options(bench)
    bench.set_defaults(handler=lambda a: every[a.what].run(a))


def executor_for(args: argparse.Namespace, defaults: Any) -> Executor:
    models = ModelsSettings(**{**defaults.models.model_dump(), "dir": args.models})
    engine_settings = EngineSettings(**{**defaults.engine.model_dump(),
                                        "output_dir": getattr(args, "out", defaults.engine.output_dir),
                                        "input_dir": getattr(args, "input", defaults.engine.input_dir)})
    limits: Limits = defaults.limits
    return create_executor(models, engine_settings, limits)


class ProgressBar:
    """A tqdm bar on stderr naming the node and the sampler step, only on a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._bar: Any = None

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if isinstance(event, Executing):
            self.close()
            self._bar = tqdm(total=1, desc=f"{event.node} {event.class_type}", file=sys.stderr, leave=False)
        elif isinstance(event, Progress) and self._bar is not None:
            self._bar.total = event.max
            self._bar.n = event.value
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def cmd_run(args: argparse.Namespace, defaults: Any) -> int:
    executor = executor_for(args, defaults)
    worst = 0
    for path in args.workflows:
        bar = ProgressBar()
        try:
            workflow = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(workflow, str):  # the executor would read a str as JSON text once more
                raise ValueError("it holds a JSON string, not an object of nodes (save the workflow with Export "
                                 "(API))")
            result = executor.run(workflow, listener=bar)
            line: dict[str, Any] = result.to_dict()
        except (OSError, ValueError, RecursionError) as err:  # JSON, UTF-8 (ValueErrors), nesting too deep
            line = {"error": {"type": "invalid_prompt", "message": f"Cannot read workflow file {path}",
                              "details": str(err), "extra_info": {}}, "node_errors": {}}
            worst = max(worst, 2)
        except WorkflowInvalid as err:
            line = err.body
            worst = max(worst, 2)
        except NodeExecutionError as err:
            line = {"type": "execution_error", "node_id": err.node_id, "node_type": err.class_type,
                    "exception_type": type(err.cause).__name__, "exception_message": str(err.cause)}
            worst = max(worst, 1)
        except (JobCancelled, NoodleError) as err:
            line = {"type": "execution_error", "exception_type": type(err).__name__, "exception_message": str(err)}
            worst = max(worst, 1)
        finally:
            bar.close()
        print(json.dumps(line), flush=True)
    return worst


def cmd_nodes(args: argparse.Namespace, defaults: Any) -> int:
    """`noodle nodes`: every registered node as ComfyUI's `/object_info` JSON, sorted by class_type; COMBO inputs
    list the files in --models and --input as the model manager offers them to validation."""
    import torch

    from engine.models.manager import ModelManager
    from engine.models.paths import ModelCatalog
    from engine.nodes import catalog
    from engine.object_info import object_info

    manager = ModelManager(
        ModelCatalog(args.models, allow_weights_only_pickle=defaults.models.allow_weights_only_pickle),
        device=torch.device("cpu"), dtype=torch.float32, memory_budget=0, input_dir=Path(args.input))
    print(json.dumps(object_info(catalog(), manager.choices), indent=2))
    return 0


def cmd_tokens(args: argparse.Namespace, defaults: Any) -> int:
    from prompts.embeddings import EmbeddingLibrary
    from prompts.errors import PromptError
    from engine.validate import encodable
    from prompts.plan import token_report

    folder = Path(args.models) / "embeddings"
    if not encodable(args.text):  # bytes that are not UTF-8 on the command line arrive as lone surrogates
        print(json.dumps({"error": "the text is not UTF-8: give the prompt as UTF-8 text"}))
        return 2
    try:
        report = token_report(args.text, EmbeddingLibrary(folder),
                              max_chunks=defaults.limits.max_prompt_chunks, syntax=defaults.engine.prompt_syntax)
    except PromptError as err:
        print(json.dumps({"error": str(err)}))
        return 2
    print(json.dumps(report.to_dict()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`noodle convert FILE...`: exit 0 when every file was written, 1 when one was refused."""
    from engine.models.convert import convert_files

    return convert_files(list(args.files), force=args.force, report=lambda line: print(line, flush=True))


def cmd_coverage(args: argparse.Namespace, defaults: Any) -> int:
    """`noodle coverage PATH...`: one line per file and a summary; exit 0 when every file would run, 1 when one
    would not (or is no API workflow), 2 when a path given does not exist."""
    from engine.coverage import find_workflows, judge_file, summary
    from engine.nodes import catalog

    absent = [path for path in args.paths if not path.exists()]
    if absent:
        print(f"coverage: no such file or folder: {', '.join(map(str, absent))}", file=sys.stderr)
        return 2
    registry = catalog()
    verdicts = []
    for path in find_workflows(args.paths):
        verdict = judge_file(path, registry, defaults.limits)
        verdicts.append(verdict)
        print(json.dumps(verdict.to_dict()) if args.json else verdict.line(), flush=True)
    for line in summary(verdicts):
        print(line)
    return 0 if verdicts and all(v.runs for v in verdicts) else 1


def cmd_tiny_models(args: argparse.Namespace) -> int:
    from engine.tiny import write_tiny_models

    try:
        written = write_tiny_models(args.dir, force=args.force)
    except OSError as err:  # DIR is a file, cannot be made, or a folder stands where a model goes
        print(f"tiny-models: cannot write the models into {args.dir}: {err}", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _bench_queue(args: argparse.Namespace) -> int:
    from engine.queue.bench import bench_queue

    return bench_queue(args.models, repeats=args.repeats)


def _worker(args: argparse.Namespace, defaults: Any) -> int:
    from engine.cluster.join import run_worker

    return run_worker(args.address, defaults, name=args.name, count=args.workers)


def _bench_cluster(args: argparse.Namespace) -> int:
    from engine.cluster.bench import bench_cluster

    return bench_cluster(args.models)


def _bench_comfy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--comfy", default=None, metavar="URL",
                        help="comfy: the running ComfyUI to time against, e.g. http://127.0.0.1:8199")
    parser.add_argument("workflows", nargs="*", type=Path, default=[],
                        help="comfy: API-format workflow files, run on both sides (models from --models)")


def _bench_comfy(args: argparse.Namespace, defaults: Any) -> int:
    from engine.bench_comfy import ComfyError, bench_comfy

    if not args.comfy or not args.workflows:
        print("noodle bench comfy needs --comfy URL and one or more workflow files (Save (API Format)); their "
              "models must be in --models here and in that ComfyUI's models folder")
        return 2
    try:
        return bench_comfy(args.comfy, args.workflows, args.models, repeats=args.repeats,
                           engine=defaults.engine, limits=defaults.limits)
    except ComfyError as err:
        print(err)
        return 1


def _bench_gpu_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--comfy-source", type=Path, default=Path(".gpukit/comfyui"), metavar="DIR",
                        help="gpu: ComfyUI's source folder, started with this Python (default: make gpu-kit's)")
    parser.add_argument("--families", default="sd15,sdxl", help="gpu: which full-size checkpoints to time")
    parser.add_argument("--size", type=int, default=None, help="gpu: image side (default 512 SD1.5, 1024 SDXL)")
    parser.add_argument("--steps", type=int, default=None, help="gpu: sampler steps (default 20)")
    parser.add_argument("--out", type=Path, default=None, help="gpu: also write the figures here as JSON")
    parser.add_argument("--port", type=int, default=8199, help="gpu: the port ComfyUI is started on")


def _bench_gpu(args: argparse.Namespace, defaults: Any) -> int:
    from engine.bench_comfy import ComfyError
    from engine.bench_gpu import bench_gpu

    families = [name.strip() for name in args.families.split(",") if name.strip()]
    if not families or set(families) - {"sd15", "sdxl"}:
        print(f"--families takes sd15, sdxl or both, comma-separated, not {args.families!r}")
        return 2
    try:
        return bench_gpu(args.comfy_source, args.models, repeats=args.repeats, families=families, size=args.size,
                         steps=args.steps, out=args.out, port=args.port, engine=defaults.engine,
                         limits=defaults.limits)
    except ComfyError as err:
        print(err)
        return 1


def _bench_engine(args: argparse.Namespace) -> int:
    from engine.bench import bench_engine

    return bench_engine(args.models, repeats=args.repeats, real_size=args.real_size)
