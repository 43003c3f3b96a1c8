"""Cost estimates: device-seconds actually used times an editable price per device-hour.

Prices live in ``conf/prices.yaml`` (documented there as list-price assumptions); a job config's
``price_per_device_hour`` overrides the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

PRICES_FILE = Path(__file__).resolve().parents[2] / "conf" / "prices.yaml"


@dataclass(frozen=True)
class Price:
    device_type: str
    per_hour: float
    currency: str = "USD"

    def cost(self, device_seconds: float) -> float:
        return device_seconds / 3600.0 * self.per_hour


def detect_device_type(device: str | None) -> str:
    """``cpu``, or the CUDA device's name normalised (``nvidia-h100-80gb-hbm3``)."""
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
    table: dict[str, float] = data.get("per_device_hour", {})
    if device_type in table:
        return Price(device_type, float(table[device_type]), currency)
    for key, value in table.items():
        if key not in ("cpu", "default-gpu") and key in device_type:
            return Price(device_type, float(value), currency)
    fallback = table.get("cpu" if device_type == "cpu" else "default-gpu", 0.0)
    return Price(device_type, float(fallback), currency)


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
