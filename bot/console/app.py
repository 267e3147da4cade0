"""`noodle chat`: the local console front end over the same Studio as the Discord bot.

Reads `/imagine prompt: a red fox seed: 42 steps: 8`, `react JOB 🔁` and `press JOB U2` lines (JOB: a printed
job id or `last`; press: bot/console/press.py), writes the PNGs, and prints the same card the Discord embed
shows. When stdin is not a terminal it is a script: one command after another, exit at EOF (status 1 if any failed);
on a terminal it prompts and draws a progress line.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from bot.console.commands import (CONSOLE_SERVER, mod_command, preset_command, queue_command, rules_command,
                                  settings_command)
from bot.console.press import PRESS_HELP, press_line
from bot.core.actions import press_words
from bot.core.cards.result import card_text, failure_text, history_line, result_card
from bot.core.errors import RequestInvalid
from bot.core.front_end import Requester, Ticket
from bot.core.requests.imagine import Allowed, ImageUpload, check_upload_meta
from bot.core.requests.options import IMAGINE_OPTIONS, parse_options
from bot.core.requests.uploads import local_path, read_capped
from bot.core.requests.workflow_file import read_workflow_file
from bot.core.results.status import relay
from bot.core.safety.gate import BLOCKED_TEXT, MemberBlocked, blocked_text
from bot.core.storage.records import Generation
from bot.core.storage.store import Store
from bot.settings import Settings
from engine.errors import NoodleError

__all__ = ["DEMO", "Console", "ConsolePublisher", "LineReader", "chat_settings", "run_chat"]

HELP = """commands:
  /imagine prompt: a red fox seed: 42 steps: 8      options: negative model loras steps cfg sampler scheduler
                                                    seed width height batch image (a file path; its transparent
                                                    area is inpainted) denoise clip_skip private (Discord: the
                                                    result goes to your DMs) control_image (a file path)
                                                    controlnet control_strength (0..2) control_canny (true/false)
  /preset create|update name: anime model: M steps: 28 ...   options: name model loras vae style negative
                                                    steps cfg sampler scheduler width height clip_skip
  /preset delete|show name: anime, /preset default [name: anime], /preset list
      (creating, changing, deleting and the default need `noodle chat --manage-server`)
  /imagine ... preset: anime                        applies the preset; your options override it
  /workflow my-graph.json                           run a ComfyUI workflow file (Save (API Format)) as one job
  /settings [clear] preset: anime steps: 20 ...      your own defaults: preset width height steps negative private
  /tokens a red fox, (snow:1.2)                     the token report of a prompt (75-token chunks)
  /history                                          your last generations
  /models                                           checkpoints (architecture, size, hash), LoRAs, embeddings,
                                                    ControlNets, upscale models
  /queue [cancel: 12]                               your queued and running requests (place, ETA); cancel one;
                                                    the engine's workers, what each holds and runs
  COMMAND &                                         run a command in the background (then /queue shows it)
  react JOB 🔁|🔀|🗑️|ℹ️ [N]                          JOB is a job id or `last`; N picks an image of a batch
      (or: reroll, variation, delete, details)
  /rules [ban: w1, w2] [normal: spoiler] ...        this server's rules (needs --manage-server): threshold normal
                                                    nsfw ban unban ban_pattern unban_pattern negative (enforced)
                                                    allow_/block_checkpoints allow_/block_loras reset
  /mod history|block|unblock user: ID [reason: R]   a member's requests, scores and refusals; block them;
  /mod blocked                                      who is blocked (needs --manage-server)
