"""``shardwise plan --compare``: the job's forecast on its own engine and device next to what the
same work would take and cost on each endpoint its config lists under ``endpoints:``.

Every row uses the job's own token estimates (counted once, by the forecast): an endpoint bills the
prompts it answers and the texts it embeds as input tokens and the answers it generates as output
tokens. An endpoint's time comes from earlier runs of this job on its host (when its ``base_url``
is given), else from its stated ``tokens_per_s``, else from the unmeasured guess for an endpoint;
each row's basis says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardwise.tasks.config.endpoint import EndpointOffer, endpoint_host, token_cost
from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.prices import ENDPOINT_PREFIX
from shardwise.tasks.forecasting.estimates import Estimate, Forecast
from shardwise.tasks.forecasting.forecast import estimate_device_seconds
from shardwise.tasks.forecasting.history import past_runs

ENDS = ("low", "expected", "high")


@dataclass(frozen=True)
class ComparisonRow:
    """One way to run the job: where, the tokens it processes, its wall time and its cost."""

    name: str
    where: str
    input_tokens: Estimate
    output_tokens: Estimate
    wall_seconds: Estimate | None
    cost: Estimate

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "where": self.where,
            "input_tokens": self.input_tokens.to_dict(),
            "output_tokens": self.output_tokens.to_dict(),
            "wall_seconds": None if self.wall_seconds is None else self.wall_seconds.to_dict(),
            "cost": self.cost.to_dict(),
        }


def _sum(basis: str, *estimates: Estimate | None) -> Estimate:
    present = [e for e in estimates if e is not None]
    return Estimate(*(sum(getattr(e, end) for e in present) for end in ENDS), basis)


def job_tokens(forecast: Forecast) -> tuple[Estimate, Estimate]:
    """(input, output) tokens of the job's work: prompts and embedded texts in, answers out."""
    return (
        _sum("prompt and embedded tokens", forecast.prompt_tokens, forecast.embedded_tokens),
        _sum("generated tokens", forecast.generated_tokens),
    )


def _own_row(cfg: JobConfig, forecast: Forecast) -> ComparisonRow:
    engine = cfg.generation_engine() if cfg.runs_generation else cfg.embed.engine
    where = f"{engine} on {forecast.device_type}" + ("" if forecast.workers == 1 else f" x {forecast.workers}")
    tokens_in, tokens_out = job_tokens(forecast)
    assert forecast.cost is not None
    wall, seconds = forecast.wall_seconds, forecast.device_seconds
    if wall is not None and seconds is not None:
        wall = Estimate(wall.low, wall.expected, wall.high, f"{seconds.basis}; over {forecast.workers} worker(s)")
    return ComparisonRow("this job", where, tokens_in, tokens_out, wall, forecast.cost)


def _offer_wall_seconds(cfg: JobConfig, forecast: Forecast, offer: EndpointOffer) -> Estimate:
    """The wall time of the job's work on ``offer``: measured there by earlier runs of this job, else
    at its stated throughput, else the unmeasured guess for an endpoint."""
    device_type = ENDPOINT_PREFIX + (endpoint_host(offer.base_url) if offer.base_url else offer.name)
    past = past_runs(cfg, device_type) if offer.base_url else []
    tokens = (forecast.prompt_tokens, forecast.generated_tokens, forecast.embedded_tokens)
    if past or offer.tokens_per_s is None:
        seconds = estimate_device_seconds(cfg, device_type, *tokens, past)
        return Estimate(
            *(getattr(seconds, end) / forecast.workers for end in ENDS),
            f"{seconds.basis}; over {forecast.workers} worker(s)",
        )
    work = forecast.generated_tokens if cfg.runs_generation else forecast.embedded_tokens
    assert work is not None
    unit = "generated" if cfg.runs_generation else "embedded"
    return Estimate(
        *(getattr(work, end) / offer.tokens_per_s for end in ENDS),
        f"stated: tokens_per_s {offer.tokens_per_s:g} {unit} tok/s in the config (no earlier run of this job on it)",
    )


def _offer_row(cfg: JobConfig, forecast: Forecast, offer: EndpointOffer) -> ComparisonRow:
    tokens_in, tokens_out = job_tokens(forecast)
    prices = (offer.price_per_million_input_tokens, offer.price_per_million_output_tokens, offer.batch_discount)
    discount = f", less {offer.batch_discount:.0%} batch discount" if offer.batch_discount else ""
    cost = Estimate(
        *(token_cost(getattr(tokens_in, end), getattr(tokens_out, end), *prices) for end in ENDS),
        f"tokens at {prices[0]:g} in / {prices[1]:g} out {forecast.currency} per 1M tokens{discount}; no local device",
    )
    where = endpoint_host(offer.base_url) if offer.base_url else "(no base_url)"
    return ComparisonRow(offer.name, where, tokens_in, tokens_out, _offer_wall_seconds(cfg, forecast, offer), cost)


def compare_endpoints(cfg: JobConfig, forecast: Forecast) -> list[ComparisonRow]:
    """The job's own row (its forecast), then one row per endpoint of ``cfg.endpoints``; reads
    MLflow history, contacts no endpoint."""
    return [_own_row(cfg, forecast)] + [_offer_row(cfg, forecast, offer) for offer in cfg.endpoints]
