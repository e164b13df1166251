"""The house as drawn from the code: imports among m2pt's own modules (at the top of a file or
inside a function) flow one way, the CLI's commands are reached only through ``cli.py``, and the
concrete backbones only through the registry."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# package -> folder, as pyproject.toml's package-dir lays them out
FOLDERS = {"m2pt_cli": REPO / "m2pt_cli", "m2pt_cli.backbones": REPO / "backbones"}
CONCRETE_BACKBONES = (
    "m2pt_cli.backbones.llava",
    "m2pt_cli.backbones.instructblip",
    "m2pt_cli.backbones.openclip_vicuna",
)


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "m2pt_cli" and parts[0] == "backbones":
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            modules[name] = path
    return modules


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the m2pt modules it imports (``from m2pt_cli import config`` counts as config)."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                found = known(target) if target.startswith("m2pt_cli") else None
                if found and found != name and not name.startswith(found + "."):  # a package's own parent
                    edges[name].add(found)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_imports_flow_one_way():
    assert _cycles(_imports(_modules())) == []


def test_commands_are_reached_only_through_the_cli():
    edges = _imports(_modules())
    outside = {
        (name, target)
        for name, targets in edges.items()
        for target in targets
        if target.startswith("m2pt_cli.commands") and not name.startswith(("m2pt_cli.commands", "m2pt_cli.cli"))
    }
    assert outside == set()


def test_concrete_backbones_are_reached_only_through_the_registry():
    edges = _imports(_modules())
    outside = {
        (name, target)
        for name, targets in edges.items()
        for target in targets
        if target in CONCRETE_BACKBONES and not name.startswith("m2pt_cli.backbones")
    }
    assert outside == set()
