"""What a run will cost before it starts: rows, tokens, device-seconds and money, each with its basis.

``shardwise plan`` prints it, ``run`` refuses a job whose high end exceeds ``max_cost``, and every
run logs it to MLflow next to the actuals, so later forecasts can learn from earlier runs.

- Prompt tokens are counted exactly with the model's tokenizer and chat template (no weights are
  loaded); above ``sample_rows`` rows to compute, whole shards are drawn at random until that many
  rows are read and the total is extrapolated with a 95% confidence interval.
- Generated tokens per row come from finished MLflow runs of the same job (experiment name) with
  the same model, prompt and decoding settings; without any, from a calibration run on a sample
  when asked for (:mod:`shardwise.tasks.forecasting.calibration`, ``plan --calibrate N``); else the ``max_new_tokens``
  upper bound.
- Device-seconds per token come from those runs on the same device type, else from the calibration;
  without either, from :data:`DEFAULT_THROUGHPUT`, an unmeasured guess per device type with a range
  wide enough for a busy machine (stated as such).
- Cost is device-seconds times the price per device-hour (``conf/prices.yaml``).
"""

from __future__ import annotations

import datetime as dt
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.prices import Price, detect_device_type, lookup_price
from shardwise.tasks.forecasting.calibration import Calibration, calibrate
from shardwise.tasks.planning.shards import Shard, ShardPlan

# Rows at or below which every prompt is tokenized; above it, a random sample of shards.
SAMPLE_ROWS = 20_000
# A run's own forecast only informs unless max_cost is set: a smaller sample keeps its tokenizing
# out of the run's fixed cost (``shardwise plan`` still samples SAMPLE_ROWS).
IN_RUN_SAMPLE_ROWS = 2_000
Z_95 = 1.96

# Rough throughput of one device when no run of the job has been measured on it yet, as
# (expected, slow, fast) tokens per second. The CPU row is SmolLM2-135M and MiniLM on 2 free cores
# (about 60 generated tok/s batched); the slow end is what a 2-core VM shared by six sessions gave
# (0.6 generated tok/s). The GPU row is a guess for small models on one GPU. These are not
# measurements of your model: trust history or a calibration run.
DEFAULT_THROUGHPUT: dict[str, dict[str, tuple[float, float, float]]] = {
    "cpu": {"generated": (40.0, 0.5, 160.0), "prompt": (400.0, 5.0, 4000.0), "embedded": (2000.0, 30.0, 20000.0)},
    "gpu": {
        "generated": (1500.0, 100.0, 20000.0),
        "prompt": (20000.0, 2000.0, 500000.0),
        "embedded": (50000.0, 5000.0, 1000000.0),
    },
}
# Spread put around history-based figures: tokens per row vary with the text; device time also
# with the machine's load (on a shared 2-core VM, two runs of one small job differed 3.75x).
TOKENS_SLACK = 2.0
TIME_SLACK = 4.0


