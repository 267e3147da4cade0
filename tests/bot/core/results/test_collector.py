"""Results survive restarts: jobs queued before a stop are posted after it, unposted results are posted late.

Tests wait on events, never on time: a Gate holds a job in its sampler for as long as a test needs, a
verdict is followed to its end, and the fake channel's sends wake a test waiting for a message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from bot.core.front_end import Origin, Requester
from engine.queue import JobState
from engine.queue.state_table import JobTable
from tests.bot.conftest import WAIT, Env
from tests.engine.queue.service_support import GATE_SEED, Gate


async def _verdict(env: Env, job_id: str) -> Any:
    """Follow a job to its verdict: the last event, which comes once its result is stored and posted."""
    final = None
    async with asyncio.timeout(WAIT):
        async for final in env.studio.results.follow(job_id):
            pass
    assert final is not None, f"following job {job_id} gave no event"
    return final


class ChannelSends:
    """Wakes a waiting test at every message the fake channel sends (its `send` wrapped), instead of polling."""

    def __init__(self, channel: Any) -> None:
        self._sent = asyncio.Event()
        send = channel.send

        async def send_and_wake(*args: Any, **kwargs: Any) -> Any:
            message = await send(*args, **kwargs)
            self._sent.set()
            return message

        channel.send = send_and_wake

    async def until(self, found: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(WAIT):
                while not found():
                    self._sent.clear()
                    await self._sent.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None


async def test_jobs_queued_before_a_restart_are_posted_after_it(monkeypatch: pytest.MonkeyPatch, env: Env) -> None:
    # monkeypatch before env: undone after env's teardown, whose stop must still open the gate if this test fails
    gate = Gate(monkeypatch)  # holds the first job in its sampler until the engine is told to stop
    at_stop: dict[str, JobState] = {}
    table_stop = JobTable.stop

    def stop(table: JobTable) -> None:
        table_stop(table)
        if not at_stop:  # the restart's stop: what the first process leaves behind
            at_stop.update({info.job_id: info.state for info in table.infos(None, tuple(JobState))})
        gate.open()  # the held job sees the stop at its next step and goes back to the queue unfinished

    monkeypatch.setattr(JobTable, "stop", stop)
    who, origin = Requester("42", "777"), Origin("555", "777")
    slow = await env.studio.generations.submit(await env.studio.generations.parse({"prompt": "a held one", "seed": GATE_SEED, "width": 64,
                                                           "height": 64}), who, origin)
    quick = await env.studio.generations.submit(await env.studio.generations.parse({"prompt": "a quick one", "steps": 2, "width": 64,
                                                            "height": 64, "seed": 3}), who, origin)
    await gate.wait_entered()
    await env.restart()  # the running job stops at its next step and stays queued; the next process runs both
    # the restart really came while both were unfinished: one held in its sampler, one waiting behind it
    assert (at_stop[slow.job_id], at_stop[quick.job_id]) == (JobState.RUNNING, JobState.QUEUED)

    for ticket in (slow, quick):
        final = await _verdict(env, ticket.job_id)
        assert final.kind == "done" and final.error is None
    posted = {m.id for m in env.channel.results()}
    for ticket in (slow, quick):
        generation = await env.store.get(ticket.generation_id)
        assert int(generation.message_id) in posted and generation.state == "done"


async def test_a_result_that_could_not_be_posted_is_posted_after_a_restart(env: Env) -> None:
    channel = env.client.channels.pop(555)  # the channel is gone (or hidden) while the job runs
    final = await env.run({"prompt": "a lost letter", "seed": 8})
    assert final.kind == "done" and "could not be posted" in final.error
    assert (await env.store.get(final.generation.id)).posted_at is None
    env.client.channels[555] = channel
    await env.restart()

    late = await _verdict(env, final.job_id)  # settled by the new process's reconcile, which posts it
    assert late.kind == "done" and late.error is None and late.generation.message_id is not None
    assert (await env.store.get(final.generation.id)).message_id == late.generation.message_id
    assert [m.id for m in channel.results()] == [int(late.generation.message_id)]


async def test_a_result_discord_would_not_take_is_posted_again_while_the_bot_runs(env: Env) -> None:
    env.studio.results.repost_delays = (0.2, 0.4)  # config's 30 s .. 10 min, shortened
    channel = env.client.channels.pop(555)  # hidden for a while (a 5xx past discord.py's own retries alike)
    sends = ChannelSends(channel)
    final = await env.run({"prompt": "a letter that waits", "seed": 10})
    assert final.kind == "done" and "could not be posted" in final.error
    await asyncio.sleep(0.5)  # a retry or two find the channel still gone
    assert (await env.store.get(final.generation.id)).posted_at is None and channel.results() == []
    env.client.channels[555] = channel
    await sends.until(lambda: bool(channel.results()), "the result posted on a later try, without a restart")
    stored = await env.store.get(final.generation.id)
    async with asyncio.timeout(WAIT):
        while stored.message_id is None:
            await asyncio.sleep(0.05)
            stored = await env.store.get(final.generation.id)
    assert [m.id for m in channel.results()] == [int(stored.message_id)]


async def test_a_stop_during_a_post_records_the_message_so_a_restart_posts_it_once(env: Env) -> None:
    # a stop (restart) that lands after Discord took the message but before the store recorded it used to leave the
    # row unposted, so the next start's reconcile posted the result a second time
    channel, send = env.channel, env.channel.send
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_send(*args: Any, **kwargs: Any) -> Any:
        message = await send(*args, **kwargs)  # Discord has it
        entered.set()
        await release.wait()  # ... and answers late
        return message

    channel.send = slow_send
    ticket = await env.studio.generations.submit(await env.studio.generations.parse(
        {"prompt": "one post only", "seed": 9, "steps": 4, "width": 64, "height": 64}),
        Requester("42", "777"), Origin("555", "777"))
    await asyncio.wait_for(entered.wait(), WAIT)
    stopping = asyncio.create_task(env.stop())  # cancels the settle mid-post
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(stopping, WAIT)
    channel.send = send
    await env.start()
    late = await _verdict(env, ticket.job_id)
    assert late.kind == "done" and late.generation.message_id is not None
    assert [m.id for m in channel.results()] == [int(late.generation.message_id)]  # posted once, and recorded


async def test_a_failed_job_nobody_follows_is_reported_in_its_channel(
        monkeypatch: pytest.MonkeyPatch, env: Env) -> None:
    gate = Gate(monkeypatch)  # holds the job in its sampler, so the cancel finds it running
    sends = ChannelSends(env.channel)
    ticket = await env.studio.generations.submit(await env.studio.generations.parse({"prompt": "doomed", "seed": GATE_SEED, "width": 64,
                                                             "height": 64}), Requester("42", "777"),
                                     Origin("555", "777"))
    await gate.wait_entered()
    assert await env.engine.cancel(ticket.job_id)
    gate.open()  # the next step sees the cancel

    await sends.until(lambda: any("was cancelled" in (m.content or "") for m in env.channel.sent), "the failure notice")
    assert (await env.store.get(ticket.generation_id)).state == "cancelled"


async def test_a_request_cut_off_between_its_first_job_and_its_link_is_taken_back_out_whole(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # killed after image 1 went into the queue but before its row was linked to it: the next start's reconcile
    # links it, then abandons the request; it cancelled only the jobs of the row as first read, so image 1 ran
    from bot.core.storage.records import NewGeneration
    from engine.queue import Owner
    from tests.engine.conftest import txt2img

    gate = Gate(monkeypatch)
    held = await env.engine.submit(txt2img(seed=GATE_SEED), Owner("someone"))  # keeps the worker busy
    await gate.wait_entered()
    try:
        cut = await env.store.add(NewGeneration("imagine", "discord", "42", {}, {}, "m",
                                                [(1, txt2img(seed=1)), (2, txt2img(seed=2))]))
        orphan = await env.engine.submit(txt2img(seed=1), Owner("42"),
                                         extra={"generation_id": cut.id, "idx": 1, "front": env.studio.results.front})
        await env.studio.results.reconcile()
        assert await env.store.get(cut.id) is None  # recorded as never made, as before
        assert (await env.engine.info(orphan.job_id)).state is JobState.CANCELLED  # and its queued image with it
    finally:
        gate.open()
    await asyncio.wait_for(held.result(), WAIT)
