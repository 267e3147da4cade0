"""Every application command Noodle syncs is one Discord accepts: its OpenAPI schema, then the documented rules.

The schema is the vendored part of discord/discord-api-spec (tests/bot/discord_app/discord_spec/, refreshed by extract.py).
The spec leaves some rules of discord.com/developers/docs/interactions/application-commands unencoded;
`documented_problems` checks those. One bad option fails the whole bulk overwrite and leaves a server
without commands, so each negative case below proves that a rule really bites.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import regex

from bot.discord_app.client import command_payloads
from bot.settings import Settings

SPEC = Path(__file__).parent / "discord_spec" / "application_command_create.json"
# discord.com/developers/docs/interactions/application-commands#application-command-object-application-command-naming
NAME = regex.compile(r"^[-_\p{L}\p{N}\p{sc=Deva}\p{sc=Thai}]{1,32}$")
MAX_OPTIONS = 25
MAX_CHOICES = 25
MAX_COMBINED = 4000  # name, description and values of a command, its options, subcommands and choices
INT_LIMIT = 2**53 - 1  # option type 4: "any integer between -2^53 and 2^53", exclusive, as Int53Type says
SUBCOMMAND, GROUP, INTEGER = 1, 2, 4


def _document() -> dict[str, Any]:
    return json.loads(SPEC.read_text(encoding="utf-8"))


def validator(root: str) -> jsonschema.protocols.Validator:
    """A JSON Schema 2020-12 validator (OpenAPI 3.1's dialect) for `root`, a pointer into the vendored document."""
    schema = {**_document(), "$ref": root}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


CREATE = "#/components/schemas/ApplicationCommandCreateRequest"
BULK = "#/bulk_overwrite"  # the body of PUT /applications/{application_id}/commands, what tree.sync() sends


def _leaves(error: jsonschema.ValidationError) -> Iterator[jsonschema.ValidationError]:
    """The errors that say what is wrong: inside a `oneOf` of option kinds, those of the kind whose `type` matched."""
    if error.validator != "oneOf" or not error.context:
        yield error
        return
    branches: dict[Any, list[jsonschema.ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    # a kind whose `type` differs, or the `null` of a nullable field, is not what this value meant to be
    matching = [subs for subs in branches.values()
                if not any(list(sub.relative_path) == ["type"] or sub.validator_value == "null" for sub in subs)]
    if len(matching) != 1:
        yield error  # no kind (or several) claims this value: the oneOf's own message says so
        return
    for sub in matching[0]:
        yield from _leaves(sub)


def spec_errors(payload: Any, root: str = CREATE) -> list[str]:
    """The schema's complaints about `payload`, each with the path to the bad value."""
    return [f"{'/'.join(map(str, leaf.absolute_path)) or '(root)'}: {leaf.message}"
            for error in validator(root).iter_errors(payload) for leaf in _leaves(error)]


def _options(owner: dict[str, Any]) -> list[dict[str, Any]]:
    return list(owner.get("options") or [])


def _levels(command: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The command and each subcommand (group): every level that holds its own options."""
    yield f"/{command['name']}", command
    for option in _options(command):
        if option["type"] in (SUBCOMMAND, GROUP):
            for path, level in _levels(option):
                yield f"/{command['name']} {path[1:]}", level


def _longest(owner: dict[str, Any], field: str) -> int:
    """A field's length as Discord counts it: the longest of the default and its localizations."""
    texts = [str(owner.get(field) or ""), *(owner.get(f"{field}_localizations") or {}).values()]
    return max(len(text) for text in texts)


def combined_length(command: dict[str, Any]) -> int:
    """Characters of names, descriptions and choice names and values, over the command and all its options."""
    total = _longest(command, "name") + _longest(command, "description")
    for option in _options(command):
        total += combined_length(option)
        for choice in option.get("choices") or []:
            total += _longest(choice, "name") + len(str(choice["value"]))
    return total


def documented_problems(command: dict[str, Any]) -> list[str]:
    """What Discord's documentation forbids that the OpenAPI schema does not encode; empty when none."""
    problems = []
    if combined_length(command) > MAX_COMBINED:
        problems.append(f"/{command['name']}: {combined_length(command)} characters combined, over {MAX_COMBINED}")
    for path, level in _levels(command):
        options = _options(level)
        names = [level["name"], *(option["name"] for option in options)]
        for name in names:
            if not NAME.match(name) or name != name.lower():
                problems.append(f"{path}: name {name!r} is not 1-32 lower-case letters, digits, - or _")
        for text in [level.get("description") or "", *(option.get("description") or "" for option in options)]:
            if not 1 <= len(text) <= 100:
                problems.append(f"{path}: description of {len(text)} characters (1-100 allowed): {text[:40]!r}")
        if len(options) > MAX_OPTIONS:
            problems.append(f"{path}: {len(options)} options, over {MAX_OPTIONS}")
        if len(set(names[1:])) != len(names[1:]):
            problems.append(f"{path}: two options share a name")
        required = [bool(option.get("required")) for option in options]
        if required != sorted(required, reverse=True):
            problems.append(f"{path}: a required option comes after an optional one")
        for option in options:
            problems += _option_problems(path, option)
    return problems


def _option_problems(path: str, option: dict[str, Any]) -> list[str]:
    where = f"{path} {option['name']}:"
    problems = []
    choices = option.get("choices") or []
    if len(choices) > MAX_CHOICES:
        problems.append(f"{where} {len(choices)} choices, over {MAX_CHOICES}")
    if choices and option.get("autocomplete"):
        problems.append(f"{where} autocomplete with choices")
    for choice in choices:
        if not 1 <= len(choice["name"]) <= 100 or (isinstance(choice["value"], str) and len(choice["value"]) > 100):
            problems.append(f"{where} choice {choice['name']!r} is over 100 characters")
    if option["type"] == INTEGER:
        for bound in ("min_value", "max_value"):
            value = option.get(bound)
            if value is not None and (not isinstance(value, int) or abs(value) > INT_LIMIT):
                problems.append(f"{where} {bound} {value} is not an integer within ±(2^53 - 1)")
    low, high = option.get("min_value"), option.get("max_value")
    if low is not None and high is not None and low > high:
        problems.append(f"{where} min_value {low} is above max_value {high}")
    if option.get("min_length") is not None and option.get("max_length") is not None \
            and option["min_length"] > option["max_length"]:
        problems.append(f"{where} min_length is above max_length")
    return problems


def all_problems(payloads: list[dict[str, Any]]) -> list[str]:
    """Schema errors of the whole bulk body and of each command, then the documented rules."""
    problems = spec_errors(payloads, BULK)
    for command in payloads:
        problems += [f"/{command['name']} {error}" for error in spec_errors(command)]
        problems += documented_problems(command)
    return problems


@pytest.fixture(scope="module")
async def payloads() -> list[dict[str, Any]]:
    return await command_payloads(Settings())


def _command(payloads: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return copy.deepcopy(next(command for command in payloads if command["name"] == name))


def _option(command: dict[str, Any], name: str) -> dict[str, Any]:
    return next(option for option in _options(command) if option["name"] == name)


# -- what Noodle syncs -------------------------------------------------------------------------------------------

def test_the_vendored_schema_names_its_source_and_is_complete() -> None:
    document = _document()
    assert document["source"]["repository"] == "https://github.com/discord/discord-api-spec"
    assert len(document["source"]["commit"]) == 40 and document["source"]["license"] == "MIT"
    assert "MIT License" in (SPEC.parent / "LICENSE").read_text(encoding="utf-8")
    schemas = document["components"]["schemas"]
    text = json.dumps(document)
    referenced = {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}
    assert referenced <= set(schemas), f"dangling $ref: {sorted(referenced - set(schemas))}"
    assert {"ApplicationCommandCreateRequest", "ApplicationCommandIntegerOption", "Int53Type"} <= set(schemas)


async def test_every_synced_command_is_valid_against_discords_spec_and_documented_rules(
        payloads: list[dict[str, Any]]) -> None:
    assert [command["name"] for command in payloads] == ["imagine", "preset", "settings", "tokens", "history",
                                                         "models", "queue", "workflow", "rules", "mod"]
    assert all_problems(payloads) == []
    rules, mod = payloads[-2], payloads[-1]
    # server-only, shown by default to those who may use them (the Studio checks again in code)
    assert rules["dm_permission"] is False and int(rules["default_member_permissions"]) == 1 << 5  # Manage Server
    assert mod["dm_permission"] is False and int(mod["default_member_permissions"]) == 1 << 13  # Manage Messages
    assert [option["name"] for option in mod["options"]] == ["history", "block", "unblock", "blocked"]


async def test_the_limits_in_config_toml_keep_the_commands_valid() -> None:
    settings = Settings()
    stretched = settings.model_copy(update={"limits": settings.limits.model_copy(
        update={"max_prompt_chars": 6000, "max_side": 16384, "max_steps": 10_000})})
    assert all_problems(await command_payloads(stretched)) == []


async def test_queue_cancel_stops_at_discords_largest_integer(payloads: list[dict[str, Any]]) -> None:
    cancel = _option(_command(payloads, "queue"), "cancel")
    assert (cancel["min_value"], cancel["max_value"]) == (1, 2**53 - 1)


# -- each rule bites: the payload as it was, and deliberately broken ones -----------------------------------------

async def test_the_old_queue_cancel_bound_of_2_to_the_53_is_refused(payloads: list[dict[str, Any]]) -> None:
    queue = _command(payloads, "queue")
    _option(queue, "cancel")["max_value"] = 2**53  # what bot/discord_app/cogs/queue.py sent before issue 12
    assert spec_errors(queue) == ["options/0/max_value: 9007199254740992 is greater than the maximum of "
                                  "9007199254740991"]
    assert spec_errors([queue], BULK) == ["0/options/0/max_value: 9007199254740992 is greater than the maximum of "
                                          "9007199254740991"]
    assert documented_problems(queue) == ["/queue cancel: max_value 9007199254740992 is not an integer within "
                                          "±(2^53 - 1)"]


def _breakages() -> Iterator[tuple[str, str, Any]]:
    """(what is broken, text expected in a complaint, how to break an /imagine payload)."""
    def rename(c: dict[str, Any]) -> None:
        c["name"] = "Imagine"

    def option_name(c: dict[str, Any]) -> None:
        c["options"][1]["name"] = "has space"

    def long_name(c: dict[str, Any]) -> None:
        c["options"][1]["name"] = "x" * 33

    def long_description(c: dict[str, Any]) -> None:
        c["options"][1]["description"] = "d" * 101

    def empty_description(c: dict[str, Any]) -> None:
        c["options"][1]["description"] = ""

    def too_many_options(c: dict[str, Any]) -> None:
        c["options"] += [{"type": 5, "name": f"flag{i}", "description": "a flag"}
                         for i in range(MAX_OPTIONS + 1 - len(c["options"]))]

    def required_late(c: dict[str, Any]) -> None:
        c["options"][-1]["required"] = True

    def too_many_choices(c: dict[str, Any]) -> None:
        _option(c, "sampler")["choices"] = [{"name": f"s{i}", "value": f"s{i}"} for i in range(26)]

    def too_long(c: dict[str, Any]) -> None:
        for option in c["options"]:
            option["description"] = "y" * 100
        _option(c, "sampler")["choices"] = [{"name": "n" * 100, "value": "v" * 100} for _ in range(25)]

    def too_small(c: dict[str, Any]) -> None:
        _option(c, "seed")["min_value"] = -(2**53)

    def float_bound(c: dict[str, Any]) -> None:
        _option(c, "steps")["max_value"] = 150.5

    def string_too_long(c: dict[str, Any]) -> None:
        _option(c, "prompt")["max_length"] = 6001

    def unknown_type(c: dict[str, Any]) -> None:
        c["options"][1]["type"] = 12

    yield "an upper-case command name", "'Imagine' is not 1-32", rename
    yield "a space in an option name", "'has space' is not 1-32", option_name
    yield "a 33-character option name", "is too long", long_name
    yield "a 101-character description", "is too long", long_description
    yield "an empty description", "should be non-empty", empty_description
    yield "26 options", "26 options, over 25", too_many_options
    yield "a required option after optional ones", "a required option comes after", required_late
    yield "26 choices", "is too long", too_many_choices
    yield "over 4,000 characters combined", "characters combined, over 4000", too_long
    yield "a min_value below -(2^53 - 1)", "-9007199254740992", too_small
    yield "a fractional integer bound", "150.5", float_bound
    yield "a max_length over 6000", "6001", string_too_long
    yield "an unknown option type", "options/1", unknown_type


@pytest.mark.parametrize(("broken", "expected", "breaker"), list(_breakages()), ids=[b[0] for b in _breakages()])
async def test_a_broken_payload_is_refused(payloads: list[dict[str, Any]], broken: str, expected: str,
                                           breaker: Any) -> None:
    imagine = _command(payloads, "imagine")
    assert all_problems([imagine]) == []
    breaker(imagine)
    problems = all_problems([imagine])
    assert any(expected in problem for problem in problems), f"{broken}: {problems}"


async def test_imagine_takes_a_control_image_a_controlnet_and_a_bounded_strength(
        payloads: list[dict[str, Any]]) -> None:
    imagine = _command(payloads, "imagine")
    assert len(_options(imagine)) == 21 <= MAX_OPTIONS and combined_length(imagine) <= MAX_COMBINED
    assert _option(imagine, "control_image")["type"] == 11  # an attachment
    assert _option(imagine, "controlnet")["autocomplete"] is True
    strength = _option(imagine, "control_strength")
    assert (strength["type"], strength["min_value"], strength["max_value"]) == (10, 0.0, 2.0)
    assert _option(imagine, "control_canny")["type"] == 5  # a boolean