@dataclass(frozen=True)
class Estimate:
    """A forecast quantity: a range and the basis it was made on."""

    low: float
    expected: float
    high: float
    basis: str

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "expected": self.expected, "high": self.high, "basis": self.basis}

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass
class Forecast:
    rows: int
    rows_to_compute: int
    shards: int
    shards_to_compute: int
    files: int
    device_type: str
    price_per_device_hour: float
    currency: str
    workers: int
    rows_cached: int = 0  # pending rows the row cache holds: not computed, not counted below
    prompt_tokens: Estimate | None = None
    generated_tokens: Estimate | None = None
    embedded_tokens: Estimate | None = None
    device_seconds: Estimate | None = None
    wall_seconds: Estimate | None = None
    cost: Estimate | None = None
    history_runs: list[str] = field(default_factory=list)
    calibration: Calibration | None = None
    # Expected cost of one more prompt token (part of ``cost``), and the prompt tokens of each shard
    # whose prompts were counted (by shard id): a shard's own estimate follows its prompts' length.
    prompt_token_cost: float = 0.0
    shard_prompt_tokens: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in list(data):
            if isinstance(getattr(self, key), Estimate):
                data[key] = getattr(self, key).to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Forecast:
        values = dict(data)
        for key in ("prompt_tokens", "generated_tokens", "embedded_tokens", "device_seconds", "wall_seconds", "cost"):
            if values.get(key) is not None:
                values[key] = Estimate(**values[key])
        if values.get("calibration") is not None:
            calibration = dict(values["calibration"])
            calibration["generated_per_row"] = tuple(calibration["generated_per_row"])
            values["calibration"] = Calibration(**calibration)
        return cls(**values)

    def cost_per_row(self) -> float:
        """Expected cost of computing one row (0 when there is nothing to compute)."""
        if not self.cost or not self.rows_to_compute:
            return 0.0
        return self.cost.expected / self.rows_to_compute

    def shard_cost(self, shard: Shard) -> float:
        """Expected cost of computing ``shard``: the cost per row, corrected by how far this shard's
        own prompt tokens (when counted) are from the average prompt's."""
        average = self.cost_per_row() * shard.num_rows
        tokens = self.shard_prompt_tokens.get(shard.shard_id)
        if tokens is None or self.prompt_tokens is None or not self.rows_to_compute:
            return average
        typical = self.prompt_tokens.expected / self.rows_to_compute * shard.num_rows
        return max(average + self.prompt_token_cost * (tokens - typical), 0.0)

    def mlflow_values(self) -> tuple[dict[str, str], dict[str, float]]:
        """(params, metrics) named ``forecast_*``: bases as params, numbers as metrics."""
        params: dict[str, str] = {"forecast_device_type": self.device_type}
        metrics: dict[str, float] = {"forecast_rows_to_compute": self.rows_to_compute}
        for key in ("prompt_tokens", "generated_tokens", "embedded_tokens", "device_seconds", "cost"):
            estimate = getattr(self, key)
            if estimate is None:
                continue
            params[f"forecast_{key}_basis"] = estimate.basis[:500]
            for end in ("low", "expected", "high"):
                metrics[f"forecast_{key}_{end}"] = float(getattr(estimate, end))
        return params, metrics


# --------------------------------------------------------------------------------------------
# Token counts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Counts:
    """Per-row counts over the rows read (all rows to compute, or a sample of them)."""

    rows_read: int
    valid: list[bool]
    prompt: list[int]
    embedded: list[int]
    rows_cached: int = 0  # rows read that the row cache holds whole: left out of the lists above
    shard_prompt: dict[str, int] = field(default_factory=dict)  # prompt tokens per shard id, as above


def _count_rows(cfg: JobConfig, shards: list[Shard]) -> _Counts:
    from shardwise.gpu_runtime.token_count import (
        PromptCounter,
        count_embedding_tokens,
        embedding_prompt,
        load_tokenizer,
    )
    from shardwise.tasks.compute.shard_work import input_columns
    from shardwise.tasks.records.enrichment import clean_text, render_prompts
    from shardwise.tasks.records.shard_io import read_shard

    counter = (
        PromptCounter(cfg.generate.model, cfg.generate.max_new_tokens, cfg.generate.max_input_tokens)
        if cfg.runs_generation
        else None
    )
    embed_tokenizer = load_tokenizer(cfg.embed.model) if cfg.runs_embedding else None
    embed_prompt = embedding_prompt(cfg.embed.model, cfg.embed.prompt_name) if cfg.runs_embedding else ""
    # The date a run's chat template prints: the configured one, else today (as the flow fixes it).
    chat_date = cfg.generate.chat_date or dt.datetime.now(dt.UTC).date()
    valid: list[bool] = []
    prompt: list[int] = []
    embedded: list[int] = []
    rows_cached = 0
    shard_prompt: dict[str, int] = {}
    from shardwise.tasks.records.row_cache import cached_rows

    for shard in shards:
        table = read_shard(shard, input_columns(cfg), cfg.storage_options)
        cleaned = [clean_text(v) for v in table.column(cfg.text_column).to_pylist()]
        ok = [i for i, (_, err) in enumerate(cleaned) if err is None]
        row_prompt = [0] * table.num_rows
        row_embed = [0] * table.num_rows
        if counter is not None:
            prompts = render_prompts(cfg, table, [text for text, _ in cleaned], ok)
            counts = counter.count(
                prompts, cfg.generate.system_prompt, dict(cfg.generate.chat_template_kwargs) or None, chat_date
            )
            for i, n in zip(ok, counts):
                row_prompt[i] = n
        if embed_tokenizer is not None:
            for i, n in zip(ok, count_embedding_tokens(embed_tokenizer, [cleaned[i][0] for i in ok], embed_prompt)):
                row_embed[i] = n
        hit = cached_rows(cfg, table, cleaned, chat_date)
        rows_cached += len(hit)
        keep = [i for i in range(table.num_rows) if i not in hit]
        valid += [cleaned[i][1] is None for i in keep]
        prompt += [row_prompt[i] for i in keep]
        embedded += [row_embed[i] for i in keep]
        shard_prompt[shard.shard_id] = sum(row_prompt[i] for i in keep)
    return _Counts(len(valid) + rows_cached, valid, prompt, embedded, rows_cached, shard_prompt)


