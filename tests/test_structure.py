"""The shape of the code, checked: no import loops between modules of prune_core/ and daemon/
(counting every import, inside functions and under TYPE_CHECKING too); the daemon's clients reach
it over HTTP only; docs/architecture.md's module table names every module that exists, once, and
no module that does not."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("prune_core", "daemon")
ARCHITECTURE = REPO / "docs" / "architecture.md"
# What a client may import from the daemon besides daemon.clients: the cycle states the API speaks
# (a wire enum, torch-free) and the rule its child processes follow (die with the parent).
CLIENT_ALLOWED = {"daemon.cycles.cycle_state", "daemon.workers.child_process"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The modules of ours an import statement loads (`from . import x` is module `x`, not the package)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    found = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        graph[module] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= _imported(module, node)
    return graph


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    loops.append(sorted(component))
    return loops


def test_no_import_loops():
    assert import_loops(import_graph()) == []


def test_the_loop_check_sees_a_loop():
    assert import_loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_loops({"a": {"b"}, "b": set()}) == []


def test_clients_use_http_only():
    graph = import_graph()
    reached = {(client, used) for client in graph if client.startswith("daemon.clients")
               for used in graph[client] if used.startswith("daemon.") and not used.startswith("daemon.clients")}
    assert {(c, u) for c, u in reached if u not in CLIENT_ALLOWED} == set()


def _table_rows() -> list[str]:
    text = ARCHITECTURE.read_text()
    table = text[text.index("## The modules"):]
    table = table[:table.index("\n## ")]
    return [line for line in table.splitlines() if line.startswith("| `")]


def _named(cell: str) -> list[str]:
    return re.findall(r"`((?:prune_core|daemon)/[\w/]*(?:\.py|/))`", cell)


def test_architecture_names_only_modules_that_exist():
    text = ARCHITECTURE.read_text()
    named = set(re.findall(r"\b((?:prune_core|daemon)/[\w/]+\.py)\b", text))
    named |= set(re.findall(r"\b((?:prune_core|daemon)/[\w/]+/)", text))
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert missing == [], f"docs/architecture.md names what does not exist: {missing}"


def test_architecture_table_names_every_module_once():
    rows = [_named(row.split(" | ")[0]) for row in _table_rows()]
    paths = [p for row in rows for p in row]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    assert twice == [], f"docs/architecture.md's module table has more than one row for {twice}"
    unnamed = []
    for path in MODULES.values():
        relative = path.relative_to(REPO).as_posix()
        if path.name == "__init__.py" and relative.count("/") == 1:
            continue  # the package itself
        folders = [relative[:i + 1] for i, ch in enumerate(relative) if ch == "/"][1:]  # daemon/engines/, ...
        if relative not in paths and not any(f in paths for f in folders):
            unnamed.append(relative)
    assert unnamed == [], f"docs/architecture.md's module table does not name: {unnamed}"


@pytest.mark.parametrize("row", ["| `daemon/nowhere.py` | x |"])
def test_the_table_check_reads_a_row(row):
    assert _named(row.split(" | ")[0]) == ["daemon/nowhere.py"]
