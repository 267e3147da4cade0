"""/workflow against the whole graph's limits, through the real Studio on a real SQLite file and the tiny models:
each attack of issue 12 is refused with one line naming the node and the limit, nothing is stored, written or
queued, and the next job runs; a member at their queue cap is refused before any parsing or validating."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.console.app import Console, ConsolePublisher, LineReader
from bot.core.errors import RequestInvalid
from bot.core.front_end import Origin
from engine.nodes.base import SEED_MAX
from tests.bot.conftest import Env
from tests.bot.core.services.test_workflows import ALICE, as_file, graph, refused, run
from tests.engine.conftest import txt2img
from tests.engine.queue.service_support import GATE_SEED, Gate
from tests.engine.test_cost import chain, chained_samplers, feed_sampler

HEADER = "workflow: 'attack.json' asks more than this server allows:"
HUGE = "9" * 5000


def repeated() -> dict[str, Any]:
    return feed_sampler(txt2img(batch_size=8), "14", "RepeatLatentBatch", amount=4)


def widened() -> dict[str, Any]:
    return feed_sampler(txt2img(width=2048, height=16), "14", "LatentUpscale", upscale_method="nearest-exact",
                        width=0, height=2048, crop="disabled")


def combined() -> dict[str, Any]:
    workflow = txt2img()
    chain(workflow, 20, "ConditioningCombine", "conditioning_1", "conditioning_2", "positive")
    return workflow


def concatenated() -> dict[str, Any]:
    workflow = txt2img()
    chain(workflow, 20, "ConditioningConcat", "conditioning_to", "conditioning_from", "positive")
    return workflow


def saved_many() -> dict[str, Any]:
    workflow = txt2img()
    for i in range(40):
        workflow[f"s{i}"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}}
    return workflow


ATTACKS: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("RepeatLatentBatch 8 x 4", repeated,
     "node 14 (RepeatLatentBatch): makes a batch of 32 latents; this server's limit is 8 (limits.max_batch in "
     "config.toml): make fewer at once"),
    ("LatentUpscale with width 0", widened,
     "node 14 (LatentUpscale): makes latents of 262,144x2,048 pixels; this server's limit is 2,048 a side "
     "(limits.max_side in config.toml): choose a smaller size (a side given as 0 follows the input's aspect ratio)"),
    ("20 chained ConditioningCombine", combined,
     "node c4 (ConditioningCombine): makes a conditioning of 32 items (ConditioningCombine adds its inputs' items, "
     "and each is one more UNet pass per latent per step); this server's limit is 16 "
     "(limits.max_conditioning_items in config.toml): combine fewer"),
    ("20 chained ConditioningConcat", concatenated,
     "node c5 (ConditioningConcat): makes a conditioning of 4,928 tokens (ConditioningConcat adds its inputs' "
     "lengths); this server's limit is 4,312 (limits.max_conditioning_tokens in config.toml): concatenate fewer or "
     "shorter prompts"),
    ("7 chained KSamplers at 150 steps", lambda: chained_samplers(6, 150),
     "node k5 (KSampler): brings the job's sampler steps to 1,050 (150 here); this server's limit is 1,000 a job "
     "(limits.max_job_steps in config.toml): use fewer samplers or steps"),
    ("41 SaveImage nodes", saved_many,
     "node s31 (SaveImage): brings the images the job writes to 33 (1 here); this server's limit is 32 a job "
     "(limits.max_job_images in config.toml): save fewer images, or smaller batches"),
]


async def next_job_runs(env: Env) -> None:
    final = await run(env, as_file(graph(batch_size=1)))
    assert final.kind == "done" and final.error is None and len(final.generation.images) == 2


@pytest.mark.parametrize(("name", "build", "line"), ATTACKS, ids=[attack[0] for attack in ATTACKS])
async def test_an_attack_is_refused_naming_the_node_and_the_limit(env: Env, name: str,
                                                                 build: Callable[[], dict[str, Any]],
                                                                 line: str) -> None:
    assert (await refused(env, as_file(build()), "attack.json")).splitlines() == [HEADER, line]
    await next_job_runs(env)


async def test_nine_hundred_chained_samplers_are_refused_before_any_node_is_checked(env: Env) -> None:
    data = json.dumps(chained_samplers(900, 150)).encode()  # 214 KiB: under max_workflow_bytes
    assert await refused(env, data, "attack.json") == (
        "workflow: 'attack.json' cannot run: the workflow has 907 nodes; this server's limit is 500 "
        "(limits.max_workflow_nodes in config.toml): a graph for one picture has tens, so split it into several "
        "workflows")
    await next_job_runs(env)


async def test_an_integer_of_five_thousand_digits_is_refused_where_it_is(env: Env, tmp_path: Path) -> None:
    text = as_file(graph()).decode().replace('"seed": 5', f'"seed": {HUGE}', 1)
    line = next(number for number, row in enumerate(text.splitlines(), 1) if HUGE in row)
    column = text.splitlines()[line - 1].index(HUGE) + 1
    message = await refused(env, text.encode(), "attack.json")
    assert message == (f"workflow: 'attack.json' holds an integer of 5,000 digits at line {line}, column {column}; "
                       "no input takes more than 20 (a seed goes up to 18446744073709551615): fix that value and "
                       "attach the file again")
    # the largest seed a KSampler takes still parses, runs, and is stored whole (past SQLite's signed 64 bits)
    final = await run(env, as_file(graph(batch_size=1, seed=SEED_MAX)))
    assert final.kind == "done" and final.generation.params["seeds"] == {"3": SEED_MAX}
    assert (await env.store.get(final.generation.id)).jobs[0].seed == SEED_MAX

    # the console says so in one line and serves the next command
    bad, good = tmp_path / "huge.json", tmp_path / "fine.json"
    bad.write_text(text)
    good.write_bytes(as_file(graph(batch_size=1)))
    out = io.StringIO()
    env.studio.results.publisher = ConsolePublisher(out)
    console = Console(env.studio, out, io.StringIO(), interactive=False, details_dir=tmp_path)
    code = await console.run(LineReader(io.StringIO(f"/workflow {bad}\n/workflow {good}\n")))
    errors = [row for row in out.getvalue().splitlines() if row.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and "holds an integer of 5,000 digits at line" in errors[0]
    assert "Workflow: fine.json" in out.getvalue()


async def test_a_member_at_their_cap_is_refused_before_any_parsing_or_validating(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    parent = (await run(env, as_file(graph(batch_size=1)))).generation
    gate = Gate(monkeypatch)
    # a negative of its own: the same graph as another test's would come from the node cache, never sampled
    held = await env.studio.workflows.run(as_file(graph(seed=GATE_SEED, negative=f"held {uuid.uuid4().hex}")),
                                         "held.json", ALICE, Origin("555", "777"))
    try:
        await gate.wait_entered()
        env.studio.queue.per_user_max = 1
        validated: list[Any] = []
        validate = env.engine.validate

        def counted(workflow: Any) -> Any:
            validated.append(workflow)
            return validate(workflow)

        monkeypatch.setattr(env.engine, "validate", counted)
        full = "needs 1 place(s) in the queue and you have 1 of 1 in use"
        # an upload that would fail to parse says only that the queue is full: nothing was read
        huge = as_file(graph()).decode().replace('"seed": 5', f'"seed": {HUGE}', 1).encode()
        assert full in await refused(env, huge)
        assert full in await refused(env, as_file(repeated()))
        with pytest.raises(RequestInvalid, match=r"needs 1 place\(s\) in the queue"):
            await env.studio.workflows.rerun(parent, ALICE, Origin("555", "777"))
        assert validated == []
    finally:
        gate.open()
    assert (await env.finish(held)).kind == "done"