def _extrapolate(values: list[int] | list[bool], total_rows: int, what: str) -> Estimate:
    """Exact when every row was read; else a sample mean times the rows, with a 95% interval."""
    n = len(values)
    total = float(sum(values))
    if n >= total_rows:
        return Estimate(total, total, total, f"exact: {what} of all {n} rows")
    mean = total / n if n else 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else mean**2
    # Finite-population correction: the sample is drawn without replacement from total_rows.
    half = Z_95 * math.sqrt(variance / max(n, 1) * (1 - n / total_rows)) * total_rows
    expected = mean * total_rows
    return Estimate(
        max(0.0, expected - half),
        expected,
        expected + half,
        f"sample: {what} of {n} of {total_rows} rows (random shards), 95% confidence interval",
    )


def _sample_shards(shards: list[Shard], sample_rows: int) -> list[Shard]:
    if sum(s.num_rows for s in shards) <= sample_rows:
        return shards
    order = list(shards)
    random.Random(0).shuffle(order)
    picked, rows = [], 0
    for shard in order:
        picked.append(shard)
        rows += shard.num_rows
        if rows >= sample_rows:
            break
    return picked


# --------------------------------------------------------------------------------------------
# History
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PastRun:
    run_id: str
    valid_rows: float
    generated_tokens: float
    embedded_tokens: float
    device_seconds: float
    prompt_tokens: float = 0.0


def _history(cfg: JobConfig, device_type: str) -> list[_PastRun]:
    """Finished runs of this job with the same model and generation settings on this device type.

    A default sqlite tracking store that does not exist yet means no history (and is not created)."""
    from shardwise.tasks.storage.local_state import tracking_uri
    from shardwise.tasks.tracking.runs import prompt_hash

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.name)
    if experiment is None:
        return []
    same = {"task": cfg.task}
    if cfg.runs_generation:
        g = cfg.generate
        same |= {
            "generate.model": g.model,
            "generate.max_new_tokens": str(g.max_new_tokens),
            "generate.temperature": str(g.temperature),
            "generate.top_p": str(g.top_p),
            "generate.ignore_eos": str(g.ignore_eos),
            "generate.prompt_hash": prompt_hash(cfg),
            "generate.max_input_tokens": "" if g.max_input_tokens is None else str(g.max_input_tokens),
        }
    if cfg.runs_embedding:
        same["embed.model"] = cfg.embed.model
    conditions = [f"params.`{k}` = '{v}'" for k, v in same.items() if v != ""]
    conditions.append(f"tags.`shardwise.device_type` = '{device_type}'")
    runs = client.search_runs(
        [experiment.experiment_id], " and ".join(conditions), max_results=20, order_by=["attributes.start_time DESC"]
    )
    past = []
    for run in runs:
        m = run.data.metrics
        if m.get("computed_valid_rows", 0) <= 0 or m.get("device_seconds", 0) <= 0:
            continue
        past.append(
            _PastRun(
                run.info.run_id,
                m["computed_valid_rows"],
                m.get("generated_tokens_computed", m.get("generated_tokens", 0.0)),
                m.get("computed_embedded_tokens", 0.0),
                m["device_seconds"],
                m.get("prompt_tokens_computed", 0.0),
            )
        )
    return past