""" + PRESS_HELP + """
  help, quit"""
ACTIONS = {"🔁": "reroll", "reroll": "reroll", "🔀": "variation", "variation": "variation", "🗑️": "delete",
           "🗑": "delete", "delete": "delete", "ℹ️": "details", "ℹ": "details", "details": "details",
           "1️⃣": "variation:1", "2️⃣": "variation:2", "3️⃣": "variation:3", "4️⃣": "variation:4"}
log = logging.getLogger(__name__)
TINY_DIR = Path(".cache/models")
# what `make run` shows when nothing is piped in: one image, a reroll served from the cache, then the U1 button:
# an upscale (model or latent, then a hires-fix pass)
DEMO = ("/imagine prompt: a red fox in the snow, (highly detailed:1.2) negative: blurry seed: 42 steps: 8",
        "react last 🔁", "press last U1")
FOLLOW_SECONDS = 24 * 3600  # a console waits as long as the job takes; the bound only keeps every wait finite


class ConsolePublisher:
    """Prints each finished result: the card, then the files."""

    def __init__(self, out: TextIO, terminal: TextIO | None = None) -> None:
        self.out = out
        self.terminal = terminal  # where a progress line may be drawn: cleared before printing

    async def publish(self, generation: Generation) -> str | None:
        """Print the card and the PNG paths (a result the rules hold back: why, not where); no message id."""
        if generation.safety == "block":
            self._print(blocked_text(generation) + " (/mod history lists it)")
            return None
        lines = [card_text(result_card(generation))] + [f"wrote {path}" for path in generation.images]

        lines.append(f"press: {press_words(generation)}")  # the buttons a Discord result has, as `press` takes them
        self._print("\n".join(lines))
        return None

    async def publish_failure(self, generation: Generation) -> None:
        """Print why a job nobody waited for failed."""
        self._print(failure_text(generation))

    def _print(self, text: str) -> None:
        if self.terminal is not None:
            self.terminal.write("\r\033[K")
            self.terminal.flush()
        print(text, file=self.out, flush=True)


class LineReader:
    """stdin lines on the event loop, read by a daemon thread (a blocked readline must not hold up exit)."""

    def __init__(self, stream: TextIO) -> None:
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def pump() -> None:
            for line in stream:
                loop.call_soon_threadsafe(self._queue.put_nowait, line)
            loop.call_soon_threadsafe(self._queue.put_nowait, None)

        threading.Thread(target=pump, name="noodle-stdin", daemon=True).start()

    async def next(self) -> str | None:
        """The next line, or None at EOF. Waiting on a person has no natural bound: a day, then EOF."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout=24 * 3600)
        except TimeoutError:
            return None


