"""The import rule that keeps the architecture readable: flows -> tasks -> gpu_runtime, and inside
``tasks`` each package imports only from itself and the packages below it (the order here is the
order of a run's data: storage and config at the bottom, scheduling at the top)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Bottom first. "" is the modules at the top of tasks/ that every package may use.
TASK_LAYERS = [
    "",
    "storage",
    "config",
    "planning",
    "records",
    "output",
    "compute",
    "tracking",
    "quality",
    "forecasting",
    "schedule",
]


def imported_modules(source: Path) -> list[str]:
    """Every absolute module ``source`` imports, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def task_package(module: str) -> str:
    """``tasks.records.shard_io`` -> ``records``; ``tasks.errors`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in TASK_LAYERS else ""


def test_every_tasks_package_has_a_layer():
    packages = {p.name for p in (ROOT / "tasks").iterdir() if (p / "__init__.py").exists()}
    assert packages == set(TASK_LAYERS) - {""}


def test_tasks_packages_import_only_downward():
    upward = []
    for source in (ROOT / "tasks").rglob("*.py"):
        module = ".".join(source.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        own = TASK_LAYERS.index(task_package(module))
        for target in imported_modules(source):
            if target.startswith("flows"):
                upward.append(f"{module} imports {target}")
            elif target.startswith("tasks.") and TASK_LAYERS.index(task_package(target)) > own:
                upward.append(f"{module} imports {target}")
    assert not upward, "\n".join(upward)


def test_gpu_runtime_imports_neither_tasks_nor_flows():
    offenders = [
        f"{source.name} imports {target}"
        for source in (ROOT / "gpu_runtime").rglob("*.py")
        for target in imported_modules(source)
        if target.split(".")[0] in {"tasks", "flows"}
    ]
    assert not offenders, offenders