def history_metrics(results: list[Any]) -> dict[str, float]:
    """What later forecasts learn from, over the shards this run computed (resumed ones excluded)."""
    computed = [r for r in results if r.status == "committed" and not r.resumed]
    return {
        "computed_rows": float(sum(r.rows_computed for r in computed)),
        "computed_valid_rows": float(sum(r.rows - r.error_rows - r.rows_cached for r in computed)),
        "computed_embedded_tokens": float(sum(r.embedded_tokens - r.cached_embedded_tokens for r in computed)),
    }


# --------------------------------------------------------------------------------------------
# The forecast
# --------------------------------------------------------------------------------------------


def _device_type(cfg: JobConfig) -> str:
    if cfg.device_type:
        return cfg.device_type
    if cfg.device == "cpu":
        return "cpu"
    from shardwise.gpu_runtime import select_device

    return detect_device_type(str(select_device(cfg.device)))


def _pending_shards(cfg: JobConfig, plan: ShardPlan) -> list[Shard]:
    """Shards a run would compute: those without a verified part from this config (reads only)."""
    from shardwise.tasks.output.resume import check_output_compatible, find_committed
    from shardwise.tasks.storage.fs import exists

    if not exists(cfg.output, cfg.storage_options) or check_output_compatible(cfg):
        return list(plan.shards)
    committed = {r.index for r in find_committed(cfg, plan)}
    return [s for s in plan.shards if s.index not in committed]


def _generated(
    cfg: JobConfig, valid_rows: Estimate, past: list[_PastRun], calibration: Calibration | None = None
) -> Estimate:
    upper = cfg.generate.max_new_tokens
    if past:
        per_row = [p.generated_tokens / p.valid_rows for p in past]
        mean = sum(p.generated_tokens for p in past) / sum(p.valid_rows for p in past)
        return Estimate(
            valid_rows.low * min(per_row) / TOKENS_SLACK,
            valid_rows.expected * mean,
            min(valid_rows.high * max(per_row) * TOKENS_SLACK, valid_rows.high * upper),
            f"history: {mean:.1f} generated tokens per row over {len(past)} earlier run(s) of this job",
        )
    if calibration is not None and calibration.rows:
        low, high = calibration.per_row_interval()
        return Estimate(
            valid_rows.low * low / TOKENS_SLACK,
            valid_rows.expected * calibration.mean_per_row,
            valid_rows.high * min(high * TOKENS_SLACK, upper),
            f"calibration: {calibration.mean_per_row:.1f} generated tokens per row over {calibration.rows} "
            f"sampled rows, 95% confidence interval ×/÷ {TOKENS_SLACK:g} for rows unlike the sample "
            "(no earlier run of this job with these settings)",
        )
    return Estimate(
        0.0,
        valid_rows.expected * upper,
        valid_rows.high * upper,
        f"upper bound: max_new_tokens={upper} for each of the rows with text "
        "(no earlier run of this job with these settings)",
    )


