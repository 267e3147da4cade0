"""ServerRules: defaults from [safety], what each channel does, model allow and block lists, checked changes."""

from __future__ import annotations

import pytest

from bot.core.errors import RequestInvalid
from bot.core.safety.rules import ServerRules, name_allowed
from bot.settings import SafetySettings


def test_defaults_block_in_normal_channels_and_allow_in_nsfw_ones() -> None:
    rules = ServerRules.defaults(SafetySettings())
    assert rules.threshold == 0.8
    assert rules.image_action("1", nsfw_channel=False) == "block"
    assert rules.image_action("1", nsfw_channel=True) == "allow"
    own = rules.changed({"channels": {"1": "spoiler"}})
    assert own.image_action("1", nsfw_channel=True) == "spoiler" and own.image_action("2", nsfw_channel=True) == "allow"


def test_model_lists_match_names_with_or_without_extension_and_globs() -> None:
    assert name_allowed("anime/Model-V2.safetensors", (), ("model-v2",)) is False
    assert name_allowed("x.safetensors", ("anime/*",), ()) is False
    assert name_allowed("anime/x.safetensors", ("anime/*",), ()) is True
    assert name_allowed("sdxl-nsfw-mix.safetensors", (), ("*nsfw*",)) is False
    assert name_allowed("any.safetensors", (), ()) is True


def test_brackets_and_question_marks_in_a_model_entry_are_the_names_own_characters() -> None:
    """fnmatch read `[v2]` as a class: the file the moderator named passed and 'realistic v' was blocked."""
    assert name_allowed("realistic [v2].safetensors", (), ("realistic [v2]",)) is False
    assert name_allowed("realistic v.safetensors", (), ("realistic [v2]",)) is True
    assert name_allowed("what?.safetensors", (), ("what?",)) is False and name_allowed("whatx.safetensors", (),
                                                                                       ("what?",)) is True
    assert name_allowed("anime/x [pruned].safetensors", (), ("*[pruned]",)) is False
    assert name_allowed("anime/x p.safetensors", (), ("*[pruned]",)) is True


def test_a_thread_without_a_rule_of_its_own_follows_its_channels() -> None:
    rules = ServerRules.defaults(SafetySettings()).changed({"normal": "spoiler", "channels": {"1": "block",
                                                                                             "2": "allow"}})
    assert rules.image_action("9", nsfw_channel=False, parent_id="1") == "block"
    assert rules.image_action("2", nsfw_channel=False, parent_id="1") == "allow"  # its own rule first
    assert rules.image_action("9", nsfw_channel=False, parent_id="5") == "spoiler"


def test_a_bad_change_is_refused_naming_what_is_wrong() -> None:
    rules = ServerRules()
    with pytest.raises(RequestInvalid, match="not a regular expression"):
        rules.changed({"banned_patterns": ("(unclosed",)})
    with pytest.raises(RequestInvalid, match="threshold"):
        rules.changed({"threshold": 1.5})
    with pytest.raises(RequestInvalid, match="/rules has no volume"):
        rules.changed({"volume": 11})
    with pytest.raises(RequestInvalid, match="limit is 200"):
        rules.changed({"banned_words": tuple(f"w{n}" for n in range(201))})
    assert rules.changed({"banned_words": (" gore ", "gore", "")}).banned_words == ("gore",)
