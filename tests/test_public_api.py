"""The Python API: its pinned names, a job run from code (as in a notebook), and the ``enrich`` flow
as a subflow of a user's own Prefect flow, from a project folder with its own ``flows/`` and
``tasks.py``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import polars as pl
import pytest

import shardwise
from shardwise.tasks.errors import InputError
from shardwise.tasks.records.demo_data import write_reviews_dataset


def test_the_public_names_are_pinned():
    assert set(shardwise.__all__) == {
        "JobConfig",
        "RunSummary",
        "job_config",
        "plan",
        "run",
        "enrich",
        "enrich_for",
        "__version__",
    }
    for name in shardwise.__all__:
        assert getattr(shardwise, name) is not None


@pytest.mark.slow
def test_a_job_planned_and_run_from_code(prefect_server, tmp_path):
    write_reviews_dataset(str(tmp_path / "in"), files=2, rows_per_file=3, rows_per_group=3)
    job = shardwise.job_config(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), task="embed", id_column="review_id"
    )
    assert isinstance(job, shardwise.JobConfig) and job.task == "embed"

    forecast = shardwise.plan(job)
    assert forecast.rows_to_compute == 6 and not (tmp_path / "out").exists()  # a plan writes nothing

    summary = shardwise.run(job)
    assert isinstance(summary, shardwise.RunSummary)
    assert (summary.status, summary.exit_code, summary.message) == ("succeeded", 0, "")
    assert (summary.rows, summary.rows_computed, summary.shards_committed) == (6, 6, 2)
    assert summary.mlflow_run_id and summary.details["succeeded"]
    assert pl.read_parquet(tmp_path / "out" / "part-*.parquet").height == 6

    again = shardwise.run(job.model_dump(mode="json"), rows_per_shard=3)  # a dict, a keyword over it
    assert again.succeeded and (again.rows, again.rows_computed) == (6, 0)

    with pytest.raises(InputError, match="column 'nope' not found"):
        shardwise.run(job, text_column="nope", output=str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()


USER_FLOW = """
    from prefect import flow

    import flows, tasks  # the project's own, beside shardwise
    import shardwise
    from shardwise.tasks.compute.handoff import flow_parameters


    @flow(name="my-nightly")
    def my_nightly(source: str, target: str) -> dict:
        job = shardwise.job_config(input=source, output=target, task="embed", id_column="review_id")
        return shardwise.enrich(job=flow_parameters(job))  # a subflow of this flow


    if __name__ == "__main__":
        import json, sys

        summary = my_nightly(sys.argv[1], sys.argv[2])
        print(json.dumps({"succeeded": summary["succeeded"], "rows": summary["rows"], "mine": tasks.MINE}))
"""


@pytest.mark.slow
def test_enrich_runs_as_a_subflow_of_a_users_flow_in_their_own_project(prefect_server, tmp_path):
    project = tmp_path / "project"
    (project / "flows").mkdir(parents=True)
    (project / "flows" / "__init__.py").write_text("")
    (project / "tasks.py").write_text("MINE = True\n")
    (project / "nightly.py").write_text(textwrap.dedent(USER_FLOW))
    write_reviews_dataset(str(tmp_path / "in"), files=1, rows_per_file=4, rows_per_group=2)

    proc = subprocess.run(
        [sys.executable, "nightly.py", str(tmp_path / "in"), str(tmp_path / "out")],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"succeeded": True, "rows": 4, "mine": True}
    assert (tmp_path / "out" / "_SUCCESS").is_file()

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        parent = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["my-nightly"])))[-1]
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]))
        )
        assert [client.read_flow(c.flow_id).name for c in children] == ["enrich"]
