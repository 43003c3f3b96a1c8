"""What a shard reports back to the flow, and how shard results add up to run totals.

A :class:`ShardResult` groups what it holds (token counts, timings, the written part, the worker
that ran it); :meth:`ShardResult.to_dict` flattens it into one record with a key per figure
(``prompt_tokens``, ``seconds_compute``, ``part_uri``, ...), and :meth:`ShardResult.from_dict`
reads such a record back."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class TokenCounts:
    """Tokens of a shard's rows: chat prompts read, answers generated, texts embedded."""

    prompt: int = 0
    generated: int = 0
    embedded: int = 0

    def __sub__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(self.prompt - other.prompt, self.generated - other.generated, self.embedded - other.embedded)


@dataclass(frozen=True)
class ShardTimings:
    """Where a shard's time went, in seconds, and the wall-clock (epoch) spans of its compute and
    write. The spans compare across shards and worker processes: they show one shard's write
    running while another computes. Never written into a part."""

    read: float = 0.0
    wait: float = 0.0  # waiting for the device while another shard computed (not billed)
    compute: float = 0.0
    write: float = 0.0
    compute_started_at: float = 0.0
    compute_ended_at: float = 0.0
    write_started_at: float = 0.0
    write_ended_at: float = 0.0

    @property
    def busy(self) -> float:
        """Seconds billed: reading, computing and writing (not waiting for the device)."""
        return self.read + self.compute + self.write


@dataclass(frozen=True)
class PartInfo:
    """The Parquet part a shard wrote (or a resumed shard verified)."""

    uri: str
    bytes: int = 0
    sha256: str | None = None  # None for a part verified from its footer rather than written now
    write_id: str | None = None  # the part footer's unique write id, checked again at commit

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class WorkerInfo:
    """The worker process that ran a shard (see shardwise.tasks.compute.runners) and its device."""

    name: str | None = None
    device: str | None = None
    model_loads: dict[str, int] = field(default_factory=dict)  # loads so far in that worker, by model
    energy_j: float | None = None  # GPU energy during the shard's compute, when NVML is available


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
    schema_valid_rows: int | None = None  # answers that follow the output schema; None without one
    rows_cached: int = 0  # rows taken whole from the row cache
    tokens: TokenCounts = field(default_factory=TokenCounts)  # of every row, cached ones included
    cached_tokens: TokenCounts = field(default_factory=TokenCounts)  # the row cache's share of ``tokens``
    timings: ShardTimings = field(default_factory=ShardTimings)
    part: PartInfo | None = None
    worker: WorkerInfo = field(default_factory=WorkerInfo)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    finished_at: float = 0.0
    resumed: bool = False  # committed by an earlier run and verified, not recomputed
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
        return self.timings.busy

    def to_dict(self) -> dict[str, Any]:
        """The result as one flat record (its row ids left out); :meth:`from_dict` reads it back."""
        tokens, cached, timings, part, worker = self.tokens, self.cached_tokens, self.timings, self.part, self.worker
        return {
            "index": self.index,
            "shard_id": self.shard_id,
            "name": self.name,
            "source": self.source,
            "status": self.status,
            "rows": self.rows,
            "error_rows": self.error_rows,
            "truncated_rows": self.truncated_rows,
            "prompt_tokens": tokens.prompt,
            "generated_tokens": tokens.generated,
            "embedded_tokens": tokens.embedded,
            "schema_valid_rows": self.schema_valid_rows,
            "rows_cached": self.rows_cached,
            "cached_prompt_tokens": cached.prompt,
            "cached_generated_tokens": cached.generated,
            "cached_embedded_tokens": cached.embedded,
            "seconds_read": timings.read,
            "seconds_wait": timings.wait,
            "seconds_compute": timings.compute,
            "seconds_write": timings.write,
            "part_uri": part.uri if part else None,
            "part_bytes": part.bytes if part else 0,
            "part_sha256": part.sha256 if part else None,
            "part_write_id": part.write_id if part else None,
            "device": worker.device,
            "models": copy.deepcopy(self.models),
            "error": self.error,
            "finished_at": self.finished_at,
            "compute_started_at": timings.compute_started_at,
            "compute_ended_at": timings.compute_ended_at,
            "write_started_at": timings.write_started_at,
            "write_ended_at": timings.write_ended_at,
            "energy_j": worker.energy_j,
            "resumed": self.resumed,
            "worker": worker.name,
            "model_loads": dict(worker.model_loads),
            "quality": copy.deepcopy(self.quality),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardResult:
        """A result from its :meth:`to_dict` record; figures missing from it take their defaults.
        The record holds no row ids, so the result has none; no ``part_uri``: no part."""
        part_uri = data.get("part_uri")
        return cls(
            index=data["index"],
            shard_id=data["shard_id"],
            name=data["name"],
            source=data["source"],
            status=data["status"],
            rows=data.get("rows", 0),
            error_rows=data.get("error_rows", 0),
            truncated_rows=data.get("truncated_rows", 0),
            schema_valid_rows=data.get("schema_valid_rows"),
            rows_cached=data.get("rows_cached", 0),
            tokens=TokenCounts(
                prompt=data.get("prompt_tokens", 0),
                generated=data.get("generated_tokens", 0),
                embedded=data.get("embedded_tokens", 0),
            ),
            cached_tokens=TokenCounts(
                prompt=data.get("cached_prompt_tokens", 0),
                generated=data.get("cached_generated_tokens", 0),
                embedded=data.get("cached_embedded_tokens", 0),
            ),
            timings=ShardTimings(
                read=data.get("seconds_read", 0.0),
                wait=data.get("seconds_wait", 0.0),
                compute=data.get("seconds_compute", 0.0),
                write=data.get("seconds_write", 0.0),
                compute_started_at=data.get("compute_started_at", 0.0),
                compute_ended_at=data.get("compute_ended_at", 0.0),
                write_started_at=data.get("write_started_at", 0.0),
                write_ended_at=data.get("write_ended_at", 0.0),
            ),
            part=None
            if part_uri is None
            else PartInfo(
                uri=part_uri,
                bytes=data.get("part_bytes", 0),
                sha256=data.get("part_sha256"),
                write_id=data.get("part_write_id"),
            ),
            worker=WorkerInfo(
                name=data.get("worker"),
                device=data.get("device"),
                model_loads=dict(data.get("model_loads") or {}),
                energy_j=data.get("energy_j"),
            ),
            models=copy.deepcopy(data.get("models") or {}),
            error=data.get("error"),
            finished_at=data.get("finished_at", 0.0),
            resumed=data.get("resumed", False),
            quality=copy.deepcopy(data.get("quality")),
        )


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
                totals.prompt_tokens += r.tokens.prompt
                totals.generated_tokens += r.tokens.generated
                if r.schema_valid_rows is not None:
                    totals.schema_valid_rows = (totals.schema_valid_rows or 0) + r.schema_valid_rows
                    totals.schema_rows += r.rows
                if r.resumed:
                    totals.rows_reused += r.rows
                else:
                    totals.rows_computed += r.rows_computed
                    totals.rows_cached += r.rows_cached
                    uncached = r.tokens - r.cached_tokens
                    totals.prompt_tokens_computed += uncached.prompt
                    totals.generated_tokens_computed += uncached.generated
            else:
                totals.failed += 1
            totals.device_seconds += r.seconds
            totals.seconds_read += r.timings.read
            totals.seconds_compute += r.timings.compute
            totals.seconds_write += r.timings.write
            if r.worker.energy_j is not None:
                totals.energy_j = (totals.energy_j or 0.0) + r.worker.energy_j
        return totals
