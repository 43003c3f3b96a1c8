"""What stops a flow run from outside: Ctrl-C, SIGTERM (shardwise's own ``Terminated``, or the
``TerminationSignal`` Prefect raises for it while a flow runs) and cancellation. A tracked run
stopped by one of these ends KILLED in MLflow; by anything else, FAILED."""

from __future__ import annotations

import contextlib

from prefect.exceptions import TerminationSignal

from shardwise.tasks.tracking import runs

INTERRUPTS: tuple[type[BaseException], ...] = (*runs.INTERRUPTS, TerminationSignal)


def ended_on_error(run_id: str, uri: str | None = None) -> contextlib.AbstractContextManager[None]:
    """:func:`shardwise.tasks.tracking.runs.ended_on_error`, with Prefect's SIGTERM as an interrupt."""
    return runs.ended_on_error(run_id, uri, interrupts=INTERRUPTS)
