"""shardwise's steps as plain functions, by concern, and on top the Prefect tasks over them.

Packages, bottom first; each imports only from itself, the ones before it and the shared modules
at this level (``errors``, ``redaction``, ``faults``, ``retry_policy``); ``tests/test_layering.py``
enforces it:

``storage`` (the fsspec seam, the output directory's owner, local state) -> ``config`` (the job
config) -> ``planning`` (shards from Parquet footers) -> ``records`` (one shard's rows in and
out) -> ``output`` (the commit protocol, resume, the quality verdict's files) -> ``compute``
(one shard end to end, worker placement) -> ``tracking`` (MLflow through its one module, the
report, timings) -> ``quality`` (the gate) -> ``forecasting`` (cost before and during a run) ->
``schedule`` (date partitions, backfills) -> ``orchestration`` (the only package that imports
Prefect: tasks, task runners, artifacts, deployment runs).
"""
