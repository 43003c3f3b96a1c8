"""The ``enrich-partition`` deployment's flow prepares its run as the command line and the Python
API do (shardwise.flows.run.prepare_run): a job that a check refuses fails the partition's run with
the check's message, before the ``enrich`` flow starts and before anything is written."""

from __future__ import annotations

from shardwise.tasks.records.demo_data import write_reviews_dataset


def test_a_partition_over_budget_is_refused_before_its_enrich_flow_starts(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from shardwise.flows.schedules import enrich_partition

    date = "2026-11-05"
    write_reviews_dataset(str(tmp_path / "raw" / f"dt={date}"), files=1, rows_per_file=4, rows_per_group=2)
    job = {
        "name": "partition-budget",
        "input": str(tmp_path / "raw"),
        "output": str(tmp_path / "enriched"),
        "task": "generate",
        "id_column": "review_id",
        "device": "cpu",
        "max_cost": 1e-12,
    }

    state = enrich_partition(job=job, date=date, return_state=True)
    assert state.is_failed()
    assert "exceeds max_cost" in state.message and "Traceback" not in state.message, state.message
    assert not (tmp_path / "enriched").exists()
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    assert [run.name for run in subflows] == []  # refused by the prepare step: no enrich run
