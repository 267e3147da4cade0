"""Reaching Discord: what failed, said in one line, whether trying again can help, and when to try again.

bot/discord_app/client.py's connect loop uses these while the engine keeps running; the log filter makes
discord.py's own lines one line too (its gateway reconnects log a full traceback each time) and drops
its voice warnings, since Noodle never joins a voice channel.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Iterator

import aiohttp
import discord

__all__ = ["CONNECT_ERRORS", "DiscordLogLines", "bad_token", "describe", "quiet_discord_logs", "retry_delays",
           "worth_retrying"]

# What a login, a command sync or a gateway connection raises when Discord is away or in trouble
CONNECT_ERRORS = (OSError, aiohttp.ClientError, asyncio.TimeoutError, discord.HTTPException,
                  discord.GatewayNotFound, discord.ConnectionClosed)
# Gateway close code for a token Discord does not accept (discord.com/developers/docs/topics/opcodes-and-status-codes)
AUTHENTICATION_FAILED = 4004
VOICE_WARNING = "voice will NOT be supported"
RECONNECT_MESSAGE = "Attempting a reconnect in %.2fs"


def _where(err: aiohttp.ClientConnectorError) -> str:
    return f"{err.host}:{err.port}"


def describe(err: BaseException) -> str:
    """What failed, for people, in one line: DNS, a refused connection, TLS, a timeout or Discord's answer."""
    if isinstance(err, aiohttp.ClientConnectorDNSError) or (
            isinstance(err, aiohttp.ClientConnectorError) and isinstance(err.os_error, socket.gaierror)):
        return f"the DNS lookup of {err.host} failed ({err.os_error.strerror})"
    if isinstance(err, aiohttp.ClientConnectorCertificateError):
        reason = getattr(err.certificate_error, "verify_message", None) or err.certificate_error
        return (f"the TLS certificate of {_where(err)} could not be verified ({reason}): check the system clock "
                "and CA certificates, or a proxy that intercepts HTTPS")
    if isinstance(err, aiohttp.ClientSSLError):
        reason = getattr(err.os_error, "reason", None) or err.os_error
        return f"the TLS handshake with {_where(err)} failed ({reason}): a proxy or firewall may be in the way"
    if isinstance(err, ssl.SSLError):
        return f"the TLS connection failed ({err.reason or err}): a proxy or firewall may be in the way"
    if isinstance(err, aiohttp.ClientConnectorError):
        if isinstance(err.os_error, ConnectionRefusedError):
            return f"the connection to {_where(err)} was refused: a firewall or proxy may be blocking it"
        return f"could not connect to {_where(err)} ({err.os_error.strerror or err.os_error})"
    if isinstance(err, discord.DiscordServerError):
        return f"Discord answered {err.status} {err.response.reason} (a problem on Discord's side)"
    if isinstance(err, discord.HTTPException):
        return f"Discord answered {err.status} {err.response.reason}: {err.text or 'no details'}"
    if isinstance(err, discord.GatewayNotFound):
        return "Discord's gateway could not be found (a Discord outage?)"
    if isinstance(err, discord.ConnectionClosed):
        return f"Discord closed the gateway connection (code {err.code}{': ' + err.reason if err.reason else ''})"
    if isinstance(err, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "Discord did not answer in time"
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return "Discord closed the connection before answering"
    return f"{type(err).__name__}: {err}"


def bad_token(err: BaseException) -> bool:
    """Whether Discord refused the token itself (HTTP 401 at login, or gateway close code 4004)."""
    if isinstance(err, discord.LoginFailure):
        return True
    return isinstance(err, discord.ConnectionClosed) and err.code == AUTHENTICATION_FAILED


def worth_retrying(err: BaseException) -> bool:
    """Network trouble, 429 and 5xx pass with time; any other refusal (a 4xx, a closed gateway) does not."""
    if isinstance(err, discord.ConnectionClosed):
        return False  # discord.py has closed the client already: only codes its own loop does not retry get here
    if isinstance(err, discord.HTTPException):
        return err.status == 429 or err.status >= 500
    return isinstance(err, CONNECT_ERRORS)


def retry_delays(first: float, cap: float) -> Iterator[float]:
    """first, 2*first, 4*first ... then cap forever: Discord gets a breather, the owner a bounded wait."""
    delay = first
    while True:
        yield min(delay, cap)
        delay = min(delay * 2, cap)


class DiscordLogLines(logging.Filter):
    """On discord.client: drop the voice warnings, and say a gateway reconnect in one line, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if VOICE_WARNING in message:
            return False
        if message == RECONNECT_MESSAGE and record.exc_info and record.exc_info[1] is not None:
            record.msg = f"lost the connection to Discord: {describe(record.exc_info[1])}; reconnecting in %.2f s"
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_FILTER = DiscordLogLines()  # one instance, so installing it twice adds nothing (Logger.addFilter dedupes)


def quiet_discord_logs() -> None:
    """Install the filter before a discord.Client is built (the voice warnings come from its __init__)."""
    logging.getLogger("discord.client").addFilter(_FILTER)