def _device_seconds(
    cfg: JobConfig,
    device_type: str,
    prompt: Estimate | None,
    generated: Estimate | None,
    embedded: Estimate | None,
    past: list[_PastRun],
    calibration: Calibration | None = None,
) -> Estimate:
    work = generated if cfg.runs_generation else embedded
    assert work is not None
    if past:
        # Seconds per unit of work, all in: per embedded token (embed-only), else per generated
        # token with each prompt token counted as the fraction of one that the device-type guess
        # puts on it, so that longer prompts than the earlier runs' cost more (prefill time grows
        # with the prompt, not with the answer).
        weight = _prompt_weight(device_type) if cfg.runs_generation else 0.0
        prompted = prompt if prompt is not None and weight else Estimate(0.0, 0.0, 0.0, "")

        def done(p: _PastRun) -> float:
            return p.generated_tokens + weight * p.prompt_tokens if cfg.runs_generation else p.embedded_tokens

        per = [p.device_seconds / max(done(p), 1.0) for p in past]
        mean = sum(p.device_seconds for p in past) / max(sum(done(p) for p in past), 1.0)
        unit = "generated" if cfg.runs_generation else "embedded"
        with_prompts = f", a prompt token counted as {weight:g} of one" if weight else ""
        return Estimate(
            (work.low + weight * prompted.low) * min(per) / TIME_SLACK,
            (work.expected + weight * prompted.expected) * mean,
            (work.high + weight * prompted.high) * max(per) * TIME_SLACK,
            f"history: {1 / mean:.1f} {unit} tok/s{with_prompts}, measured on {device_type} "
            f"over {len(past)} earlier run(s) of this job",
        )
    if cfg.runs_generation and calibration is not None and calibration.rows:
        assert generated is not None
        per = calibration.seconds_per_generated_token
        return Estimate(
            generated.low * per / TIME_SLACK,
            generated.expected * per,
            generated.high * per * TIME_SLACK,
            f"calibration: {1 / per:.1f} generated tok/s (prompts included) over {calibration.rows} "
            f"sampled rows on {calibration.device} just now, ×/÷ {TIME_SLACK:g} for machine load "
            "and batch size" + (", embedding not included" if cfg.runs_embedding else ""),
        )
    rates = DEFAULT_THROUGHPUT["cpu" if device_type == "cpu" else "gpu"]
    parts = [("generated", generated), ("prompt", prompt)] if cfg.runs_generation else []
    if cfg.runs_embedding:
        parts.append(("embedded", embedded))
    low = expected = high = 0.0
    for kind, tokens in parts:
        if tokens is None:
            continue
        rate, slow, fast = rates[kind]
        low += tokens.low / fast
        expected += tokens.expected / rate
        high += tokens.high / slow
    shown = ", ".join(f"{kind} {rates[kind][0]:.0f} tok/s" for kind, _ in parts)
    return Estimate(
        low,
        expected,
        high,
        f"unmeasured guess for {'cpu' if device_type == 'cpu' else 'a GPU'} ({shown}; no earlier run "
        "of this job on this device type; it can be off 10x and more: `plan --calibrate N` measures)",
    )


def _prompt_weight(device_type: str) -> float:
    """A prompt token's device time as a fraction of a generated token's (the guess's rates)."""
    rates = DEFAULT_THROUGHPUT["cpu" if device_type == "cpu" else "gpu"]
    return rates["generated"][0] / rates["prompt"][0]


def _prompt_token_seconds(cfg: JobConfig, device_type: str, past: list[_PastRun], seconds: Estimate) -> float:
    """Expected device-seconds of one more prompt token, as :func:`_device_seconds` counted it."""
    if not cfg.runs_generation:
        return 0.0
    if past:
        weight = _prompt_weight(device_type)
        done = sum(p.generated_tokens + weight * p.prompt_tokens for p in past)
        return weight * sum(p.device_seconds for p in past) / max(done, 1.0)
    if seconds.basis.startswith("unmeasured guess"):
        return 1.0 / DEFAULT_THROUGHPUT["cpu" if device_type == "cpu" else "gpu"]["prompt"][0]
    return 0.0  # calibration: its seconds per generated token include its rows' prompts


