"""shardwise installs one top-level package, ``shardwise``, and lives beside a user's own ``flows/``
and ``tasks.py``: the wheel's contents, the wheel used on its own, and the editable install from a
user's project folder."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter from ``cwd``: the editable install's finder is dropped, so that only
# what ``sys.path`` holds (the unpacked wheel) can provide ``shardwise``.
WHEEL_ONLY = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
sys.path.insert(0, {wheel!r})
import importlib.util, shardwise, shardwise.flows.cli as cli, shardwise.tasks.config.prices as prices
import shardwise.flows.commands as commands
assert shardwise.__file__.startswith({wheel!r}), shardwise.__file__
assert commands.DEMO_CONFIG.is_file(), commands.DEMO_CONFIG
assert prices.PRICES_FILE.is_file(), prices.PRICES_FILE
assert importlib.util.find_spec("tasks") is None and importlib.util.find_spec("flows") is None
try:
    cli.main(["--help"])
except SystemExit as done:
    assert done.code == 0
"""


def build_wheel(directory: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(directory),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        cwd=directory,
    )
    return next(directory.glob("shardwise-*.whl"))


def test_the_wheel_holds_only_shardwise_and_works_on_its_own(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    assert {n.split("/")[0] for n in names} == {"shardwise", f"{wheel.name.split('-py')[0]}.dist-info"}
    for module in (
        "shardwise/flows/enrich.py",
        "shardwise/tasks/storage/output_dir.py",
        "shardwise/gpu_runtime/generation.py",
    ):
        assert module in names
    assert {"shardwise/conf/prices.yaml", "shardwise/conf/jobs/demo.yaml"} <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "shardwise = shardwise.flows.cli:main" in archive.read(entry_points).decode()

    probe = subprocess.run(
        [sys.executable, "-c", WHEEL_ONLY.format(wheel=str(tmp_path / "site"))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]


def test_a_user_project_with_its_own_flows_and_tasks_imports_shardwise(tmp_path):
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text("WHO = 'the user'\n")
    (tmp_path / "tasks.py").write_text("WHO = 'the user'\n")
    probe = (
        "import flows, tasks\n"
        "from shardwise.flows.enrich import enrich\n"
        "from shardwise.tasks.storage.output_dir import OutputDir\n"
        "assert flows.WHO == tasks.WHO == 'the user'\n"
        "assert enrich.name == 'enrich'\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_source_checkout_without_an_install_imports_gpu_runtime(tmp_path):
    """What a GPU machine given the repository's files does (bench/gpu_check.sh): the checkout on
    PYTHONPATH, no install of shardwise."""
    probe = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '').lower()]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import shardwise.gpu_runtime as runtime\n"
        "from shardwise.gpu_runtime import plan_batches\n"
        f"assert runtime.__file__.startswith({str(ROOT / 'gpu_runtime')!r}), runtime.__file__\n"
        "assert 'prefect' not in sys.modules and 'mlflow' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
