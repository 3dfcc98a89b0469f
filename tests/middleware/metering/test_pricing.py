"""Credit arithmetic and the start-up price checks (no network)."""

from __future__ import annotations

import pytest

from middleware.metering.pricing import Pricing, output_cap, output_estimate, pricing_table, prompt_estimate
from proxy.core.pipeline import unit_settings
from proxy.core.settings import ConfigError, load_settings


def pricing(**kw) -> Pricing:
    base = dict(input=500, output=1500, cached=250, per_request=0, free=False, max_output_tokens=100, output_cap_param="max_tokens")
    return Pricing(**{**base, **kw})


def test_cost_rounds_up_and_adds_per_request():
    p = pricing(per_request=3)
    assert p.cost(1, 0) == 1 + 3  # 500 micro-credits round up to 1
    assert p.cost(2000, 1000) == 3 + 3  # 1,000,000 + 1,500,000 micro-credits: 2.5 -> 3
    assert p.cost(0, 0) == 3
    assert p.cost(1000, 0, cached_tokens=1000) == 1 + 3  # 250,000 -> 1
    assert p.cost(4000, 0, cached_tokens=2000) == 2 + 3  # (2000*500 + 2000*250) / 1e6 = 1.5 -> 2


def test_cached_tokens_are_clamped_to_the_input():
    p = pricing()  # 500 per million input tokens, 250 cached
    assert p.cost(10**6, 0, cached_tokens=4 * 10**5) == 400  # 600,000 * 500 + 400,000 * 250 micro-credits
    assert p.cost(10**6, 0, cached_tokens=-50) == p.cost(10**6, 0) == 500  # a negative report counts as none cached
    assert p.cost(10**6, 0, cached_tokens=5 * 10**6) == p.cost(10**6, 0, cached_tokens=10**6) == 250  # at most the input
    assert p.cost(0, 0, cached_tokens=10) == 0


def test_free_model_costs_nothing():
    assert pricing(free=True).cost(10**6, 10**6) == 0


def test_affordable_output_is_the_largest_cap_that_fits():
    p = pricing(input=1_000_000, output=2_000_000)
    assert p.affordable_output(10, 1, 100) == 45
    assert p.cost(10, 45) <= 100 < p.cost(10, 46)
    assert p.affordable_output(10, 3, 100) == 15
    assert p.affordable_output(10, 1, 5) == 0


def test_prompt_estimate_bounds_tokens_by_bytes():
    assert prompt_estimate(300, 2, 3) == 100 + 16
    assert prompt_estimate(301, 1, 3) == 101 + 8
    assert prompt_estimate(301, 1, 1) == 301 + 8


def test_output_estimate_and_cap():
    assert output_estimate(3, 18) == 5
    assert output_estimate(10, 8) == 10
    assert output_cap({"max_tokens": 5, "max_completion_tokens": 7}) == 7  # max_completion_tokens wins
    assert output_cap({"max_tokens": 5}) == 5
    assert output_cap({"max_tokens": True}) is None


def test_prices_are_required_unless_free():
    base = {"upstreams": {"default": {"url": "http://127.0.0.1:1/v1"}}}
    with pytest.raises(ConfigError) as exc:
        load_settings(env={}, overrides={**base, "models": {"m": {"upstream": "default"}}})
    assert "models.m" in str(exc.value) and "price" in str(exc.value)
    settings = load_settings(env={}, overrides={**base, "models": {"m": {"free": True}}})
    assert pricing_table(settings)["m"].free
    settings = load_settings(
        env={},
        overrides={**base, "models": {"m": {"price": {"input_per_million": 7}}, "a": {"alias_of": "m"}}},
    )
    table = pricing_table(settings)
    assert table["a"].input == 7 and table["a"].cached == 7 and not table["a"].free


def test_bad_metering_settings_name_the_field():
    from middleware.metering.unit import MeteringUnit

    with pytest.raises(ConfigError) as exc:
        unit_settings(MeteringUnit, {"on_low_balance": "maybe"})
    assert "units.metering.on_low_balance" in str(exc.value)
    with pytest.raises(ConfigError):
        unit_settings(MeteringUnit, {"chars_per_token": 0.5})
