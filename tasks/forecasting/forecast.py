"""What a run will cost before it starts: rows, tokens, device-seconds and money, each with its basis.

``shardwise plan`` prints it, ``run`` refuses a job whose high end exceeds ``max_cost``, and every
run logs it to MLflow next to the actuals, so later forecasts can learn from earlier runs. This
module does the arithmetic; the figures it combines come from:

- prompt tokens (:mod:`~shardwise.tasks.forecasting.token_counts`), counted exactly with the
  model's tokenizer and chat template (no weights are loaded); above ``sample_rows`` rows to
  compute, whole shards are drawn at random until that many rows are read and the total is
  extrapolated with a 95% confidence interval;
- generated tokens per row from finished MLflow runs of the same job (experiment name) with the
  same model, prompt and decoding settings (:mod:`~shardwise.tasks.forecasting.history`); without
  any, from a calibration run on a sample when asked for
  (:mod:`~shardwise.tasks.forecasting.calibration`, ``plan --calibrate N``); else the
  ``max_new_tokens`` upper bound;
- device-seconds per token from those runs on the same device type, else from the calibration;
  without either, from :data:`DEFAULT_THROUGHPUT`, an unmeasured guess per device type with a
  range wide enough for a busy machine (stated as such);
- cost: device-seconds times the price per device-hour (``conf/prices.yaml``), plus, for the
  sections a serving endpoint runs (``engine: openai``), their tokens at the job's per-token prices.

A job whose generation (or only engine) runs on an endpoint has the device type
``endpoint:<host:port>``: its history is the earlier runs on that endpoint, and its device-hours
cost nothing unless ``price_per_device_hour`` is set. A hosted model name that no local tokenizer
resolves to has its prompt tokens estimated at ~4 characters per token, as the basis says.

The result is a :class:`~shardwise.tasks.forecasting.estimates.Forecast`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.prices import Price, detect_device_type, endpoint_device_type, job_price
from shardwise.tasks.forecasting.calibration import Calibration, calibrate
from shardwise.tasks.forecasting.estimates import Estimate, Forecast
from shardwise.tasks.forecasting.history import PastRun, past_runs
from shardwise.tasks.forecasting.token_counts import (
    CHARS_PER_TOKEN,
    TokenCounts,
    count_rows,
    extrapolate,
    sample_shards,
)
from shardwise.tasks.planning.shards import Shard, ShardPlan

# Rows at or below which every prompt is tokenized; above it, a random sample of shards.
SAMPLE_ROWS = 20_000
# A run's own forecast only informs unless max_cost is set: a smaller sample keeps its tokenizing
# out of the run's fixed cost (``shardwise plan`` still samples SAMPLE_ROWS).
IN_RUN_SAMPLE_ROWS = 2_000

# Rough throughput of one device when no run of the job has been measured on it yet, as
# (expected, slow, fast) tokens per second. The CPU row is SmolLM2-135M and MiniLM on 2 free cores
# (about 60 generated tok/s batched); the slow end is what a 2-core VM shared by six concurrent workloads gave
# (0.6 generated tok/s). The GPU row is a guess for small models on one GPU. These are not
# measurements of your model: trust history or a calibration run.
DEFAULT_THROUGHPUT: dict[str, dict[str, tuple[float, float, float]]] = {
    "cpu": {"generated": (40.0, 0.5, 160.0), "prompt": (400.0, 5.0, 4000.0), "embedded": (2000.0, 30.0, 20000.0)},
    "gpu": {
        "generated": (1500.0, 100.0, 20000.0),
        "prompt": (20000.0, 2000.0, 500000.0),
        "embedded": (50000.0, 5000.0, 1000000.0),
    },
    # A serving endpoint answering a worker's concurrent requests: anything from a rate-limited
    # hosted API to a large local server.
    "endpoint": {
        "generated": (500.0, 20.0, 10000.0),
        "prompt": (10000.0, 500.0, 200000.0),
        "embedded": (20000.0, 1000.0, 500000.0),
    },
}
# Spread put around history-based figures: tokens per row vary with the text; device time also
# with the machine's load (on a shared 2-core VM, two runs of one small job differed 3.75x).
TOKENS_SLACK = 2.0
TIME_SLACK = 4.0


def job_device_type(cfg: JobConfig) -> str:
    """The price-table key and history key of ``cfg``'s work: the config's ``device_type``, else the
    endpoint's ``endpoint:<host:port>`` where its shards report one, else this machine's device."""
    return cfg.device_type or endpoint_device_type(cfg) or _local_device_type(cfg)


def _guess_kind(device_type: str) -> str:
    return "cpu" if device_type == "cpu" else "endpoint" if device_type.startswith("endpoint:") else "gpu"


def _local_device_type(cfg: JobConfig) -> str:
    if cfg.device == "cpu":
        return "cpu"
    from shardwise.gpu_runtime import select_device

    return detect_device_type(str(select_device(cfg.device)))


def pending_shards(cfg: JobConfig, plan: ShardPlan, replaces_output: bool | None = None) -> list[Shard]:
    """Shards a run would compute: those without a verified part from this config (reads only).
    ``replaces_output`` is what ``check_output_compatible`` returned, when the caller checked."""
    from shardwise.tasks.output.resume import check_output_compatible, find_committed
    from shardwise.tasks.storage.fs import exists

    if replaces_output or not exists(cfg.output, cfg.storage_options):
        return list(plan.shards)
    if replaces_output is None and check_output_compatible(cfg):  # the caller had not checked
        return list(plan.shards)
    committed = {r.index for r in find_committed(cfg, plan)}
    return [s for s in plan.shards if s.index not in committed]


def _generated(
    cfg: JobConfig, valid_rows: Estimate, past: list[PastRun], calibration: Calibration | None = None
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


def estimate_device_seconds(
    cfg: JobConfig,
    device_type: str,
    prompt: Estimate | None,
    generated: Estimate | None,
    embedded: Estimate | None,
    past: list[PastRun],
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

        def done(p: PastRun) -> float:
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
    kind_of_device = _guess_kind(device_type)
    rates = DEFAULT_THROUGHPUT[kind_of_device]
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
        f"unmeasured guess for {_GUESS_NAMES[kind_of_device]} ({shown}; no earlier run "
        "of this job on this device type; it can be off 10x and more: `plan --calibrate N` measures)",
    )


_GUESS_NAMES = {"cpu": "cpu", "gpu": "a GPU", "endpoint": "an endpoint"}


def _prompt_weight(device_type: str) -> float:
    """A prompt token's device time as a fraction of a generated token's (the guess's rates)."""
    rates = DEFAULT_THROUGHPUT[_guess_kind(device_type)]
    return rates["generated"][0] / rates["prompt"][0]


def _prompt_token_seconds(cfg: JobConfig, device_type: str, past: list[PastRun], seconds: Estimate) -> float:
    """Expected device-seconds of one more prompt token, as :func:`estimate_device_seconds` counted it."""
    if not cfg.runs_generation:
        return 0.0
    if past:
        weight = _prompt_weight(device_type)
        done = sum(p.generated_tokens + weight * p.prompt_tokens for p in past)
        return weight * sum(p.device_seconds for p in past) / max(done, 1.0)
    if seconds.basis.startswith("unmeasured guess"):
        return 1.0 / DEFAULT_THROUGHPUT[_guess_kind(device_type)]["prompt"][0]
    return 0.0  # calibration: its seconds per generated token include its rows' prompts


def make_forecast(
    cfg: JobConfig,
    plan: ShardPlan,
    sample_rows: int = SAMPLE_ROWS,
    calibrate_rows: int = 0,
    calibration: Calibration | None = None,
    pending: list[Shard] | None = None,
) -> Forecast:
    """The forecast of running ``cfg`` over ``plan``; reads inputs, tokenizers and MLflow, writes nothing.

    Without history, a generation job with ``calibrate_rows`` answers that many sampled rows to
    measure (loading the model), unless a ``calibration`` made earlier (another partition) is given.
    ``pending``: the shards to compute, when the caller has found them (:func:`pending_shards`)."""
    from shardwise.tasks.compute.runners import worker_count

    if pending is None:
        pending = pending_shards(cfg, plan)
    rows_to_compute = sum(s.num_rows for s in pending)
    device_type = job_device_type(cfg)
    price: Price = job_price(cfg, device_type, _mixed_local_device_type(cfg, device_type))
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
    counts = count_rows(cfg, pending if cfg.cache else sample_shards(pending, sample_rows))
    if cfg.cache:
        rows_to_compute -= counts.rows_cached
        forecast.rows_to_compute, forecast.rows_cached = rows_to_compute, counts.rows_cached
    valid_rows = extrapolate(counts.valid, rows_to_compute, "rows with text")
    past = past_runs(cfg, device_type)
    forecast.history_runs = [p.run_id for p in past]
    if cfg.runs_generation and not past:
        if calibration is None and calibrate_rows > 0 and pending:
            order = list(pending)
            random.Random(0).shuffle(order)  # rows from across the input, read until there are enough
            calibration = calibrate(cfg, order, calibrate_rows)
        forecast.calibration = calibration
    if cfg.runs_generation:
        forecast.prompt_tokens = _approximated(
            extrapolate(counts.prompt, rows_to_compute, "tokenized chat prompts"), "generate", cfg, counts
        )
        forecast.generated_tokens = _generated(cfg, valid_rows, past, forecast.calibration)
    if cfg.runs_embedding:
        forecast.embedded_tokens = _approximated(
            extrapolate(counts.embedded, rows_to_compute, "tokenized texts"), "embed", cfg, counts
        )
    seconds = estimate_device_seconds(
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
    forecast.prompt_token_cost += price.token_cost(1.0, 0.0, 0.0)
    forecast.shard_prompt_tokens = dict(counts.shard_prompt) if cfg.runs_generation else {}
    forecast.wall_seconds = Estimate(
        seconds.low / workers,
        seconds.expected / workers,
        seconds.high / workers,
        f"device-seconds over {workers} worker(s), model loading not included",
    )
    device_basis = (
        f"device-seconds at {price.per_hour:g} {price.currency}/h for {device_type} "
        f"({'job config' if cfg.price_per_device_hour is not None else 'conf/prices.yaml'})"
    )
    if price.endpoint_roles and cfg.price_per_device_hour is None and price.per_hour == 0:
        device_basis = f"no local device ({device_type}: 0 {price.currency}/h)"

    def cost(end: str) -> float:
        tokens = [
            getattr(e, end) if e is not None else 0.0
            for e in (forecast.prompt_tokens, forecast.generated_tokens, forecast.embedded_tokens)
        ]
        return price.total_cost(getattr(seconds, end), *tokens)

    forecast.cost = Estimate(
        cost("low"),
        cost("expected"),
        cost("high"),
        f"{price.token_basis()}; {device_basis}" if price.endpoint_roles else device_basis,
    )
    return forecast


def _mixed_local_device_type(cfg: JobConfig, device_type: str) -> str | None:
    """This machine's device type, for a job that runs one section here and the other on an endpoint."""
    local = [role for role in ("generate", "embed") if role not in cfg.endpoint_sections()]
    used = [role for role in local if (cfg.runs_generation if role == "generate" else cfg.runs_embedding)]
    if not used or not cfg.endpoint_sections() or not device_type.startswith("endpoint:"):
        return None
    return _local_device_type(cfg)


def _approximated(estimate: Estimate, role: str, cfg: JobConfig, counts: TokenCounts) -> Estimate:
    """``estimate`` with its basis saying so when ``role``'s tokens were estimated from characters."""
    if role not in counts.approximated:
        return estimate
    model = cfg.generate.model if role == "generate" else cfg.embed.model
    return replace(
        estimate,
        basis=f"approximate: ~{CHARS_PER_TOKEN} characters per token ({model!r} has no local tokenizer); "
        + estimate.basis.replace("exact: ", "").replace("tokenized ", ""),
    )


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


def forecast_for_run(
    cfg: JobConfig, plan: ShardPlan, logger: logging.Logger | logging.LoggerAdapter
) -> Forecast | None:
    """The forecast for a run started without one (the flow called directly, e.g. as a subflow); a run
    without ``max_cost`` goes ahead, with a warning to ``logger``, when it cannot be made (e.g. a
    tokenizer that cannot be fetched offline)."""
    try:
        return make_forecast(cfg, plan, run_sample_rows(cfg))
    except Exception as err:  # noqa: BLE001 - the forecast informs the run; it must not break it
        if cfg.max_cost is not None:
            raise
        logger.warning("no cost forecast for this run: %s: %s", type(err).__name__, err)
        return None
