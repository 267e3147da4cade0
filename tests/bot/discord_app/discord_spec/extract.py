"""Refresh application_command_create.json: the part of Discord's OpenAPI spec that a command sync is checked against.

From discord/discord-api-spec (MIT, LICENSE beside this file) it keeps only the schemas that
`ApplicationCommandCreateRequest` and `ApplicationCommandUpdateRequest` reach through `$ref`, plus the request
body of PUT /applications/{application_id}/commands (the bulk overwrite `tree.sync()` sends: a list of
`ApplicationCommandUpdateRequest`). `$ref`s keep their spec form (`#/components/schemas/...`), so the vendored
file is itself a small valid document. Run it on purpose, then let tests/bot/discord_app/test_command_schema.py judge:

    git clone https://github.com/discord/discord-api-spec /tmp/discord-api-spec
    python tests/bot/discord_app/discord_spec/extract.py /tmp/discord-api-spec/specs/openapi.json \\
        "$(git -C /tmp/discord-api-spec rev-parse HEAD)"
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
OUTPUT = HERE / "application_command_create.json"
ROOTS = ("ApplicationCommandCreateRequest", "ApplicationCommandUpdateRequest")
BULK_PATH = "/applications/{application_id}/commands"
PREFIX = "#/components/schemas/"


def refs(node: Any) -> Iterator[str]:
    """Every `$ref` string anywhere under `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def reachable(schemas: dict[str, Any], roots: tuple[str, ...]) -> dict[str, Any]:
    """The schemas `roots` reach through `$ref`, transitively, sorted by name."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in schemas:
            raise SystemExit(f"the spec has no schema {name!r}; has Discord renamed it? (roots: {', '.join(roots)})")
        seen.add(name)
        for ref in refs(schemas[name]):
            if not ref.startswith(PREFIX):
                raise SystemExit(f"{name} refers to {ref}, outside {PREFIX}; extend extract.py to follow it")
            todo.append(ref.removeprefix(PREFIX))
    return {name: schemas[name] for name in sorted(seen)}


def extract(spec: dict[str, Any], commit: str) -> dict[str, Any]:
    """The vendored document: a header naming the source, the bulk-overwrite body schema, and the schemas used."""
    body = spec["paths"][BULK_PATH]["put"]["requestBody"]["content"]["application/json"]["schema"]
    schemas = spec["components"]["schemas"]
    used = reachable(schemas, ROOTS + tuple(ref.removeprefix(PREFIX) for ref in refs(body)))
    return {
        "$comment": (f"Extracted by tests/bot/discord_app/discord_spec/extract.py from github.com/discord/discord-api-spec "
                     f"specs/openapi.json at commit {commit} (OpenAPI {spec.get('openapi')}, API v"
                     f"{spec.get('info', {}).get('version')}). MIT License, Copyright 2023 Discord: see LICENSE "
                     "in this folder. Do not edit by hand; rerun extract.py."),
        "source": {"repository": "https://github.com/discord/discord-api-spec", "path": "specs/openapi.json",
                   "commit": commit, "license": "MIT"},
        "bulk_overwrite": body,
        "components": {"schemas": used},
    }


def main() -> None:
    """Read the spec file named on the command line and write the vendored subset beside this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="specs/openapi.json of a discord-api-spec checkout")
    parser.add_argument("commit", help="the checkout's commit (git rev-parse HEAD), recorded in the header")
    args = parser.parse_args()
    document = extract(json.loads(args.spec.read_text(encoding="utf-8")), args.commit)
    OUTPUT.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {OUTPUT} ({len(document['components']['schemas'])} schemas)")


if __name__ == "__main__":
    main()
