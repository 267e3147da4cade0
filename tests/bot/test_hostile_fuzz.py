"""Random hostile input for issue 12's battery: console lines and uploaded workflows drawn by hypothesis, thrown at
the real Console and `Studio.run_workflow` on a real SQLite file and the tiny models. Nothing may escape but a
refusal with a message, and the bot must serve an ordinary job afterwards.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import hypothesis
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from bot.core.requests.options import IMAGINE_OPTIONS
from bot.settings import Settings
from bot.core.front_end import Origin
from engine.errors import NoodleError
from engine.executor import Executor
from engine.nodes import catalog
from engine.nodes.base import SEED_MAX
from engine.settings import Limits
from tests.bot.conftest import WAIT, Env
from tests.bot.test_hostile_battery import HUGE, SMALL, ConsoleSession, next_job_runs
from tests.bot.core.services.test_workflows import ALICE
from tests.engine.conftest import txt2img

# -- random hostile input -------------------------------------------------------------------------------------

HOSTILE_TEXT = st.sampled_from([
    "", " ", "__x__", "__animals__", f"__{'a' * 300}__", "{a|b}", "{a|{b|c}}", "(fox:1e39)", "(" * 1000, ")",
    "[[[x", "<lora:x:1e9>", "../../etc/passwd", "/etc/hostname", "~/nothing.png", "C:\\x.json", "\x00", "🔀",
    "ℹ️", "é" * 5, "\u202e", "nan", "inf", "-0", "1e309", "&"])
HOSTILE_NUMBERS = st.sampled_from([0, -1, 1, 2, 7, 64, 2**53, 2**63, SEED_MAX, SEED_MAX + 1, 10**30]).map(str)
VALUES = st.one_of(HOSTILE_TEXT, HOSTILE_NUMBERS, st.just(HUGE), st.text(max_size=12),
                   st.floats().map(repr), st.integers(-10, 200).map(str))
COMMANDS = st.sampled_from(["/imagine", "imagine", "/workflow", "/queue", "/queue cancel:", "/settings",
                            "/settings clear", "/preset create", "/preset list", "/preset delete", "/preset default",
                            "/tokens", "react last", "react", "/models", "/history", "help", "dance", ""])
REACTIONS = st.sampled_from(["🔁", "🔀", "🗑️", "ℹ️", "👍", "reroll", "variation"])
OPTION = st.tuples(st.sampled_from([*IMAGINE_OPTIONS, "preset", "name", "cancel"]), VALUES)


@st.composite
def console_lines(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 2)) == 0:  # a request that may well run: hostile words in an otherwise cheap job
        text = draw(HOSTILE_TEXT | st.text(max_size=12))
        return f"/imagine prompt: fox {text} seed: {draw(HOSTILE_NUMBERS)} {SMALL}"
    command = draw(COMMANDS)
    words = [command, draw(REACTIONS)] if command.startswith("react") else [command]
    words += [draw(VALUES)] if draw(st.booleans()) else []
    words += [f"{name}: {value}" for name, value in draw(st.lists(OPTION, max_size=4))]
    return " ".join(words)


def small_limits(settings_: Settings) -> Settings:
    """What the console examples may ask for stays cheap on a CPU: hostile values must still be refused."""
    return settings_.model_copy(update={"limits": Limits(max_side=128, max_pixels=128 * 128, max_steps=8,
                                                         max_batch=2)})


async def in_examples(strategy: st.SearchStrategy[Any], example: Callable[[Any], Awaitable[None]]) -> None:
    """Run hypothesis in a thread, each example on this event loop (where the Studio lives)."""
    loop = asyncio.get_running_loop()

    @hypothesis.settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(strategy)
    def each(value: Any) -> None:
        asyncio.run_coroutine_threadsafe(example(value), loop).result(WAIT)

    await asyncio.to_thread(each)


async def test_random_console_lines_are_answered_and_the_console_serves_on(settings: Settings,
                                                                            bot_executor: Executor,
                                                                            tmp_path: Path) -> None:
    env = await Env(small_limits(settings), bot_executor).start()

    async def example(lines: list[str]) -> None:
        code, printed = await ConsoleSession(env, tmp_path).run(lines)
        assert code in (0, 1), printed
        assert "Noodle failed on this command" not in printed and "Traceback" not in printed, (lines, printed)
        errors = [row for row in printed.splitlines() if row.startswith("error: ")]
        assert all(row.removeprefix("error: ").strip() for row in errors), printed
        assert (code == 1) == bool(errors), (lines, printed)

    try:
        await in_examples(st.lists(console_lines(), min_size=1, max_size=4), example)
        code, printed = await ConsoleSession(env, tmp_path).run([f"/imagine prompt: a calm lake seed: 3 {SMALL}"])
        assert code == 0 and "wrote " in printed, printed
    finally:
        await env.stop()


NODES = catalog()
JUNK = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                max_size=2), max_leaves=5)
# small valid numbers keep an accepted graph cheap to run; the others are past every limit or nonsense
CONSTANTS = {
    "INT": st.sampled_from([-1, 0, 1, 2, 3, 8, 64, 2**31, 2**53, 2**63, SEED_MAX + 1, 10**25]),
    "FLOAT": st.sampled_from([0.0, 0.5, 1.0, 1.5, 7.0, -1.0, 1e39, float("nan"), float("inf")]),
    "STRING": HOSTILE_TEXT | st.text(max_size=8),
    "BOOLEAN": st.booleans(),
    "COMBO": st.sampled_from(["tiny-sd15.safetensors", "nope.safetensors", "euler", "normal", "nearest-exact",
                              "disabled", "enable", "../../etc/passwd", ""]),
}


def input_value(kind: str, ids: list[str]) -> st.SearchStrategy[Any]:
    link = st.tuples(st.sampled_from([*ids, "99"]), st.integers(-1, 3)).map(list)
    return st.one_of(link, link, CONSTANTS.get(kind, st.nothing()), CONSTANTS.get(kind, st.nothing()), JUNK)


@st.composite
def random_node(draw: st.DrawFn, ids: list[str]) -> dict[str, Any]:
    class_type = draw(st.sampled_from([*NODES, "Nope"]))
    specs = NODES[class_type].input_specs() if class_type in NODES else []
    return {"class_type": class_type,
            "inputs": {spec.name: draw(input_value(spec.type, ids)) for spec in specs if draw(st.integers(0, 9))}}


@st.composite
def uploaded_workflows(draw: st.DrawFn) -> bytes:
    """The tiny txt2img graph with a few random edits (inputs, nodes, links), sometimes not a graph at all."""
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return draw(st.binary(max_size=64))
    if shape == 1:
        return json.dumps(draw(JUNK)).encode()
    workflow = txt2img(seed=draw(st.integers(0, 1000)))
    ids = list(workflow)
    for _ in range(draw(st.integers(0, 3))):
        node_id = draw(st.sampled_from(ids))
        edit = draw(st.sampled_from(["input", "input", "drop", "node", "add"]))
        node = workflow[node_id]
        if edit == "node":
            workflow[node_id] = draw(random_node(ids))
        elif edit == "add":
            ids.append(f"r{len(ids)}")
            workflow[ids[-1]] = draw(random_node(ids))
        elif node["class_type"] in NODES and node["inputs"]:
            name = draw(st.sampled_from(sorted(node["inputs"])))
            if edit == "drop":
                del node["inputs"][name]
            else:  # mostly a constant of the input's own type, so that some edited graphs still run
                spec = next(s for s in NODES[node["class_type"]].input_specs() if s.name == name)
                constant = CONSTANTS.get(spec.type, JUNK)
                node["inputs"][name] = draw(constant | constant | input_value(spec.type, ids))
    return json.dumps(workflow).encode()


async def test_random_uploaded_workflows_are_refused_or_run_and_the_bot_serves_on(env: Env) -> None:
    origin = Origin(str(env.channel.id), "777")

    async def example(data: bytes) -> None:
        try:
            ticket = await env.studio.workflows.run(data, "fuzz.json", ALICE, origin)
        except NoodleError as err:
            assert str(err).strip()
            return
        final = await env.finish(ticket)  # accepted: it runs to a verdict, a failure says why
        assert final.kind in ("done", "failed") and (final.kind == "done" or (final.error or "").strip()), final

    await in_examples(uploaded_workflows(), example)
    await next_job_runs(env, 12)
