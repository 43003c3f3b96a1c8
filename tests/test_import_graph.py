"""The project's modules import one another without a cycle, and none of flows/, tasks/ or
gpu_runtime/ is longer than MAX_LINES lines.

Every import statement counts: at module level, inside functions, and under ``TYPE_CHECKING``. A
cycle that a function-level import keeps from failing at import time is still two modules that can
be neither read, changed nor tested one without the other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The folders installed as the ``shardwise`` namespace (pyproject.toml's package-dir).
FOLDERS = ("shardwise", "flows", "tasks", "gpu_runtime")
SIZED = ("flows", "tasks", "gpu_runtime")
MAX_LINES = 400


def module_name(source: Path) -> str:
    """The installed name of a source file: ``tasks/errors.py`` -> ``shardwise.tasks.errors``,
    ``flows/__init__.py`` -> ``shardwise.flows``, ``shardwise/__init__.py`` -> ``shardwise``."""
    parts = source.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "shardwise":
        parts = parts[1:]
    return ".".join(("shardwise", *parts)).removesuffix(".__init__")


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for folder in FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))}


def imported_modules(source: Path, module: str, modules: set[str]) -> set[str]:
    """The project modules ``source`` (the module ``module``) imports, anywhere in it. ``from P
    import name`` imports the module ``P.name`` when there is one, else ``P``."""
    package = module if source.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per dot past the first
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return {name for name in found if name in modules and name != module}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    names = set(modules)
    return {module: imported_modules(path, module, names) for module, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle of ``graph``, each once, as a chain that starts and ends at its
    alphabetically first module: ``[a, b, a]``."""
    found: list[list[str]] = []
    for component in strongly_connected(graph):
        if len(component) < 2:
            continue
        order = sorted(component)
        for i, start in enumerate(order):
            allowed = set(order[i:])  # a cycle is found from its smallest module only
            path = [start]
            stack = [iter(sorted(graph[start] & allowed))]
            while stack:
                target = next(stack[-1], None)
                if target is None:
                    stack.pop()
                    path.pop()
                elif target == start:
                    found.append([*path, start])
                elif target not in path:
                    path.append(target)
                    stack.append(iter(sorted(graph[target] & allowed)))
    return sorted(found)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def test_the_cycle_finder_finds_every_cycle_once():
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "a"], ["a", "b", "c", "a"]]


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "shardwise.flows.enrich" in graph["shardwise.flows.run"]  # imported inside execute_run
    assert "shardwise.tasks.errors" in graph["shardwise.tasks.storage.fs"]


def test_no_import_cycle_between_the_projects_modules():
    found = cycles(import_graph())
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(" -> ".join(chain) for chain in found)


def test_no_module_is_longer_than_max_lines():
    long = {
        str(path.relative_to(ROOT)): lines
        for folder in SIZED
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(f"{p}: {n}" for p, n in long.items())
