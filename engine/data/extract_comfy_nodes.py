"""Write engine/data/comfyui_nodes.json: every node class_type a stock ComfyUI install has, read from its source.

Run it on a ComfyUI git directory (a bare clone works: files are read with `git show`), then commit the JSON:

    python engine/data/extract_comfy_nodes.py /path/to/ComfyUI/.git [--out engine/data/comfyui_nodes.json]

Nothing is imported from ComfyUI: the files are parsed with `ast`. Built-in means what `nodes.py` registers
itself (`NODE_CLASS_MAPPINGS`) plus the files `init_builtin_extra_nodes` loads from `comfy_extras/` and the
one node file the repository ships in `custom_nodes/` (SaveImageWebsocket); `comfy_api_nodes/` (paid cloud
services) is listed apart as "api". Per node it keeps the ComfyUI category and
the model folders its inputs list (`folder_paths.get_filename_list("controlnet")`), which `noodle coverage`
reports as model kinds. Standard library only, so it runs anywhere.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).with_name("comfyui_nodes.json")


def git_show(git_dir: Path, path: str) -> str:
    """One file of the ComfyUI tree at HEAD."""
    return subprocess.run(["git", "--git-dir", str(git_dir), "show", f"HEAD:{path}"], check=True,
                          capture_output=True, text=True).stdout


def _strings(node: ast.AST) -> list[str]:
    """The string constants of a list/tuple literal."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return [item.value for item in node.elts if isinstance(item, ast.Constant) and isinstance(item.value, str)]
    return []


def _loaded_files(nodes_py: ast.Module, function: str) -> list[str]:
    """The file names listed in `function` of nodes.py (init_builtin_extra_nodes, init_builtin_api_nodes)."""
    for item in ast.walk(nodes_py):
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == function:
            for assign in ast.walk(item):
                if isinstance(assign, ast.Assign) and isinstance(assign.value, ast.List):
                    names = _strings(assign.value)
                    if names and all(name.endswith(".py") for name in names):
                        return names
    raise SystemExit(f"nodes.py has no file list in {function}(); is this ComfyUI?")


def _folders(node: ast.AST) -> list[str]:
    """Model folders listed inside `node`: the arguments of get_filename_list("...") calls."""
    found = []
    for call in ast.walk(node):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr == "get_filename_list" and call.args
                and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
            found.append(call.args[0].value)
    return found


def _class_attribute(cls: ast.ClassDef, name: str) -> str | None:
    for item in cls.body:
        if (isinstance(item, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in item.targets)
                and isinstance(item.value, ast.Constant) and isinstance(item.value.value, str)):
            return item.value.value
    return None


class _Module:
    """The classes of one ComfyUI source file, with what each declares (bases followed inside the file)."""

    def __init__(self, path: str, source: str) -> None:
        self.path = path
        self.tree = ast.parse(source, filename=path)
        self.classes = {item.name: item for item in ast.walk(self.tree) if isinstance(item, ast.ClassDef)}

    def _lineage(self, name: str) -> list[ast.ClassDef]:
        chain, seen = [], set()
        while name in self.classes and name not in seen:
            seen.add(name)
            cls = self.classes[name]
            chain.append(cls)
            base = next((b.id for b in cls.bases if isinstance(b, ast.Name)), None)
            name = base or ""
        return chain

    def describe(self, class_name: str, category: str | None = None) -> dict[str, object]:
        chain = self._lineage(class_name)
        if category is None:
            category = next((c for cls in chain if (c := _class_attribute(cls, "CATEGORY")) is not None), "")
        folders = sorted({folder for cls in chain for folder in _folders(cls)})
        return {"category": category, "folders": folders, "source": self.path}

    def mapped_nodes(self) -> dict[str, dict[str, object]]:
        """Old-style nodes: NODE_CLASS_MAPPINGS = {"Name": Class, ...} (and .update({...}), ["Name"] = Class)."""
        found: dict[str, dict[str, object]] = {}

        def take(mapping: ast.Dict) -> None:
            for key, value in zip(mapping.keys, mapping.values):
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    class_name = value.id if isinstance(value, ast.Name) else ""
                    found[key.value] = self.describe(class_name)

        for item in ast.walk(self.tree):
            if isinstance(item, (ast.Assign, ast.AnnAssign)):
                targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                for target in targets:
                    if isinstance(target, ast.Name) and target.id == "NODE_CLASS_MAPPINGS" \
                            and isinstance(item.value, ast.Dict):
                        take(item.value)
                    elif (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                          and target.value.id == "NODE_CLASS_MAPPINGS" and isinstance(target.slice, ast.Constant)
                          and isinstance(item.value, ast.Name)):
                        found[str(target.slice.value)] = self.describe(item.value.id)
            elif (isinstance(item, ast.Call) and isinstance(item.func, ast.Attribute) and item.func.attr == "update"
                  and isinstance(item.func.value, ast.Name) and item.func.value.id == "NODE_CLASS_MAPPINGS"
                  and item.args and isinstance(item.args[0], ast.Dict)):
                take(item.args[0])
        return found

    def schema_nodes(self) -> dict[str, dict[str, object]]:
        """New-style nodes (comfy_api io.ComfyNode): io.Schema(node_id="Name", category="...") in a class."""
        found: dict[str, dict[str, object]] = {}
        for cls in self.classes.values():
            for call in ast.walk(cls):
                if not (isinstance(call, ast.Call) and getattr(call.func, "attr", getattr(call.func, "id", ""))
                        == "Schema"):
                    continue
                kwargs = {kw.arg: kw.value for kw in call.keywords if kw.arg}
                node_id = kwargs.get("node_id")
                if isinstance(node_id, ast.Constant) and isinstance(node_id.value, str):
                    category = kwargs.get("category")
                    found[node_id.value] = self.describe(
                        cls.name, category.value if isinstance(category, ast.Constant) else "")
        return found