class _TerminalLine:
    """A status sink that redraws one line on a terminal."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.used = False

    async def update(self, text: str) -> None:
        self.err.write(f"\r\033[K{text}")
        self.err.flush()
        self.used = True

    def end(self) -> None:
        if self.used:
            self.err.write("\r\033[K")
            self.err.flush()


class Console:
    """Runs console lines against a Studio; `last` is the latest job id printed."""

    def __init__(self, studio: Any, out: TextIO, err: TextIO, *, interactive: bool, user: str = "console:you",
                 details_dir: Path = Path("."), manage_server: bool = False) -> None:
        self.studio = studio
        self.out, self.err = out, err
        self.interactive = interactive
        # no server, so no moderator rights: like a DM, the console reaches its own results only
        # (bot/core/services/access.py), never a Discord server's should the two share a database
        self.who = Requester(user, None, user.removeprefix("console:"))
        # presets belong to a server: the console is one server of its own; --manage-server makes you its manager
        self.member = replace(self.who, guild_id=CONSOLE_SERVER, manage_server=manage_server)
        self.details_dir = details_dir
        self.last: str | None = None
        self.failures = 0
        self._background: set[asyncio.Task[None]] = set()
        self._detach = False  # the line being run ended in `&`: its job is followed in the background

    async def run(self, reader: LineReader, *, demo: tuple[str, ...] = ()) -> int:
        """Read and run lines until EOF or `quit`; 0 when every command worked, else 1.

        `demo` lines run instead when the input ends before its first line (`make run` with no stdin).
        """
        first = True
        while True:
            if self.interactive:
                self.err.write("noodle> ")
                self.err.flush()
            line = await reader.next()
            if line is None and first and demo:
                print("no commands on stdin: running the demo (" + "; ".join(demo) + ")", file=self.out, flush=True)
                for command in demo:
                    await self.handle(command)
            if line is None or line.strip() in ("quit", "exit"):
                if self._background:  # commands sent off with `&` finish before the console does
                    await asyncio.gather(*self._background)
                return 1 if self.failures else 0
            first = False
            await self.handle(line)

    async def handle(self, line: str) -> None:
        """Run one line; a refusal is printed and counted, never raised."""
        text = line.strip()
        if not text or text.startswith("#"):
            return
        if text.endswith("&"):  # as in a shell: queue it, follow it in the background, take the next line
            self._detach = True
            try:
                await self.handle(text.removesuffix("&"))
            finally:
                self._detach = False
            return
        try:
            command = text.split(None, 1)[0]
            if command not in ("/rules", "rules", "/mod", "mod", "help", "/help") \
                    and await self.studio.moderation.is_blocked(CONSOLE_SERVER, self.who.user_id):
                raise MemberBlocked(BLOCKED_TEXT)
            if text in ("help", "/help"):
                print(HELP, file=self.out)
            elif text.startswith(("/imagine", "imagine ")):
                await self._imagine(text.split(None, 1)[1] if " " in text else "")
            elif text.startswith(("/workflow", "workflow ")):  # a ComfyUI API-format file, run as one job
                data, name = await asyncio.to_thread(read_workflow_file, text.split(None, 1)[1] if " " in text else "",
                                                     self.studio.settings.limits.max_workflow_bytes)
                await self._wait(await self.studio.workflows.run(data, name, self.who))
            elif text.startswith(("/preset", "preset ")):
                print(await preset_command(self.studio, self.member, text.split(None, 1)[1] if " " in text else ""),
                      file=self.out, flush=True)
            elif text.startswith(("/settings", "settings")):
                print(await settings_command(self.studio, self.member, text.split(None, 1)[1] if " " in text else ""),
                      file=self.out, flush=True)
            elif command in ("/rules", "rules"):
                print(await rules_command(self.studio, self.member, text.split(None, 1)[1] if " " in text else ""),
                      file=self.out, flush=True)
            elif command in ("/mod", "mod"):
                print(await mod_command(self.studio, self.member, text.split(None, 1)[1] if " " in text else ""),
                      file=self.out, flush=True)
            elif text.startswith(("/tokens", "tokens ")):
                print(await self.studio.models.tokens(text.split(None, 1)[1] if " " in text else ""), file=self.out,
                      flush=True)
            elif text in ("/models", "models"):
                print(await self.studio.models.text(), file=self.out, flush=True)
            elif text.startswith(("/queue", "queue")):
                print(await queue_command(self.studio, self.who, text.split(None, 1)[1] if " " in text else ""),
                      file=self.out, flush=True)
            elif text in ("/history", "history"):
                found = await self.studio.generations.history(self.who)
                print("\n".join(history_line(g) for g in found) or "no generations yet; try /imagine",
                      file=self.out, flush=True)
            elif text.startswith("react"):
                await self._react(text.split()[1:])
            elif text == "press" or text.startswith("press "):
                done = await press_line(self.studio, self.who, text.removeprefix("press"), last=self.last,
                                        details_dir=self.details_dir)
                if isinstance(done, str):
                    print(done, file=self.out, flush=True)
                else:
                    await self._wait(done)
            else:
                raise RequestInvalid(f"unknown command {text.split()[0]!r}; try /imagine prompt: ..., react last 🔁, "
                                     "or help")
        except NoodleError as err:
            self.failures += 1
            print(f"error: {err}", file=self.out, flush=True)
        except Exception as err:  # a bug of ours, not the line's: one line here, the traceback once in the log
            self.failures += 1
            log.exception("console command %r failed", text[:200])
            print(f"error: Noodle failed on this command ({type(err).__name__}: {str(err)[:200]}); the traceback is "
                  "in the log. The console goes on with the next command", file=self.out, flush=True)

    async def _imagine(self, rest: str) -> None:
        options: dict[str, Any] = parse_options(rest, (*IMAGINE_OPTIONS, "preset"))
        for option in ("image", "control_image"):
            if option in options:
                options[option] = await _read_image(options[option], self.studio.allowed, option)
        ticket = await self.studio.generations.imagine(options, self.who, layered_for=self.member)
        await self._wait(ticket)

    async def _react(self, words: list[str]) -> None:
        if len(words) < 2:
            raise RequestInvalid("write react JOB EMOJI, e.g. react last 🔁 (JOB is a printed job id or `last`)")
        job, action = words[0], ACTIONS.get(words[1])
        if action is None:
            raise RequestInvalid(f"{words[1]!r} is not a reaction; use 🔁 🔀 🗑️ ℹ️ (or reroll, variation, "
                                 "delete, details)")
        job_id = self.last if job == "last" else job
        generation = await self.studio.generations.by_job(job_id) if job_id else None
        if generation is None:
            raise RequestInvalid(f"no job {job!r} here; use a job id printed in a result's last line, or `last`")
        extra = words[2:]
        if extra and (action != "variation" or len(extra) > 1):  # a word we would otherwise drop unread
            takes = "one image number, as in" if action == "variation" else "nothing after it:"
            raise RequestInvalid(f"{words[1]} takes {takes} react {job} {words[1]}"
                                 f"{' 1' if action == 'variation' else ''}; not {' '.join(extra)!r}")
        if action == "reroll":
            await self._wait(await self.studio.generations.reroll(generation.id, self.who))
        elif action.startswith("variation"):
            index = int(action.split(":")[1]) if ":" in action else _image_number(extra[0], generation, job) \
                if extra else 1
            await self._wait(await self.studio.generations.variation(generation.id, self.who, index))
        elif action == "delete":
            await self.studio.generations.delete(generation.id, self.who)
            print(f"deleted #{generation.id} (job {generation.job_id}) and its files", file=self.out, flush=True)
        else:
            details = await self.studio.generations.details(generation.id, self.who)
            path = self.details_dir / details.filename
            await asyncio.to_thread(path.write_text, details.workflow_json, encoding="utf-8")
            print(f"{details.text}\nworkflow: {path.resolve()}", file=self.out, flush=True)

    async def _wait(self, ticket: Ticket) -> None:
        """Follow a job to its end; the publisher prints the result, this prints the verdict if it failed."""
        self.last = ticket.job_id
        where = f"position {ticket.position}" if ticket.position else "starting"
        print(f"queued job {ticket.job_id} (#{ticket.generation_id}, {where}): {ticket.summary}", file=self.out,
              flush=True)
        if self._detach:  # queued now (so /queue lists it); the result prints whenever it comes
            task = asyncio.create_task(self._follow(ticket, progress=False))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        await self._follow(ticket, progress=self.interactive)

    async def _follow(self, ticket: Ticket, *, progress: bool) -> None:
        line = _TerminalLine(self.err) if progress else None
        sink = line if line is not None else _Silent()
        clock = self.studio.clock  # the one clock the Discord front end's followers read too
        final = await relay(self.studio.results.follow(ticket.job_id), sink, every=0.2,
                            deadline=clock() + FOLLOW_SECONDS, clock=clock)
        if line is not None:
            line.end()
        if final is not None and final.generation is not None and final.generation.state == "cancelled":
            print(f"job {ticket.job_id} (#{ticket.generation_id}) was cancelled", file=self.out, flush=True)
        elif final is None or final.kind == "failed" or final.error:
            self.failures += 1
            reason = final.error if final is not None else "no result came back"
            print(f"error: job {ticket.job_id} failed: {reason}", file=self.out, flush=True)


def _image_number(text: str, generation: Generation, job: str) -> int:
    """`react JOB 🔀 N`'s N: the number of one of the result's images, 1 to how many it has."""
    count = len(generation.images)
    # the length check first: int() of a few thousand digits is slow, then refused by Python itself
    if text.isdecimal() and len(text) <= len(str(count)) and 1 <= int(text) <= count:
        return int(text)
    raise RequestInvalid(f"{text!r} is not an image number of #{generation.id}: it has {count} image(s), pick 1 to "
                         f"{count}, as in react {job} 🔀 1")


class _Silent:
    async def update(self, text: str) -> None:
        return None


async def _read_image(path_text: str, allowed: Allowed, option: str = "image") -> ImageUpload:
    wanted = "a PNG, JPEG or WebP file"
    path = local_path(path_text, option, wanted)
    try:  # at most the limit + 1 bytes: a device like /dev/zero never ends
        data = await asyncio.to_thread(read_capped, path, allowed.max_attachment_bytes)
        if len(data) > allowed.max_attachment_bytes:  # refused as the Studio would, with the file's whole size
            check_upload_meta(path.name, None, max(len(data), path.stat().st_size), allowed, option)
    except OSError as err:
        raise RequestInvalid(f"{option}: cannot read {path} ({err.strerror}); give the path of {wanted}") from None
    return ImageUpload(filename=path.name, content_type=None, data=data)


async def run_chat(settings: Settings, *, stdin: TextIO, out: TextIO, err: TextIO, interactive: bool,
                   demo: tuple[str, ...] = (), manage_server: bool = False) -> int:
    """Open the database, start the engine and a console Studio, run the lines, shut everything down."""
    from bot.core.studio import Studio
    from engine.executor import create_executor
    from engine.queue import EngineService

    store = await Store.open(settings.bot.database)
    engine: Any = None
    studio: Any = None
    finished = False
    try:
        executor = create_executor(settings.models, settings.engine_here(), settings.limits)
        engine = EngineService(executor, settings.bot.database, settings.queue, settings.cluster())
        await engine.start()
        studio = Studio(engine, store, settings, front="console",
                        publisher=ConsolePublisher(out, err if interactive else None), home_server=CONSOLE_SERVER)
        await studio.start()
        console = Console(studio, out, err, interactive=interactive, details_dir=settings.engine.output_dir,
                          manage_server=manage_server)
        code = await console.run(LineReader(stdin), demo=demo)
        finished = True
        return code
    finally:
        # Ctrl-C (or an error) mid-job: the engine stops first, so the running job stops at its next step and
        # stays queued for the next start; the studio would otherwise wait on it (the process did not exit)
        if engine is not None and not finished:
            await engine.stop()
        if studio is not None:
            await studio.stop()
        if engine is not None and finished:
            await engine.stop()
        await store.close()


def chat_settings(settings: Settings, *, models: Path | None, db: Path | None, out: Path | None,
                  tiny_dir: Path = TINY_DIR) -> tuple[Settings, str | None]:
    """Settings for `noodle chat`: the flags over config.toml, and the tiny models when there is no models folder.

    Returns the settings and a note to print when the tiny models stand in.
    """
    note = None
    models_settings = settings.models
    bot = settings.bot
    if models is not None:
        models_settings = models_settings.model_copy(update={"dir": models})
    elif not (settings.models.dir / "checkpoints").is_dir():
        from engine.tiny import write_tiny_models

        write_tiny_models(tiny_dir)
        models_settings = models_settings.model_copy(update={"dir": tiny_dir})
        note = f"no models folder at {settings.models.dir}/checkpoints: using the tiny test models in {tiny_dir}"
        if not bot.default_model:
            bot = bot.model_copy(update={"default_model": "tiny-sd15.safetensors"})
    if db is not None:
        bot = bot.model_copy(update={"database": db})
    engine = settings.engine.model_copy(update={"output_dir": out}) if out is not None else settings.engine
    return settings.model_copy(update={"models": models_settings, "bot": bot, "engine": engine}), note
