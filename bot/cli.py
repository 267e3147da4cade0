"""The `noodle` command: the engine's subcommands plus the front ends (`main`, later `chat` and `bot`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# transformers warns at import time that torchvision is missing (we never use its image processors);
# the level must be set before diffusers imports it. `-v` turns the libraries' logs back on.
if "-v" not in sys.argv and "--verbose" not in sys.argv:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bot.settings import Settings  # noqa: E402
from engine.cli import add_engine_commands  # noqa: E402


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noodle", description="Stable Diffusion workflows, ComfyUI-compatible, "
                                                                "for Discord and the console")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)
    add_engine_commands(sub, settings)
    main_cmd = sub.add_parser("main", help="what `make run` starts")
    main_cmd.set_defaults(handler=lambda a: run_main(settings))
    return parser


def run_main(settings: Settings) -> int:
    """The Discord bot when DISCORD_TOKEN is set, else the demo on the tiny models."""
    from bot.demo import run_demo

    return run_demo(settings)


def quiet_libraries(*, verbose: bool) -> None:
    """diffusers and transformers chatter (load bars, dtype notes) is not for our users; -v shows it."""
    if verbose:
        return
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights and configs ship with the project; never ask a hub
    settings = Settings()
    args = build_parser(settings).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries(verbose=args.verbose)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