def extract(git_dir: Path) -> dict[str, object]:
    """The built-in and API node class_types of the ComfyUI at `git_dir`'s HEAD."""
    nodes_source = git_show(git_dir, "nodes.py")
    nodes_py = _Module("nodes.py", nodes_source)
    builtin = nodes_py.mapped_nodes()
    for name in _loaded_files(nodes_py.tree, "init_builtin_extra_nodes"):
        module = _Module(f"comfy_extras/{name}", git_show(git_dir, f"comfy_extras/{name}"))
        builtin.update({**module.mapped_nodes(), **module.schema_nodes()})
    # SaveImageWebsocket: ComfyUI's repository ships it in custom_nodes/, so every install loads it at start
    bundled = "custom_nodes/websocket_image_save.py"
    if subprocess.run(["git", "--git-dir", str(git_dir), "cat-file", "-e", f"HEAD:{bundled}"],
                      capture_output=True).returncode == 0:
        builtin.update(_Module(bundled, git_show(git_dir, bundled)).mapped_nodes())
    api: dict[str, dict[str, object]] = {}
    for name in _loaded_files(nodes_py.tree, "init_builtin_api_nodes"):
        module = _Module(f"comfy_api_nodes/{name}", git_show(git_dir, f"comfy_api_nodes/{name}"))
        api.update({**module.mapped_nodes(), **module.schema_nodes()})
    version_source = git_show(git_dir, "comfyui_version.py")
    version = next((node.value.value for node in ast.walk(ast.parse(version_source))
                    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)), "")
    commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    return {
        "comfyui_version": version,
        "commit": commit,
        "builtin": {name: builtin[name] for name in sorted(builtin)},
        "api": {name: api[name] for name in sorted(api) if name not in builtin},
    }


def dumps(data: dict[str, object]) -> str:
    """The JSON with one node a line, so a new ComfyUI release reads as a short diff."""
    lines = ["{"]
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f" {json.dumps(key)}: {{")
            entries = [f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in value.items()]
            lines.append(",\n".join(entries))
            lines.append(" },")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)},")
    lines[-1] = lines[-1].rstrip(",")
    return "\n".join(lines + ["}", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("git_dir", type=Path, help="a ComfyUI git directory (.git of a clone, or a bare repo)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    data = extract(args.git_dir)
    args.out.write_text(dumps(data), encoding="utf-8")
    builtin, api = data["builtin"], data["api"]
    assert isinstance(builtin, dict) and isinstance(api, dict)
    print(f"{args.out}: ComfyUI {data['comfyui_version']} ({str(data['commit'])[:10]}), "
          f"{len(builtin)} built-in and {len(api)} API node types", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
