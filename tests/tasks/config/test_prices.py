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


def _endpoint_job(**overrides):
    from shardwise.tasks.config.loading import build_config

    return build_config(
        None,
        {
            "input": "/tmp/in",
            "output": "/tmp/out",
            "task": "generate",
            "generate": {"engine": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini"},
            **overrides,
        },
    )


def test_an_endpoint_is_no_local_device_and_costs_nothing_per_hour_unless_set():
    from shardwise.tasks.config.prices import detect_device_type

    assert detect_device_type("endpoint:127.0.0.1:8000") == "endpoint:127.0.0.1:8000"
    # no fallback to the default GPU's price, nor to a table row its host name happens to contain
    assert lookup_price("endpoint:127.0.0.1:8000").per_hour == 0.0
    assert lookup_price("endpoint:h100-box:8000").per_hour == 0.0
    assert lookup_price("endpoint:127.0.0.1:8000", override=2.0).per_hour == 2.0


def test_an_endpoint_jobs_price_bills_its_tokens_at_per_million_prices_less_the_batch_discount():
    from shardwise.tasks.config.endpoint import token_cost
    from shardwise.tasks.config.prices import job_price

    assert token_cost(2_000_000, 1_000_000, 0.15, 0.60) == pytest.approx(0.90)
    assert token_cost(2_000_000, 1_000_000, 0.15, 0.60, discount=0.5) == pytest.approx(0.45)

    cfg = _endpoint_job(price_per_million_input_tokens=0.15, price_per_million_output_tokens=0.60, batch_discount=0.5)
    price = job_price(cfg, "endpoint:127.0.0.1:9")
    assert (price.per_hour, price.endpoint_roles) == (0.0, ("generate",))
    # prompts in, answers out; nothing is embedded by this job, so embedded tokens are not billed
    assert price.total_cost(3600, prompt=2e6, generated=1e6, embedded=5e6) == pytest.approx(0.45)
    assert "0.15 in / 0.6 out USD per 1M tokens, less 50% batch discount" in price.token_basis()


def test_an_endpoint_job_without_token_prices_costs_nothing_and_says_so():
    from shardwise.tasks.config.prices import job_price

    price = job_price(_endpoint_job(), "endpoint:127.0.0.1:9")
    assert price.total_cost(3600, prompt=1e6, generated=1e6) == 0.0
    assert "no token prices set" in price.token_basis()


def test_a_local_section_next_to_an_endpoint_pays_for_its_device_hours():
    from shardwise.tasks.config.prices import job_price

    cfg = _endpoint_job(task="both", price_per_million_input_tokens=1.0, price_per_million_output_tokens=2.0)
    price = job_price(cfg, "endpoint:127.0.0.1:9", local_device_type="cpu")
    assert price.per_hour == lookup_price("cpu").per_hour
    # embedding runs here: its tokens are device time, not billed by the endpoint
    assert price.total_cost(3600, prompt=1e6, generated=1e6, embedded=1e6) == pytest.approx(
        lookup_price("cpu").per_hour + 3.0
    )


def test_a_local_job_is_priced_as_before():
    from shardwise.tasks.config.loading import build_config
    from shardwise.tasks.config.prices import job_price

    cfg = build_config(None, {"input": "/tmp/in", "output": "/tmp/out", "price_per_million_input_tokens": 9.0})
    assert job_price(cfg, "cpu") == lookup_price("cpu")
    assert job_price(cfg, "cpu").total_cost(3600, 1e6, 1e6, 1e6) == lookup_price("cpu").per_hour
