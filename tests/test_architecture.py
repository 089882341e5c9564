"""The arrows between packages go one way (docs/architecture.md): every import in the project's code,
at module level or inside a function, is checked against the table, and the package graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY = "entry points"  # fleetcli/ and every __main__.py: the command lines may import anything

# package -> the project's packages it may import (docs/architecture.md keeps the same table).
ALLOWED: dict[str, set[str]] = {
    "schemas": set(),
    "stats": set(),
    "bem": {"stats"},
    "fleet": {"schemas"},
    "workers": {"schemas", "stats", "bem", "fleet"},
    "fleetd": {"schemas", "stats", "fleet"},
    "web": {"schemas", "fleet"},
}
PACKAGES = {*ALLOWED, "fleetcli"}


def owner(path: Path) -> str:
    """The package a file belongs to for the table: its top folder, or the entry points."""
    rel = path.relative_to(REPO)
    if rel.parts[0] == "fleetcli" or rel.name == "__main__.py":
        return ENTRY
    return rel.parts[0]


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level project package, line) of every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in PACKAGES}
    return found


def edges() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) -> where, for every import that crosses a package boundary."""
    out: dict[tuple[str, str], list[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            src = owner(path)
            for dst, line in imported_packages(path):
                if dst != src:
                    out.setdefault((src, dst), []).append(f"{path.relative_to(REPO)}:{line}")
    return out


def test_every_import_is_in_the_table() -> None:
    wrong = [
        f"{src} -> {dst} ({', '.join(where)})"
        for (src, dst), where in sorted(edges().items())
        if src != ENTRY and dst not in ALLOWED[src]
    ]
    assert not wrong, "imports outside docs/architecture.md's table:\n" + "\n".join(wrong)


def test_the_package_graph_has_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for src, dst in edges():
        graph.setdefault(src, set()).add(dst)
    cycle = find_cycle(graph)
    assert cycle is None, f"package cycle: {' -> '.join(cycle or [])}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a path that returns to its start, or None (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


@pytest.mark.parametrize(
    ("graph", "cyclic"),
    [
        ({"a": {"b"}, "b": {"c"}}, False),
        ({"a": {"b"}, "b": {"a"}}, True),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"b", "c"}, "b": {"c"}}, False),
    ],
)
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], cyclic: bool) -> None:
    assert (find_cycle(graph) is not None) == cyclic


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from fleetd.store import Store\n    import bem.core.attach\n")
    assert imported_packages(f) == {("fleetd", 4), ("bem", 5)}


@pytest.mark.parametrize("package", ["bem", "stats"])
def test_the_libraries_public_surface_resolves(package: str) -> None:
    """Every name in __all__ is there (the lazy loader names real modules), and a fleet worker that
    imports only the reporter protocol does not pay for torch."""
    import importlib
    import subprocess
    import sys

    module = importlib.import_module(package)
    assert module.__all__ and all(getattr(module, name) is not None for name in module.__all__)
    code = "import sys, bem, bem.core.reporter, stats; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_the_bem_core_never_imports_a_mission() -> None:
    """Missions build on the core; the core knows no mission (a mission's parts belong in its folder)."""
    wrong = []
    for path in sorted((REPO / "bem" / "core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name.startswith("bem.missions") for name in names):
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not wrong, wrong


def test_every_registered_kind_and_service_resolves() -> None:
    """The registry's strings name real objects: a typo must fail here, not in a task's process."""
    from fleet import registry

    for table in (registry.KINDS, registry.SERVICES):
        for name, ref in table.items():
            assert callable(registry.resolve(ref)), (name, ref)
    for ref in registry.SERVICES.values():
        assert callable(registry.resolve(ref).from_config)
