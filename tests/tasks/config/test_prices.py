import pytest

from shardwise.tasks.config.prices import Price, lookup_price


def test_prices_come_from_the_table_and_overrides_win():
    assert lookup_price("cpu").per_hour == pytest.approx(0.10)
    assert lookup_price("nvidia-h100-80gb-hbm3").per_hour == pytest.approx(3.50)
    assert lookup_price("nvidia-a100-sxm4-80gb").per_hour == pytest.approx(2.50)
    assert lookup_price("some-future-gpu").per_hour == pytest.approx(3.00)
    assert lookup_price("cpu", override=1.25).per_hour == 1.25


def test_cost_is_device_seconds_times_hourly_price():
    assert Price("cpu", 3.6).cost(1000) == pytest.approx(1.0)
