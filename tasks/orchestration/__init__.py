"""Everything that is Prefect: the tasks the flows call (each over a plain function of the packages
below), the task runners shard tasks run on, the flow run's artifacts, what counts as an interrupt,
and deployment runs for backfills. The one package under ``tasks/`` that imports Prefect."""
