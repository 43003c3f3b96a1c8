"""The test-side Prefect reads see every matching object, however many the session made (a CI run
failed when an unfiltered read's default page of 200 left out the artifact the test looked for)."""

from __future__ import annotations

import uuid

from tests.prefect_reads import PAGE, read_all


def test_read_all_finds_objects_beyond_the_servers_default_page(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    key = f"probe-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        made = {
            client.create_artifact(ArtifactCreate(key=key, data=str(i), type="markdown")).id for i in range(PAGE + 5)
        }
        one_read = {a.id for a in client.read_artifacts()}
        every = {a.id for a in read_all(client.read_artifacts)}
    assert len(made - one_read) >= 5  # the trap: one read stops at the server's page
    assert made <= every
