"""`noodle chat`'s /rules and /mod: the same Studio calls as Discord's, on the console's own server."""

from __future__ import annotations

import io
from pathlib import Path

from bot.console.app import Console, ConsolePublisher, LineReader
from bot.console.commands import CONSOLE_SERVER
from tests.bot.conftest import Env
from tests.bot.core.safety.test_nsfw import high_image

SMALL = "steps: 2 width: 64 height: 64"


async def _console(env: Env, lines: list[str], tmp_path: Path, *, user: str = "console:you",
                   manage_server: bool = True) -> tuple[int, str]:
    env.studio.gate.home_server = CONSOLE_SERVER  # as `noodle chat` builds its Studio
    out = io.StringIO()
    env.studio.results.publisher = ConsolePublisher(out)
    console = Console(env.studio, out, io.StringIO(), interactive=False, details_dir=tmp_path, user=user,
                      manage_server=manage_server)
    code = await console.run(LineReader(io.StringIO("\n".join(lines))))
    return code, out.getvalue()


async def test_rules_refuse_a_banned_word_add_the_negative_and_hold_back_an_nsfw_upload(env: Env,
                                                                                      tmp_path: Path) -> None:
    high = tmp_path / "high.png"
    high_image().save(high)
    code, out = await _console(env, [
        "/rules ban: nude, gore negative: ugly, watermark threshold: 0.6",
        f"/imagine prompt: a n.u.d.e figure {SMALL}",
        f"/imagine prompt: a red fox negative: blurry seed: 3 {SMALL}",
        f"/imagine prompt: a red fox image: {high} steps: 2",
        "/mod history user: console:you",
    ], tmp_path)
    assert code == 1  # two lines were refused
    assert "banned words: nude, gore" in out and "enforced negative: ugly, watermark" in out
    assert "error: your prompt contains the word 'nude'" in out
    assert "Negative: blurry, ugly, watermark" in out and out.count("wrote ") == 1
    assert "error: image: the NSFW classifier scored the attached image 0." in out
    history = out.split("console:you, latest first:")[1]
    assert history.count("refused imagine") == 2 and "NSFW 0.0" in history and "· posted" in history


async def test_only_a_manager_sets_rules_and_a_blocked_member_is_refused_until_unblocked(env: Env,
                                                                                       tmp_path: Path) -> None:
    code, out = await _console(env, ["/rules ban: gore"], tmp_path, manage_server=False)
    assert code == 1 and "error: only members with Manage Server can read or change this server's rules" in out
    code, out = await _console(env, ["/mod block user: console:bob reason: spam", "/mod blocked"], tmp_path)
    assert code == 0 and "console:bob since" in out and ": spam" in out
    code, out = await _console(env, [f"/imagine prompt: a cat {SMALL}", "/history", "/mod history user: x"],
                               tmp_path, user="console:bob", manage_server=False)
    assert out.count("error: the moderators of this server blocked you from using Noodle here") == 2
    assert "error: /mod needs Manage Server or Manage Messages" in out
    await _console(env, ["/mod unblock user: console:bob"], tmp_path)
    code, out = await _console(env, [f"/imagine prompt: a cat {SMALL}"], tmp_path, user="console:bob",
                               manage_server=False)
    assert code == 0 and "wrote " in out
