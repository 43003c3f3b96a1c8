"""What a shard reports back to the flow, and how shard results add up to run totals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pyarrow as pa


class RowIds:
    """A shard's row ids as one Arrow array, opaque to Prefect: Prefect walks every list, dict and
    dataclass handed to a task looking for futures, and a run's ids as Python lists (one entry per
    row) made the commit and report tasks cost seconds at tens of thousands of rows."""

    __slots__ = ("array",)

    def __init__(self, values: pa.Array | pa.ChunkedArray | list[Any] | None = None) -> None:
        if values is None:
            values = pa.array([], pa.null())
        elif not isinstance(values, (pa.Array, pa.ChunkedArray)):
            values = pa.array(values)
        self.array = values

    def __len__(self) -> int:
        return len(self.array)

    def chunks(self) -> list[pa.Array]:
        return list(self.array.chunks) if isinstance(self.array, pa.ChunkedArray) else [self.array]

    def to_pylist(self) -> list[Any]:
        return self.array.to_pylist()

    def __getstate__(self) -> pa.Array | pa.ChunkedArray:
        return self.array

    def __setstate__(self, array: pa.Array | pa.ChunkedArray) -> None:
        self.array = array


@dataclass
class ShardResult:
    """Outcome of one shard; ``status`` is ``committed`` or ``failed`` (then ``error`` says why)."""

    index: int
    shard_id: str
    name: str
    source: str
    status: str
    rows: int = 0
    error_rows: int = 0
    truncated_rows: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    embedded_tokens: int = 0
    schema_valid_rows: int | None = None  # answers that follow the output schema; None without one
    rows_cached: int = 0  # rows taken whole from the row cache (tokens above include theirs)
    cached_prompt_tokens: int = 0
    cached_generated_tokens: int = 0
    cached_embedded_tokens: int = 0
    seconds_read: float = 0.0
    seconds_wait: float = 0.0  # waiting for the device while another shard computed (not billed)
    seconds_compute: float = 0.0
    seconds_write: float = 0.0
    part_uri: str | None = None
    part_bytes: int = 0
    part_sha256: str | None = None
    part_write_id: str | None = None  # the part footer's unique write id, checked again at commit
    device: str | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    finished_at: float = 0.0
    # Wall-clock (epoch) spans of compute and write, comparable across shards and worker processes:
    # they show one shard's write running while another computes. Never written into a part.
    compute_started_at: float = 0.0
    compute_ended_at: float = 0.0
    write_started_at: float = 0.0
    write_ended_at: float = 0.0
    energy_j: float | None = None  # GPU energy during compute, when NVML is available
    resumed: bool = False  # committed by an earlier run and verified, not recomputed
    worker: str | None = None  # which worker process ran it (see shardwise.tasks.compute.runners)
    model_loads: dict[str, int] = field(default_factory=dict)  # loads so far in that worker, by model
    quality: dict[str, Any] | None = (
        None  # partial quality figures of its rows (shardwise.tasks.records.profile.shard_profile)
    )
    ids: RowIds = field(default_factory=RowIds, repr=False, compare=False)

    @property
    def rows_computed(self) -> int:
        """Rows this run computed for this shard: none when resumed, else those the cache lacked."""
        return 0 if self.resumed or self.status != "committed" else self.rows - self.rows_cached

    @property
    def seconds(self) -> float:
        return self.seconds_read + self.seconds_compute + self.seconds_write

    def to_dict(self) -> dict[str, Any]:
        data = asdict(replace(self, ids=RowIds()))
        data.pop("ids")
        return data


@dataclass
class RunTotals:
    shards: int = 0
    committed: int = 0
    failed: int = 0
    rows: int = 0  # every committed row, computed by this run or reused from an earlier one
    rows_computed: int = 0
    rows_reused: int = 0  # rows of parts an earlier run committed (resume)
    rows_cached: int = 0  # rows of parts this run wrote with values from the row cache
    error_rows: int = 0
    truncated_rows: int = 0
    prompt_tokens: int = 0  # tokens of all committed rows (reused parts carry theirs in the footer)
    generated_tokens: int = 0
    schema_valid_rows: int | None = None
    schema_rows: int = 0  # rows of the shards that counted schema_valid_rows
    prompt_tokens_computed: int = 0  # tokens this run processed: what throughput and cost are over
    generated_tokens_computed: int = 0
    device_seconds: float = 0.0
    seconds_read: float = 0.0
    seconds_compute: float = 0.0
    seconds_write: float = 0.0
    energy_j: float | None = None

    @classmethod
    def of(cls, results: list[ShardResult], planned: int) -> RunTotals:
        totals = cls(shards=planned)
        for r in results:
            if r.status == "committed":
                totals.committed += 1
                totals.rows += r.rows
                totals.error_rows += r.error_rows
                totals.truncated_rows += r.truncated_rows
                totals.prompt_tokens += r.prompt_tokens
                totals.generated_tokens += r.generated_tokens
                if r.schema_valid_rows is not None:
                    totals.schema_valid_rows = (totals.schema_valid_rows or 0) + r.schema_valid_rows
                    totals.schema_rows += r.rows
                if r.resumed:
                    totals.rows_reused += r.rows
                else:
                    totals.rows_computed += r.rows_computed
                    totals.rows_cached += r.rows_cached
                    totals.prompt_tokens_computed += r.prompt_tokens - r.cached_prompt_tokens
                    totals.generated_tokens_computed += r.generated_tokens - r.cached_generated_tokens
            else:
                totals.failed += 1
            totals.device_seconds += r.seconds
            totals.seconds_read += r.seconds_read
            totals.seconds_compute += r.seconds_compute
            totals.seconds_write += r.seconds_write
            if r.energy_j is not None:
                totals.energy_j = (totals.energy_j or 0.0) + r.energy_j
        return totals
