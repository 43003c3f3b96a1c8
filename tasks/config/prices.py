"""Cost estimates: device-seconds actually used times an editable price per device-hour, plus the
tokens of the roles a serving endpoint runs (``engine: openai``) at per-token prices.

Prices per device-hour live in ``conf/prices.yaml`` (documented there as list-price assumptions); a
job config's ``price_per_device_hour`` overrides the table. Token prices are the job config's
``price_per_million_input_tokens``, ``price_per_million_output_tokens`` and ``batch_discount``. An
endpoint is no local device: its device type is ``endpoint:<host:port>``, priced at 0 per hour
unless ``price_per_device_hour`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from shardwise.tasks.config.endpoint import endpoint_host, token_cost

if TYPE_CHECKING:
    from shardwise.tasks.config.job import JobConfig

PRICES_FILE = Path(__file__).resolve().parents[2] / "conf" / "prices.yaml"
ENDPOINT_PREFIX = "endpoint:"


@dataclass(frozen=True)
class Price:
    """The price of a run's work: per device-hour, and per token for ``endpoint_roles`` (the job's
    sections served by an endpoint: ``generate``, ``embed``); a token price that is None is unset."""

    device_type: str
    per_hour: float
    currency: str = "USD"
    endpoint_roles: tuple[str, ...] = ()
    per_million_input_tokens: float | None = None
    per_million_output_tokens: float | None = None
    batch_discount: float = 0.0

    def cost(self, device_seconds: float) -> float:
        """The device-hour part of a cost."""
        return device_seconds / 3600.0 * self.per_hour

    def input_tokens(self, prompt: float, embedded: float) -> float:
        """The tokens an endpoint bills as input: prompts it answered, texts it embedded."""
        return (prompt if "generate" in self.endpoint_roles else 0) + (
            embedded if "embed" in self.endpoint_roles else 0
        )

    def output_tokens(self, generated: float) -> float:
        """The tokens an endpoint bills as output: the answers it generated."""
        return generated if "generate" in self.endpoint_roles else 0

    def token_cost(self, prompt: float, generated: float, embedded: float) -> float:
        """The token part of a cost (0 without endpoint roles, and for an unset price)."""
        if not self.endpoint_roles:
            return 0.0
        return token_cost(
            self.input_tokens(prompt, embedded),
            self.output_tokens(generated),
            self.per_million_input_tokens or 0.0,
            self.per_million_output_tokens or 0.0,
            self.batch_discount,
        )

    def total_cost(self, device_seconds: float, prompt: float = 0, generated: float = 0, embedded: float = 0) -> float:
        """Device-seconds at the hourly price plus the endpoint's tokens at the token prices."""
        if not self.endpoint_roles:
            return self.cost(device_seconds)
        return self.cost(device_seconds) + self.token_cost(prompt, generated, embedded)

    def unset_token_prices(self) -> list[str]:
        """The token prices the endpoint roles need that the job does not set (priced at 0)."""
        needed = []
        if self.endpoint_roles and self.per_million_input_tokens is None:
            needed.append("price_per_million_input_tokens")
        if "generate" in self.endpoint_roles and self.per_million_output_tokens is None:
            needed.append("price_per_million_output_tokens")
        return needed

    def token_basis(self) -> str:
        """The token prices in words ("" without endpoint roles)."""
        if not self.endpoint_roles:
            return ""
        roles = " and ".join(self.endpoint_roles)
        if self.per_million_input_tokens is None and self.per_million_output_tokens is None:
            return f"{roles} on an endpoint: no token prices set (tokens priced at 0)"
        unset = self.unset_token_prices()
        discount = f", less {self.batch_discount:.0%} batch discount" if self.batch_discount else ""
        return (
            f"{roles} on an endpoint: {self.per_million_input_tokens or 0:g} in / "
            f"{self.per_million_output_tokens or 0:g} out {self.currency} per 1M tokens{discount}"
            + (f" ({', '.join(unset)} not set: 0)" if unset else "")
        )


def detect_device_type(device: str | None) -> str:
    """``cpu``, the CUDA device's name normalised (``nvidia-h100-80gb-hbm3``), or an endpoint's
    ``endpoint:<host:port>`` (what an ``engine: openai`` reports as its device)."""
    if device and device.startswith(ENDPOINT_PREFIX):
        return device
    if not device or not device.startswith("cuda"):
        return "cpu"
    import torch

    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return torch.cuda.get_device_name(index).lower().replace(" ", "-")


def lookup_price(device_type: str, override: float | None = None, prices_file: Path = PRICES_FILE) -> Price:
    data = yaml.safe_load(prices_file.read_text()) if prices_file.exists() else {}
    currency = data.get("currency", "USD")
    if override is not None:
        return Price(device_type, float(override), currency)
    if device_type.startswith(ENDPOINT_PREFIX):
        return Price(device_type, 0.0, currency)  # no local device: its tokens are what is paid for
    table: dict[str, float] = data.get("per_device_hour", {})
    if device_type in table:
        return Price(device_type, float(table[device_type]), currency)
    for key, value in table.items():
        if key not in ("cpu", "default-gpu") and key in device_type:
            return Price(device_type, float(value), currency)
    fallback = table.get("cpu" if device_type == "cpu" else "default-gpu", 0.0)
    return Price(device_type, float(fallback), currency)


def endpoint_device_type(cfg: JobConfig) -> str | None:
    """``endpoint:<host:port>`` of the endpoint whose engine a shard reports as its device (the
    generation's, else the embedding's when it is the only engine); None when that engine is local."""
    sections = cfg.endpoint_sections()
    role = "generate" if cfg.runs_generation else "embed"
    base_url = sections[role].base_url if role in sections else None
    return ENDPOINT_PREFIX + endpoint_host(base_url) if base_url else None


def job_price(cfg: JobConfig, device_type: str, local_device_type: str | None = None) -> Price:
    """The price of ``cfg``'s work on ``device_type``: per device-hour (the config's override, else
    the table), and per token for its sections on an endpoint. ``local_device_type``: the local
    device of a job that also runs a section here while the other is on an endpoint, whose hours
    are paid for at that device's price."""
    price = lookup_price(device_type, cfg.price_per_device_hour)
    roles = tuple(cfg.endpoint_sections())
    if not roles:
        return price
    if local_device_type and cfg.price_per_device_hour is None and device_type.startswith(ENDPOINT_PREFIX):
        price = replace(price, per_hour=lookup_price(local_device_type).per_hour)
    return replace(
        price,
        endpoint_roles=roles,
        per_million_input_tokens=cfg.price_per_million_input_tokens,
        per_million_output_tokens=cfg.price_per_million_output_tokens,
        batch_discount=cfg.batch_discount,
    )


def nvml_available() -> bool:
    """Whether NVIDIA's management library is importable and finds a GPU (``nvidia-ml-py``)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:  # noqa: BLE001 - no library, no driver or no GPU: all mean "not available"
        return False


def gpu_energy_mj(device: str | None) -> float | None:
    """Total energy the device has used since the driver loaded, in mJ; None off NVIDIA GPUs."""
    if not device or not device.startswith("cuda"):
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(index)))
    except Exception:  # noqa: BLE001 - energy is optional; never fail a shard over it
        return None
