"""Results survive restarts: jobs queued before a stop are posted after it, unposted results are posted late."""

from __future__ import annotations

import asyncio

from bot.tickets import Origin, Requester
from tests.bot.conftest import WAIT, Env


async def _until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    async def wait() -> None:
        while not await predicate():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(wait(), WAIT)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_jobs_queued_before_a_restart_are_posted_after_it(env: Env) -> None:
    who, origin = Requester("42", "777"), Origin("555", "777")
    slow = await env.studio.submit(await env.studio.parse({"prompt": "a long one", "steps": 40, "width": 64,
                                                           "height": 64}), who, origin)
    quick = await env.studio.submit(await env.studio.parse({"prompt": "a quick one", "steps": 2, "width": 64,
                                                            "height": 64, "seed": 3}), who, origin)
    await env.restart()  # the running job stops at its next step and stays queued; the next process runs both

    async def both_posted() -> bool:
        rows = [await env.store.get(t.generation_id) for t in (slow, quick)]
        return all(row is not None and row.message_id for row in rows)

    await _until(both_posted, "the resumed jobs' results")
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

    async def posted() -> bool:
        return (await env.store.get(final.generation.id)).message_id is not None

    await _until(posted, "the late post")
    assert len(channel.results()) == 1


async def test_a_failed_job_nobody_follows_is_reported_in_its_channel(env: Env) -> None:
    ticket = await env.studio.submit(await env.studio.parse({"prompt": "doomed", "steps": 150, "width": 64,
                                                             "height": 64}), Requester("42", "777"),
                                     Origin("555", "777"))
    assert await env.engine.cancel(ticket.job_id)

    async def reported() -> bool:
        return any("was cancelled" in (m.content or "") for m in env.channel.sent)

    await _until(reported, "the failure notice")
    assert (await env.store.get(ticket.generation_id)).state == "cancelled"
