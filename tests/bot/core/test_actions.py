"""The action grammar both front ends share: custom_ids that carry a press across restarts, the console's spelling,
and which buttons a result offers."""

from __future__ import annotations

from typing import Any

import pytest

from bot.core.actions import (Action, buttons_for, custom_id, edits_result, parse_action, parse_custom_id,
                              press_words)
from bot.core.errors import RequestInvalid
from bot.core.requests.workflow_file import SOURCE as WORKFLOW_SOURCE
from bot.core.storage.records import Generation, JobRow

EVERY_ACTION = [Action("upscale", n) for n in range(1, 5)] + [Action("variation", n) for n in range(1, 5)] + [
    Action("reroll"), Action("remix"), Action("delete"), Action("details"), Action("vary", arg="subtle"),
    Action("vary", arg="strong"), Action("zoom", arg="1.5"), Action("zoom", arg="2"),
    *(Action("pan", arg=way) for way in ("left", "right", "up", "down"))]


def _generation(kind: str = "imagine", images: int = 1, **params: Any) -> Generation:
    jobs = tuple(JobRow(idx=n, job_id=f"job{n}", seed=n, workflow={}, state="done", image_path=f"/x/{n}.png")
                 for n in range(images))
    return Generation(id=7, kind=kind, parent_id=None, front="discord", state="done", requester_id="1",  # type: ignore[arg-type]
                      guild_id=None, channel_id="5", message_id="9", request={}, params=params, model_name="m",
                      model_hash=None, created_at=0.0, jobs=jobs)


@pytest.mark.parametrize("action", EVERY_ACTION, ids=lambda a: a.code)
def test_every_action_survives_its_custom_id(action: Action) -> None:
    text = custom_id(123456789012345678, action)
    assert len(text) <= 100  # Discord's limit on a custom_id
    assert parse_custom_id(text) == (123456789012345678, action)


@pytest.mark.parametrize("text", ["nd1:7:U5", "nd1:7:zoom-3", "nd1:7:pan-sideways", "nd1:7:explode", "nd1:x:U1",
                                  "nd0:7:U1", "queue:cancel:7", "", "nd1:7:reroll-now"])
def test_anything_else_is_not_ours(text: str) -> None:
    assert parse_custom_id(text) is None


def test_the_console_spells_the_same_actions() -> None:
    assert parse_action(["U2"]) == Action("upscale", 2)
    assert parse_action(["v4"]) == Action("variation", 4)
    assert parse_action(["zoom", "1.5x"]) == Action("zoom", arg="1.5")
    assert parse_action(["pan", "LEFT"]) == Action("pan", arg="left")
    assert parse_action(["🔁"]) == Action("reroll")
    assert parse_action(["✏️"]) == Action("remix")
    for words, named in ((["pan", "sideways"], "left or right or up or down"), (["zoom", "3"], "1.5 or 2"),
                         (["U2", "now"], "nothing after it"), (["reroll", "twice"], "nothing after it"),
                         ([], "U1-U4"), (["U9"], "U1-U4")):
        with pytest.raises(RequestInvalid, match=named):
            parse_action(words)


def test_a_batch_offers_u_and_v_per_grid_position() -> None:
    rows = buttons_for(_generation(images=3))
    codes = [[spec.action.code for spec in row] for row in rows]
    assert codes == [["U1", "U2", "U3", "reroll"], ["V1", "V2", "V3", "remix"], ["delete", "details"]]
    assert all(len(row) <= 5 for row in rows) and len(rows) <= 5  # Discord: 5 rows of 5
    assert press_words(_generation(images=2)) == "U1 · U2 · reroll · V1 · V2 · remix · delete · details"


def test_an_upscaled_image_and_its_rerolls_offer_the_edit_set() -> None:
    for generation in (_generation("upscale"), _generation("outpaint"), _generation("reroll", upscale_by=2.0),
                       _generation("remix", outpaint=[0, 0, 32, 0])):
        assert edits_result(generation)
        labels = [spec.label or spec.emoji for row in buttons_for(generation) for spec in row]
        assert labels == ["Vary (subtle)", "Vary (strong)", "🔁", "✏️", "Zoom out 1.5×", "Zoom out 2×", "⬅️",
                          "➡️", "⬆️", "⬇️", "🗑️", "ℹ️"]
    assert not edits_result(_generation("reroll", upscale_by=1.0))


@pytest.mark.parametrize("kind", ["workflow", "reroll"])
def test_a_workflow_result_and_its_rerolls_offer_what_its_own_graph_allows(kind: str) -> None:
    # a reroll of a /workflow result runs the same uploaded graph: U and V could only ever answer "came from /workflow"
    result = _generation(kind, images=4, source=WORKFLOW_SOURCE)
    assert [spec.action.code for row in buttons_for(result) for spec in row] == ["reroll", "delete", "details"]
