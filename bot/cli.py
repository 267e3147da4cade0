"""The `noodle` command: the engine's subcommands plus the front ends: `bot`, `chat`, `main`, `bench bot`.

engine/cli.py owns `run`, `nodes`, `tiny-models`, `tokens` and `bench engine|queue`; this module hands it
`bench bot` through `add_engine_commands(benches=...)` and adds the front ends' own subcommands.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tomllib

# transformers warns at import time that torchvision is missing (we never use its image processors);
# the level must be set before diffusers imports it. `-v` turns the libraries' logs back on.
if "-v" not in sys.argv and "--verbose" not in sys.argv:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

from pydantic import ValidationError  # noqa: E402

from bot.settings import Settings, config_path, unknown_keys  # noqa: E402
from engine.cli import Bench, add_engine_commands, positive_int  # noqa: E402


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    """Every `noodle` subcommand, the engine's and the front ends'."""
    parser = argparse.ArgumentParser(prog="noodle", description="Stable Diffusion workflows, ComfyUI-compatible, "
                                                                "for Discord and the console")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)
    add_engine_commands(sub, settings, benches={"bot": Bench(_bench_bot, _bench_bot_options)})

    bot_cmd = sub.add_parser("bot", help="run the Discord bot (token from DISCORD_TOKEN)")
    bot_cmd.add_argument("--print-commands", action="store_true",
                         help="print the application commands as JSON, exactly as they would be synced; no connection")
    bot_cmd.set_defaults(handler=lambda a: cmd_bot(a, settings))

    chat = sub.add_parser("chat", help="the local console front end: /imagine and react lines on stdin")
    chat.add_argument("--models", type=Path, default=None,
                      help="models folder (default: [models] dir; the tiny test models if it does not exist)")
    chat.add_argument("--db", type=Path, default=None, help="SQLite file (default: [bot] database)")
    chat.add_argument("--out", type=Path, default=None, help="where PNGs are written (default: [engine] output_dir)")
    chat.add_argument("--manage-server", action="store_true",
                      help="act as a member with Manage Server (may create, change and delete presets)")
    chat.set_defaults(handler=lambda a: cmd_chat(a, settings))

    main_cmd = sub.add_parser("main", help="what `make run` starts: the bot with DISCORD_TOKEN, else `chat`")
    main_cmd.set_defaults(handler=lambda a: run_main(settings))
    return parser


def _bench_bot_options(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--commands", type=positive_int, default=50, help="bench bot: commands arriving at once")


def _bench_bot(args: argparse.Namespace) -> int:
    """`noodle bench bot`: the real /imagine handler against a busy engine."""
    from bot.discord_app.bench import bench_bot

    return bench_bot(args.models, commands=args.commands)


def cmd_bot(args: argparse.Namespace, settings: Settings) -> int:
    """`noodle bot`: connect and run, or print the command schema without connecting."""
    if args.print_commands:
        import asyncio
        import json

        from bot.discord_app.client import command_payloads

        print(json.dumps(asyncio.run(command_payloads(settings)), indent=2, ensure_ascii=False))
        return 0
    from bot.discord_app.client import run_bot

    return run_bot(settings)


def cmd_chat(args: argparse.Namespace, settings: Settings, *, demo: tuple[str, ...] = ()) -> int:
    """`noodle chat`: the console on stdin (`demo` lines when stdin is empty and not a terminal)."""
    import asyncio

    from bot.console.app import chat_settings, run_chat

    chat, note = chat_settings(settings, models=args.models, db=args.db, out=args.out)
    if note:
        print(note, file=sys.stderr)
    stdin = sys.stdin if sys.stdin is not None else io.StringIO()  # started with stdin closed (<&-): no input
    interactive = stdin.isatty()
    return asyncio.run(run_chat(chat, stdin=stdin, out=sys.stdout, err=sys.stderr, interactive=interactive,
                                demo=() if interactive else demo,
                                manage_server=bool(getattr(args, "manage_server", False))))


def run_main(settings: Settings) -> int:
    """The Discord bot when DISCORD_TOKEN is set, else `noodle chat` (a demo when nothing is piped in)."""
    if settings.discord_token is not None:
        from bot.discord_app.client import run_bot

        return run_bot(settings)
    from bot.console.app import DEMO

    return cmd_chat(argparse.Namespace(models=None, db=None, out=None), settings, demo=DEMO)


def quiet_libraries(*, verbose: bool) -> None:
    """diffusers and transformers chatter (load bars, dtype notes) is not for our users; -v shows it."""
    if verbose:
        return
    # transformers first: importing diffusers already makes transformers warn (about torchvision)
    import transformers.utils.logging as transformers_logging

    transformers_logging.set_verbosity_error()
    import diffusers.utils.logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """The `noodle` entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights and configs ship with the project; never ask a hub
    if problem := missing_config():
        print(problem, file=sys.stderr)
        return 2
    try:
        settings = Settings()
    except (ValidationError, tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as err:
        print(config_problem(err), file=sys.stderr)
        return 2
    for key in unknown_keys():  # a typo is not an error (an old file may hold a key a newer Noodle dropped)
        print(f"noodle: {config_path()}: {key} is no setting of Noodle's; it is left out", file=sys.stderr)
    from engine.heap import reuse_for

    reuse_for(settings.engine)  # before any thread starts: CPU sampling keeps its freed memory (engine/heap.py)
    parser = build_parser(settings)
    # `noodle bench comfy --comfy URL A.json B.json`: files after an option are its workflows (argparse would have
    # taken none: the positionals were consumed with the bench's name); anything else left over is an error
    args, extra = parser.parse_known_args(argv)
    if extra and (getattr(args, "what", None) != "comfy" or any(item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.workflows = [*args.workflows, *(Path(item) for item in extra)]
    if getattr(args, "workflows", None) and getattr(args, "what", "comfy") != "comfy":  # `noodle run` has no `what`
        parser.error(f"noodle bench {args.what} takes no workflow files; `noodle bench comfy` does")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries(verbose=args.verbose)
    from engine.errors import NoodleError

    try:
        return int(args.handler(args) or 0)
    except NoodleError as err:  # a set-up the owner fixes (a cluster, a database, a device): a line, no traceback
        print(f"noodle: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: queued jobs stay in the database for the next start
        print("noodle: interrupted", file=sys.stderr)
        return 130


def config_problem(err: BaseException) -> str:
    """One line per thing wrong with config.toml (or a NOODLE_ variable), naming the file and the key."""
    where = config_path()
    if isinstance(err, ValidationError):
        lines = [f"noodle: {where}: {_config_key(problem['loc'], problem.get('input'))}"
                 f"{problem['msg'].removeprefix('Value error, ')}" for problem in err.errors()]
        return "\n".join(lines) + "\n(fix config.toml, or the NOODLE_ environment variable of that key)"
    if isinstance(err, tomllib.TOMLDecodeError):
        return f"noodle: {where} is not valid TOML: {err}"
    return f"noodle: {where} cannot be read: {err}"


def _config_key(loc: tuple[int | str, ...], given: object) -> str:
    """`[table] key = value: ` for a setting's own problem; `[table] ` (or nothing) for one of several settings
    together, which its message names."""
    if not loc:
        return ""
    if isinstance(given, dict):  # a table's check across its keys
        return f"[{'.'.join(str(part) for part in loc)}] "
    return f"[{'.'.join(str(part) for part in loc[:-1]) or 'top level'}] {loc[-1]} = {given!r}: "


def missing_config() -> str | None:
    """What is wrong when NOODLE_CONFIG names a file that is not there (without it, a missing ./config.toml means
    the defaults): the owner meant a file, and running on defaults would ignore every limit they set in it."""
    named = os.environ.get("NOODLE_CONFIG")
    if named is None or Path(named).exists():
        return None
    return (f"noodle: NOODLE_CONFIG names {named}, which is not there; give the path of a config file, or unset "
            "NOODLE_CONFIG to read ./config.toml")


if __name__ == "__main__":
    sys.exit(main())
