"""Work a run does once: the CLI's shard plan is the flow's plan, and the report uses the manifest
commit wrote instead of reading it back. Real flows on the session's Prefect server, real MLflow."""

from __future__ import annotations

import json

import pytest

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.storage.output_dir import OutputDir

pytestmark = pytest.mark.slow


def task_run_names(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run.name for run in runs]


@pytest.fixture
def manifest_readers(monkeypatch) -> list[str]:
    """The functions that read an output's manifest, innermost caller first, while the test runs."""
    import inspect

    readers: list[str] = []
    read_manifest = OutputDir.read_manifest

    def recording(self):
        readers.append(" < ".join(frame.function for frame in inspect.stack()[1:4]))
        return read_manifest(self)

    monkeypatch.setattr(OutputDir, "read_manifest", recording)
    return readers


def embed_job(reviews_dir, output) -> JobConfig:
    return JobConfig(input=str(reviews_dir), output=str(output), task="embed", id_column="review_id", rows_per_shard=16)


def test_the_cli_plans_once_and_the_report_reads_no_manifest(prefect_server, reviews_dir, tmp_path, manifest_readers):
    from shardwise.flows.commands import run_job

    output = tmp_path / "out"
    summary = run_job(embed_job(reviews_dir, output))
    assert summary.exit_code == 0 and summary.rows == 30
    manifest = json.loads((output / "_manifest.json").read_text())
    names = task_run_names(manifest["prefect_flow_run_id"])
    assert any(n.startswith("report-") for n in names), names
    assert not [n for n in names if n.startswith("plan-shards")], names
    assert manifest_readers and not [r for r in manifest_readers if "report" in r.split(" < ")], manifest_readers


def test_a_flow_called_directly_plans_for_itself(prefect_server, reviews_dir, tmp_path):
    from shardwise.flows.enrich import enrich
    from shardwise.tasks.compute.handoff import flow_parameters

    output = tmp_path / "out"
    state = enrich(job=flow_parameters(embed_job(reviews_dir, output)), return_state=True)
    assert state.is_completed() and state.result()["rows"] == 30
    manifest = json.loads((output / "_manifest.json").read_text())
    names = task_run_names(manifest["prefect_flow_run_id"])
    assert len([n for n in names if n.startswith("plan-shards")]) == 1, names


def test_a_run_reads_the_outputs_state_once_before_its_lease_and_once_holding_it(
    prefect_server, reviews_dir, tmp_path, monkeypatch
):
    """The output's config check and the committed parts' verification (footers of every part):
    once when the run is prepared (the forecast counts the pending shards from them) and once in
    the flow under the lease, where another run can no longer write."""
    from shardwise.flows.commands import run_job
    from shardwise.tasks.output import resume

    calls: list[str] = []
    for name in ("check_output_compatible", "find_committed"):
        real = getattr(resume, name)
        monkeypatch.setattr(resume, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    job = embed_job(reviews_dir, tmp_path / "out")
    # The first run finds no output before its lease: nothing committed to verify there.
    for run, committed_reads in (("first", 1), ("rerun", 2)):
        calls.clear()
        assert run_job(job).exit_code == 0
        assert sorted(calls) == ["check_output_compatible"] * 2 + ["find_committed"] * committed_reads, (run, calls)
