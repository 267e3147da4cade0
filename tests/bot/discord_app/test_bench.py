"""`noodle bench bot` runs the real /imagine handler against a busy engine; here small, and without timing asserts."""

from __future__ import annotations

from pathlib import Path

from bot.discord_app.bench import measure, percentile


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 51)]
    assert percentile(values, 0.5) == 25.0 and percentile(values, 0.99) == 50.0 and percentile([3.0], 0.99) == 3.0


async def test_every_command_and_button_press_is_acknowledged_and_queued_while_the_engine_is_busy(
        tiny_models: Path) -> None:
    result = await measure(tiny_models, commands=6, busy_steps=40)
    assert result["commands"] == 6 and result["queued"] == 6 and result["refused"] == 0
    assert result["engine_busy_throughout"] is True
    assert 0 <= result["ack_p50_ms"] <= result["ack_p99_ms"] <= result["ack_max_ms"]
    # the same people then press U1 on one result: every press is acknowledged and its upscale queued
    assert result["presses"] == 6 and result["press_queued"] == 6
    assert 0 <= result["press_ack_p50_ms"] <= result["press_ack_p99_ms"] <= result["press_ack_max_ms"]
