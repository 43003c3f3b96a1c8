"""The import rule that keeps the architecture readable: flows -> tasks -> gpu_runtime, and inside
``tasks`` each package imports only from itself and the packages below it (the order here is the
order of a run's data: storage and config at the bottom, scheduling above them all, and the
orchestration package, the only one that imports Prefect, on top). MLflow is imported by one
module. Every import of the project's own code goes through the one installed namespace,
``shardwise``."""

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
    "orchestration",
]
# The package that holds everything Prefect (tasks, task runners, artifacts, deployment runs).
ORCHESTRATION = "orchestration"
FRAMEWORK_IMPORTS = {"prefect", "prefect_ray"}
# The one module that talks to the MLflow tracking store.
MLFLOW_STORE = "shardwise.tasks.tracking.mlflow_store"


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
    """``shardwise.tasks.records.shard_io`` -> ``records``; ``shardwise.tasks.errors`` -> ``""``."""
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[2] in TASK_LAYERS else ""


def module_name(source: Path) -> str:
    """The installed name of a source file: ``tasks/errors.py`` -> ``shardwise.tasks.errors``."""
    return "shardwise." + ".".join(source.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_every_tasks_package_has_a_layer():
    packages = {p.name for p in (ROOT / "tasks").iterdir() if (p / "__init__.py").exists()}
    assert packages == set(TASK_LAYERS) - {""}
    assert TASK_LAYERS[-1] == ORCHESTRATION, "nothing in tasks/ may import the orchestration package"


def test_only_the_orchestration_package_imports_prefect():
    """Steps are plain functions; their Prefect tasks, runners and artifacts live in one package."""
    offenders = [
        f"{module_name(source)} imports {target}"
        for source in (ROOT / "tasks").rglob("*.py")
        if task_package(module_name(source)) != ORCHESTRATION
        for target in imported_modules(source)
        if target.split(".")[0] in FRAMEWORK_IMPORTS
    ]
    assert not offenders, "\n".join(offenders)


def test_only_the_mlflow_store_imports_mlflow():
    offenders = [
        f"{source.relative_to(ROOT)} imports {target}"
        for folder in ("tasks", "flows")
        for source in (ROOT / folder).rglob("*.py")
        if module_name(source) != MLFLOW_STORE
        for target in imported_modules(source)
        if target.split(".")[0] == "mlflow"
    ]
    assert not offenders, "\n".join(offenders)


def test_tasks_packages_import_only_downward():
    upward = []
    for source in (ROOT / "tasks").rglob("*.py"):
        module = module_name(source)
        own = TASK_LAYERS.index(task_package(module))
        for target in imported_modules(source):
            if target.startswith("shardwise.flows"):
                upward.append(f"{module} imports {target}")
            elif target.startswith("shardwise.tasks.") and TASK_LAYERS.index(task_package(target)) > own:
                upward.append(f"{module} imports {target}")
    assert not upward, "\n".join(upward)


def test_gpu_runtime_imports_neither_tasks_nor_flows():
    offenders = [
        f"{source.name} imports {target}"
        for source in (ROOT / "gpu_runtime").rglob("*.py")
        for target in imported_modules(source)
        if target.split(".")[:2] in (["shardwise", "tasks"], ["shardwise", "flows"])
    ]
    assert not offenders, offenders


def test_the_project_imports_itself_only_through_the_shardwise_namespace():
    """A bare ``import tasks`` would load a second copy of a module, or a user's own ``tasks.py``."""
    bare = [
        f"{source.relative_to(ROOT)} imports {target}"
        for folder in ("shardwise", "flows", "tasks", "gpu_runtime", "bench", "tests")
        for source in (ROOT / folder).rglob("*.py")
        for target in imported_modules(source)
        if target.split(".")[0] in {"tasks", "flows", "gpu_runtime"}
    ]
    assert not bare, "\n".join(bare)
