"""The layout shows the flow: imports point downstream (front ends -> bot.core -> engine -> prompts), the core
never imports a transport (`discord`), the bot asks the engine service instead of reaching into its
executor, no two modules import each other (directly or round a loop).

Imports are read from the source (the AST), not from a running interpreter, so an import under
`if TYPE_CHECKING:` or inside a function counts as much as one at the top: each is a dependency a reader
has to follow, and a cycle through one is a cycle the first refactor turns into an ImportError.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from engine.graph import CycleError, topological_sort

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "engine", "prompts")
# a folder -> the modules (each with everything below it) that no module inside the folder may import
FORBIDDEN = {
    "engine": ("bot",),
    "prompts": ("bot", "engine"),
    "bot/core": ("discord", "bot.discord_app", "bot.console"),  # the transport-free core: front ends sit on it
    "bot/console": ("discord", "bot.discord_app"),
}


def module_name(path: Path) -> str:
    """`engine/models/paths.py` -> `engine.models.paths`; a package's `__init__.py` is the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(module: str, source: str, *, is_package: bool = False) -> set[str]:
    """Every dotted name `module`'s source imports, anywhere in the file, relative imports resolved.

    `from a import b` gives both `a` and `a.b`: b may be a submodule; which names are modules is the
    caller's to decide.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anchor = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join([*anchor, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    names.discard("")
    return names


def _our_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def _imports_of(path: Path) -> set[str]:
    return imported_names(module_name(path), path.read_text(encoding="utf-8"), is_package=path.name == "__init__.py")


def import_graph(sources: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """Module -> the modules of `sources` it imports: each name maps to its longest prefix that is a module.

    Only the named module counts, not the packages above it (`import engine.models.paths` is an edge to
    engine.models.paths, not to engine.models): an `__init__.py` is an edge only when it is imported itself.
    """
    def target(name: str) -> str | None:
        while name and name not in sources:
            name = name.rpartition(".")[0]
        return name or None

    return {module: {t for name in names if (t := target(name)) and t != module} for module, names in sources.items()}


def import_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module, as the modules in import order."""
    edges = {module: sorted(set(targets)) for module, targets in graph.items()}
    try:  # the workflow graph's own Tarjan: it reports every strongly connected component, not the first loop
        topological_sort(sorted(edges), lambda module: edges.get(module, ()))
    except CycleError as err:
        return [_loop_through(sorted(cycle), edges) for cycle in sorted(sorted(cycle) for cycle in err.cycles)]
    return []


def _loop_through(component: list[str], edges: Mapping[str, list[str]]) -> list[str]:
    """The shortest import loop from the component's first module back to it, the first module repeated."""
    start, inside = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for step in edges[module]:
            if step == start:
                loop = [module]
                while loop[-1] != start:
                    loop.append(came_from[loop[-1]])
                return [start, *reversed(loop[:-1]), start] if module != start else [start, start]
            if step in inside and step not in came_from:
                came_from[step] = module
                queue.append(step)
    raise AssertionError(f"{component} is not strongly connected")  # pragma: no cover - Tarjan's invariant


def _under(name: str, root: str) -> bool:
    return name == root or name.startswith(f"{root}.")


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_point_downstream(folder: str) -> None:
    offenders = []
    for path in sorted((REPO / folder).rglob("*.py")):
        upstream = {root for name in _imports_of(path) for root in FORBIDDEN[folder] if _under(name, root)}
        if upstream:
            offenders.append(f"{path.relative_to(REPO)} imports {sorted(upstream)}")
    assert not offenders, offenders


def test_the_downstream_rule_catches_a_core_module_importing_discord() -> None:
    names = imported_names("bot.core.cards.result", "import discord.ui\nfrom bot.discord_app.embeds import x")
    assert {root for name in names for root in FORBIDDEN["bot/core"] if _under(name, root)} == \
        {"discord", "bot.discord_app"}
    assert not _under("discordant", "discord")


def test_the_bot_asks_the_engine_service_and_never_reaches_into_its_executor() -> None:
    """`engine.executor.models` / `.settings` from the bot would tie it to the engine's insides: the engine service
    answers choices, architecture, folders and validation (engine/queue/service.py)."""
    offenders = [f"{path.relative_to(REPO)}:{node.lineno}" for path in sorted((REPO / "bot").rglob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Attribute) and node.attr == "executor"]
    assert not offenders, offenders


def test_no_import_cycles_between_modules() -> None:
    graph = import_graph({module: _imports_of(path) for module, path in _our_modules().items()})
    cycles = [" -> ".join(cycle) for cycle in import_cycles(graph)]
    assert not cycles, "modules that import each other (move what both need into a module below them):\n" + \
        "\n".join(cycles)


def test_the_import_reader_sees_type_checking_function_and_relative_imports() -> None:
    source = """
from typing import TYPE_CHECKING
from . import sibling
from .. import up
if TYPE_CHECKING:
    from engine.models.manager import ModelManager
def later():
    import bot.cards.text
"""
    names = imported_names("engine.nodes.base", source)
    assert {"engine.nodes.sibling", "engine.up", "engine.models.manager", "bot.cards.text"} <= names
    assert imported_names("prompts", "from .cache import X", is_package=True) >= {"prompts.cache"}


def test_a_loop_of_three_is_reported_in_import_order() -> None:
    sources = {"a": {"b.thing"}, "b": {"c", "os"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    graph = import_graph(sources)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
    assert import_cycles(import_graph({"a": {"b"}, "b": set()})) == []


def test_no_weights_in_the_tree() -> None:
    tracked = [p for p in REPO.rglob("*") if p.suffix in {".safetensors", ".ckpt", ".pt", ".bin"}
               and ".cache" not in p.parts and ".venv" not in p.parts and "output" not in p.parts]
    assert not tracked, tracked


def test_test_folders_mirror_the_packages() -> None:
    """tests/bot/core/services/ tests bot/core/services/: a test package is a folder, not a file-name prefix."""
    strays = [str(folder.relative_to(REPO)) for folder in sorted((REPO / "tests").rglob("__init__.py"))
              if folder.parent != REPO / "tests"
              and not (REPO / folder.parent.relative_to(REPO / "tests") / "__init__.py").is_file()]
    assert not strays, f"test packages with no package of the same path: {strays}"
