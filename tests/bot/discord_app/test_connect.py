"""Start-up against Discord, for real: discord.py's own HTTP and gateway code against a local Discord on 127.0.0.1.

`LocalDiscord` answers the REST routes and the gateway handshake Noodle uses (aiohttp on loopback;
`Route.BASE` and `DiscordWebSocket.DEFAULT_GATEWAY` point at it). Behind it everything is real: Noodle's
connect loop, the engine on the tiny models, SQLite, the Studio and the Discord publisher.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import discord
import pytest
import yarl
from aiohttp import web
from pydantic import SecretStr

from bot.discord_app.client import NoodleBot, run_bot
from bot.discord_app.connect import RECONNECT_MESSAGE, describe, retry_delays
from bot.settings import Settings
from bot.core.front_end import Origin, Requester
from tests.bot.conftest import WAIT
from tests.bot.discord_app.test_command_schema import all_problems

APP_ID = "2000"
CHANNEL_ID = "555"
USER = {"id": "1000", "username": "noodle", "discriminator": "0", "global_name": None, "avatar": None, "bot": True}
BAD_TOKEN_LINE = "Discord refused DISCORD_TOKEN: copy the bot token again from the Developer Portal (Bot tab)\n"


class LocalDiscord:
    """Discord's API as far as Noodle uses it, on loopback; `login_status` is what GET /users/@me answers."""

    def __init__(self) -> None:
        self.login_status = 200
        self.logins = 0
        self.synced: list[Any] = []
        self.posted: list[dict[str, Any]] = []
        self.changed = asyncio.Condition()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> LocalDiscord:
        app = web.Application()
        api = "/api/v10"
        app.router.add_get(f"{api}/users/@me", self._me)
        app.router.add_get(f"{api}/oauth2/applications/@me", self._application)
        app.router.add_put(f"{api}/applications/{{app}}/commands", self._sync)
        app.router.add_get(f"{api}/channels/{{channel}}", self._channel)
        app.router.add_post(f"{api}/channels/{{channel}}/messages", self._message)
        app.router.add_put(f"{api}/channels/{{channel}}/messages/{{message}}/reactions/{{emoji}}/@me", self._react)
        app.router.add_get("/gateway", self._gateway)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait (up to WAIT seconds) until `predicate` holds after some request."""
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), WAIT)

    async def _tell(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _me(self, request: web.Request) -> web.Response:
        self.logins += 1
        await self._tell()
        if self.login_status == 200:
            return _json(USER)
        return _json({"message": f"{self.login_status}: refused here", "code": 0},
                                 status=self.login_status)

    async def _application(self, request: web.Request) -> web.Response:
        return _json({"id": APP_ID, "name": "Noodle", "description": "", "icon": None,
                                  "bot_public": True, "bot_require_code_grant": False, "owner": USER,
                                  "verify_key": "0" * 64, "flags": 0, "rpc_origins": []})

    async def _sync(self, request: web.Request) -> web.Response:
        self.synced.append(await request.json())
        await self._tell()
        return _json([])

    async def _channel(self, request: web.Request) -> web.Response:
        return _json({"id": request.match_info["channel"], "type": 0, "guild_id": "777", "name": "art",
                                  "position": 0, "permission_overwrites": [], "nsfw": False, "parent_id": None})

    async def _message(self, request: web.Request) -> web.Response:
        form = await request.post()
        files = {field.filename: field.file.read() for key, field in form.items() if key.startswith("files[")}
        payload = json.loads(str(form["payload_json"]))
        self.posted.append({"payload": payload, "files": files})
        await self._tell()
        return _json({"id": str(3000 + len(self.posted)), "channel_id": request.match_info["channel"],
                                  "type": 0, "content": payload.get("content") or "", "author": USER,
                                  "attachments": [], "embeds": [], "mentions": [], "mention_roles": [],
                                  "pinned": False, "mention_everyone": False, "tts": False,
                                  "timestamp": "2026-01-01T00:00:00+00:00", "edited_timestamp": None, "flags": 0})

    async def _react(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        """HELLO, then READY after IDENTIFY, heartbeats acknowledged: discord.py's handshake, uncompressed."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 45_000}})
        async for message in ws:
            frame = json.loads(message.data)
            if frame["op"] == 2:
                await ws.send_json({"op": 0, "t": "READY", "s": 1, "d": {
                    "v": 10, "user": USER, "guilds": [], "session_id": "local",
                    "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway",
                    "application": {"id": APP_ID, "flags": 0}}})
            elif frame["op"] == 1:
                await ws.send_json({"op": 11})
        return ws