def make_forecast(
    cfg: JobConfig,
    plan: ShardPlan,
    sample_rows: int = SAMPLE_ROWS,
    calibrate_rows: int = 0,
    calibration: Calibration | None = None,
) -> Forecast:
    """The forecast of running ``cfg`` over ``plan``; reads inputs, tokenizers and MLflow, writes nothing.

    Without history, a generation job with ``calibrate_rows`` answers that many sampled rows to
    measure (loading the model), unless a ``calibration`` made earlier (another partition) is given."""
    from shardwise.tasks.compute.runners import worker_count

    pending = _pending_shards(cfg, plan)
    rows_to_compute = sum(s.num_rows for s in pending)
    device_type = _device_type(cfg)
    price: Price = lookup_price(device_type, cfg.price_per_device_hour)
    workers = worker_count(cfg)
    forecast = Forecast(
        rows=plan.total_rows,
        rows_to_compute=rows_to_compute,
        shards=len(plan.shards),
        shards_to_compute=len(pending),
        files=len(plan.files),
        device_type=device_type,
        price_per_device_hour=price.per_hour,
        currency=price.currency,
        workers=workers,
    )
    # With a row cache every pending row is looked up, so the rows to compute are counted exactly.
    counts = _count_rows(cfg, pending if cfg.cache else _sample_shards(pending, sample_rows))
    if cfg.cache:
        rows_to_compute -= counts.rows_cached
        forecast.rows_to_compute, forecast.rows_cached = rows_to_compute, counts.rows_cached
    valid_rows = _extrapolate(counts.valid, rows_to_compute, "rows with text")
    past = _history(cfg, device_type)
    forecast.history_runs = [p.run_id for p in past]
    if cfg.runs_generation and not past:
        if calibration is None and calibrate_rows > 0 and pending:
            order = list(pending)
            random.Random(0).shuffle(order)  # rows from across the input, read until there are enough
            calibration = calibrate(cfg, order, calibrate_rows)
        forecast.calibration = calibration
    if cfg.runs_generation:
        forecast.prompt_tokens = _extrapolate(counts.prompt, rows_to_compute, "tokenized chat prompts")
        forecast.generated_tokens = _generated(cfg, valid_rows, past, forecast.calibration)
    if cfg.runs_embedding:
        forecast.embedded_tokens = _extrapolate(counts.embedded, rows_to_compute, "tokenized texts")
    seconds = _device_seconds(
        cfg,
        device_type,
        forecast.prompt_tokens,
        forecast.generated_tokens,
        forecast.embedded_tokens,
        past,
        forecast.calibration,
    )
    forecast.device_seconds = seconds
    forecast.prompt_token_cost = price.cost(_prompt_token_seconds(cfg, device_type, past, seconds))
    forecast.shard_prompt_tokens = dict(counts.shard_prompt) if cfg.runs_generation else {}
    forecast.wall_seconds = Estimate(
        seconds.low / workers,
        seconds.expected / workers,
        seconds.high / workers,
        f"device-seconds over {workers} worker(s), model loading not included",
    )
    forecast.cost = Estimate(
        price.cost(seconds.low),
        price.cost(seconds.expected),
        price.cost(seconds.high),
        f"device-seconds at {price.per_hour:g} {price.currency}/h for {device_type} "
        f"({'job config' if cfg.price_per_device_hour is not None else 'conf/prices.yaml'})",
    )
    return forecast


def sum_forecasts(forecasts: list[Forecast]) -> Forecast:
    """The forecast of running several partitions one after another (a backfill): counts, ranges
    and seconds add up; each basis is the partitions' own when they share it, else their kinds."""
    first = forecasts[0]
    total = Forecast(
        rows=sum(f.rows for f in forecasts),
        rows_to_compute=sum(f.rows_to_compute for f in forecasts),
        shards=sum(f.shards for f in forecasts),
        shards_to_compute=sum(f.shards_to_compute for f in forecasts),
        files=sum(f.files for f in forecasts),
        device_type=first.device_type,
        price_per_device_hour=first.price_per_device_hour,
        currency=first.currency,
        workers=first.workers,
        history_runs=sorted({run for f in forecasts for run in f.history_runs}),
        calibration=next((f.calibration for f in forecasts if f.calibration is not None), None),
    )
    for key in ("prompt_tokens", "generated_tokens", "embedded_tokens", "device_seconds", "wall_seconds", "cost"):
        estimates: list[Estimate] = [getattr(f, key) for f in forecasts if getattr(f, key) is not None]
        if not estimates:
            continue
        kinds = sorted({e.basis.split(":")[0] for e in estimates})
        basis = (
            f"sum over {len(estimates)} partition(s); each {estimates[0].basis}"
            if len(kinds) == 1
            else f"sum over {len(estimates)} partitions; bases: {', '.join(kinds)}"
        )
        setattr(
            total,
            key,
            Estimate(
                sum(e.low for e in estimates), sum(e.expected for e in estimates), sum(e.high for e in estimates), basis
            ),
        )
    return total


