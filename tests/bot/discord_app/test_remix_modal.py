"""✏️ Remix through SimCord: the modal opens pre-filled from the result, a bad steps value is refused in the modal's
reply with what is allowed, a good edit queues and posts a new result."""

from __future__ import annotations

from typing import Any

from tests.bot.discord_app.conftest import World


def _fields(modal: dict[str, Any]) -> dict[str, str]:
    out = {}
    for row in modal["components"]:
        for child in row.get("components") or [row.get("component")]:
            out[child["custom_id"]] = child.get("value", "")
    return out


async def test_remix_opens_prefilled_refuses_a_bad_value_and_queues_a_good_one(world: World) -> None:
    await world.alice.slash(world.channel, "imagine", prompt="a red fox", negative="blurry", steps=2, width=64,
                            height=64, seed=7)
    await world.env.settle()
    result = world.bot_messages()[-1]

    shown = await world.bob.click(result, custom_id="nd1:1:remix")
    assert shown.modal is not None and shown.modal["title"] == "Remix #1"
    assert _fields(shown.modal) == {"prompt": "a red fox", "negative": "blurry", "steps": "2", "cfg": "7",
                                    "seed": "7"}

    refused = await world.bob.submit_modal(shown, {"prompt": "a blue fox", "negative": "", "steps": "ten",
                                                   "cfg": "7", "seed": ""})
    await world.env.settle()
    assert refused.ephemeral
    assert refused.response.content.startswith("❌ steps: 'ten' is not a whole number; give 1 to")
    assert len(world.bot_messages()) == 1

    again = await world.bob.click(result, custom_id="nd1:1:remix")
    done = await world.bob.submit_modal(again, {"prompt": "a blue fox", "negative": "", "steps": "2", "cfg": "7",
                                                "seed": "3"})
    await world.env.settle()
    assert done.ephemeral and done.response.content.startswith("✅ Done: #2")
    made = await world.bot.studio.generations.get(2)
    assert made.kind == "remix" and made.requester_id == str(world.bob.id) and made.seed == 3
    assert len(world.bot_messages()) == 2 and world.bot_messages()[-1].attachments