def _json(data: Any, status: int = 200) -> web.Response:
    # exactly "application/json": discord.py reads any other content type (even with "; charset=utf-8") as text
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")


@pytest.fixture
async def local_discord(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalDiscord]:
    server = await LocalDiscord().start()
    monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{server.port}/api/v10")
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                        yarl.URL(f"ws://127.0.0.1:{server.port}/gateway"))
    # discord.py warns about voice once per process: make this process warn again, so hiding it is tested
    monkeypatch.setattr(discord.voice_client.VoiceClient, "warn_nacl", True)
    monkeypatch.setattr(discord.voice_client.VoiceClient, "warn_dave", True)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def fast_settings(settings: Settings) -> Settings:
    """The bot fixture's settings with retries after 0.01 s, doubling up to 0.04 s, and a token."""
    bot = settings.bot.model_copy(update={"connect_retry_first_seconds": 0.01, "connect_retry_max_seconds": 0.04})
    return settings.model_copy(update={"bot": bot, "discord_token": SecretStr("local-token")})


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _NoDns(aiohttp.abc.AbstractResolver):
    """getaddrinfo's answer on a machine without DNS, without asking any DNS server."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        return None


async def _login_error(monkeypatch: pytest.MonkeyPatch, base: str, **options: Any) -> BaseException:
    monkeypatch.setattr(discord.http.Route, "BASE", base)
    client = discord.Client(intents=discord.Intents.none(), **options)
    async with client:
        with pytest.raises(Exception) as raised:
            await client.login("local-token")
    return raised.value


# -- one line per failure kind ----------------------------------------------------------------------------------

async def test_each_kind_of_failure_is_named_in_one_line(local_discord: LocalDiscord,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    refused = await _login_error(monkeypatch, f"http://127.0.0.1:{port}/api/v10")
    assert describe(refused) == f"the connection to 127.0.0.1:{port} was refused: a firewall or proxy may be " \
                                "blocking it"
    no_dns = await _login_error(monkeypatch, "https://discord.com/api/v10",
                                connector=aiohttp.TCPConnector(resolver=_NoDns()))
    assert describe(no_dns) == "the DNS lookup of discord.com failed (Name or service not known)"
    # TLS spoken to a plain-HTTP server: what a captive portal or a non-TLS proxy gives
    tls = await _login_error(monkeypatch, f"https://127.0.0.1:{local_discord.port}/api/v10")
    assert describe(tls) == f"the TLS handshake with 127.0.0.1:{local_discord.port} failed (WRONG_VERSION_NUMBER): " \
                            "a proxy or firewall may be in the way"
    local_discord.login_status = 503
    server_error = await _login_error(monkeypatch, f"http://127.0.0.1:{local_discord.port}/api/v10")
    assert describe(server_error) == "Discord answered 503 Service Unavailable (a problem on Discord's side)"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_an_untrusted_certificate_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True, timeout=60)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(web.Application())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    port = runner.addresses[0][1]
    try:
        error = await _login_error(monkeypatch, f"https://127.0.0.1:{port}/api/v10")
    finally:
        await runner.cleanup()
    assert describe(error) == f"the TLS certificate of 127.0.0.1:{port} could not be verified (self-signed " \
                              "certificate): check the system clock and CA certificates, or a proxy that intercepts " \
                              "HTTPS"


def test_retries_double_from_the_first_delay_up_to_the_cap() -> None:
    delays = retry_delays(5.0, 300.0)
    assert [next(delays) for _ in range(9)] == [5, 10, 20, 40, 80, 160, 300, 300, 300]


def test_a_lost_gateway_is_one_line_not_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    NoodleBot(Settings())  # installs the filter, as `noodle bot` does
    try:
        raise discord.ConnectionClosed(None, shard_id=None, code=1006)  # type: ignore[arg-type]
    except discord.ConnectionClosed:
        logging.getLogger("discord.client").exception(RECONNECT_MESSAGE, 1.5)  # what discord.py's connect logs
    [record] = [r for r in caplog.records if r.name == "discord.client"]
    assert record.getMessage() == "lost the connection to Discord: Discord closed the gateway connection (code " \
                                  "1006); reconnecting in 1.50 s"
    assert record.exc_info is None and record.levelname == "WARNING"


# -- the real start-up ------------------------------------------------------------------------------------------

async def test_a_bad_token_says_so_in_one_line_and_exits_2(local_discord: LocalDiscord, fast_settings: Settings,
                                                           capsys: pytest.CaptureFixture[str],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    local_discord.login_status = 401
    code = await asyncio.to_thread(run_bot, fast_settings)
    assert code == 2 and capsys.readouterr().out == BAD_TOKEN_LINE
    assert local_discord.logins == 1  # a refused token is not retried
    assert fast_settings.bot.database.is_file()  # the engine and the store started before the login
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "voice will NOT be supported" not in caplog.text


@pytest.mark.slow
async def test_the_engine_runs_while_discord_is_down_and_the_result_is_posted_once_connected(
        local_discord: LocalDiscord, fast_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    local_discord.login_status = 503
    bot = NoodleBot(fast_settings)
    async with bot:
        await bot.start_core()
        events = bot.engine.subscribe()
        request = await bot.studio.generations.parse({"prompt": "a red fox", "steps": 2, "width": 64, "height": 64})
        ticket = await bot.studio.generations.submit(request, Requester("42", "777"), Origin(CHANNEL_ID, "777"))
        connecting = asyncio.create_task(bot.keep_connecting("local-token"))

        async def job_done() -> None:
            async for event in events:
                if event.job_id == ticket.job_id and event.kind in ("done", "failed", "cancelled"):
                    assert event.kind == "done", event.error
                    return

        await asyncio.wait_for(job_done(), WAIT)  # the job ran while every login got a 503
        await local_discord.until(lambda: local_discord.logins >= 4)
        assert local_discord.posted == [] and not bot.connected.is_set()

        local_discord.login_status = 200  # Discord is back
        generation, problem = await asyncio.wait_for(bot.studio.results.wait_settled(ticket.generation_id), WAIT)
        assert problem is None and generation.posted_at is not None
        [post] = local_discord.posted
        assert post["payload"]["content"] == "<@42>"
        assert post["files"] == {Path(p).name: Path(p).read_bytes() for p in generation.images}
        [body] = local_discord.synced  # the bulk overwrite, exactly as discord.py sent it
        assert all_problems(body) == []
        await bot.close()
        await asyncio.wait_for(connecting, WAIT)

    retries = [r.getMessage() for r in caplog.records if "cannot reach Discord" in r.getMessage()]
    assert len(retries) == local_discord.logins - 1
    assert [re.search(r"retrying in (\S+) s", line)[1] for line in retries[:4]] == ["0.01", "0.02", "0.04", "0.04"]
    assert retries[0] == "cannot reach Discord: Discord answered 503 Service Unavailable (a problem on Discord's " \
                         "side); queued jobs keep running; retrying in 0.01 s (doubling up to [bot] " \
                         "connect_retry_max_seconds = 0.04)"
    assert not [r for r in caplog.records if r.exc_info]  # no traceback anywhere, aiohttp's included
    assert "voice will NOT be supported" not in caplog.text and "Unclosed" not in caplog.text