def format_forecast(forecast: Forecast, title: str = "shardwise plan (nothing was run)") -> str:
    """The human table ``shardwise plan`` prints."""

    def number(value: float, money: bool = False) -> str:
        return f"{value:.6f}" if money else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"

    lines = [
        "",
        title,
        "-" * len(title),
        f"{'rows':<18}{forecast.rows} in {forecast.files} files, {forecast.shards} shards",
        f"{'to compute':<18}{forecast.rows_to_compute} rows in {forecast.shards_to_compute} shards"
        + (f" ({forecast.rows_cached} more rows from the row cache)" if forecast.rows_cached else ""),
        f"{'device':<18}{forecast.device_type} x {forecast.workers} worker(s), "
        f"{forecast.price_per_device_hour:g} {forecast.currency}/h",
        "",
        f"{'':<18}{'low':>14}{'expected':>14}{'high':>14}  basis",
    ]
    for label, key, money in (
        ("prompt tokens", "prompt_tokens", False),
        ("generated tokens", "generated_tokens", False),
        ("embedded tokens", "embedded_tokens", False),
        ("device-seconds", "device_seconds", False),
        ("wall seconds", "wall_seconds", False),
        (f"cost ({forecast.currency})", "cost", True),
    ):
        e: Estimate | None = getattr(forecast, key)
        if e is None:
            continue
        lines.append(
            f"{label:<18}{number(e.low, money):>14}{number(e.expected, money):>14}"
            f"{number(e.high, money):>14}  {e.basis}"
        )
    return "\n".join(lines)


def over_budget(cfg: JobConfig, forecast: Forecast | None) -> str | None:
    """Why ``cfg.max_cost`` refuses this forecast, or None when it fits."""
    if cfg.max_cost is None:
        return None
    if forecast is None or forecast.cost is None:
        return f"max_cost {cfg.max_cost:g} is set but the cost could not be forecast; see `shardwise plan`"
    if forecast.cost.high > cfg.max_cost:
        return (
            f"forecast cost up to {forecast.cost.high:.6f} {forecast.currency} (expected "
            f"{forecast.cost.expected:.6f}) exceeds max_cost {cfg.max_cost:g}; nothing was run "
            "(see `shardwise plan` for the basis)"
        )
    return None


def run_sample_rows(cfg: JobConfig) -> int:
    """Rows the forecast made at the start of a run tokenizes: all of SAMPLE_ROWS when max_cost
    is checked against it, else IN_RUN_SAMPLE_ROWS."""
    return SAMPLE_ROWS if cfg.max_cost is not None else IN_RUN_SAMPLE_ROWS


@task(name="forecast")
def forecast_task(cfg: JobConfig, plan: ShardPlan) -> Forecast | None:
    """The forecast for a run started without one (deployments); a run without ``max_cost`` goes
    ahead when it cannot be made (e.g. a tokenizer that cannot be fetched offline)."""
    try:
        return make_forecast(cfg, plan, run_sample_rows(cfg))
    except Exception as err:  # noqa: BLE001 - the forecast informs the run; it must not break it
        if cfg.max_cost is not None:
            raise
        get_run_logger().warning("no cost forecast for this run: %s: %s", type(err).__name__, err)
        return None


def _log(run_id: str, params: dict[str, str], metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from shardwise.tasks.storage.local_state import tracking_uri

    stamp = int(time.time() * 1000)
    MlflowClient(tracking_uri()).log_batch(
        run_id,
        metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
    )


def log_forecast(run_id: str, forecast: Forecast | None) -> None:
    """The forecast as ``forecast_*`` params and metrics, next to the actuals the run logs."""
    if forecast is not None:
        _log(run_id, *forecast.mlflow_values())


def log_computed(run_id: str, results: list[Any]) -> None:
    """The per-row actuals later forecasts of this job are made from (see :func:`_history`)."""
    _log(run_id, {}, history_metrics(results))
