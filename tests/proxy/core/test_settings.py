"""Settings: YAML, env overrides, field-path errors, masking, shipped defaults."""

from __future__ import annotations

import pytest
import yaml

from proxy.core.settings import SHIPPED_CONFIG, ConfigError, Settings, load_settings


def test_shipped_file_equals_the_model_defaults():
    assert load_settings(SHIPPED_CONFIG, env={}) == Settings()
    assert "sovereign-alpha" in Settings().models


def test_env_alone_configures_the_gateway_without_any_file(tmp_path, monkeypatch):
    env = {
        "SOVEREIGN_CONFIG": str(tmp_path / "missing.yaml"),
        "SOVEREIGN_UPSTREAM_URL": "http://10.0.0.5:8000/v1/",
        "SOVEREIGN_UPSTREAM_API_KEY": "sk-up",
        "SOVEREIGN_UPSTREAM_MODEL": "llama-3",
        "SOVEREIGN_STORE_URL": "redis://redis:6379/2",
        "SOVEREIGN_ADMIN_TOKEN": "adm",
        "SOVEREIGN_HOST": "127.0.0.1",
        "SOVEREIGN_PORT": "9999",
        "SOVEREIGN_LOG_LEVEL": "DEBUG",
        "SOVEREIGN_SERVER__MAX_BODY_BYTES": "2048",
        "SOVEREIGN_UNITS__METERING__ON_LOW_BALANCE": "clamp",
    }
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(env=env)
    env.pop("SOVEREIGN_CONFIG")
    monkeypatch.setattr("proxy.core.settings.SHIPPED_CONFIG", tmp_path / "not-shipped.yaml")
    s = load_settings(env=env)
    assert s.upstreams["default"].url == "http://10.0.0.5:8000/v1"
    assert s.upstreams["default"].api_key.get_secret_value() == "sk-up"
    assert s.upstreams["default"].model == "llama-3"
    assert s.store.url == "redis://redis:6379/2"
    assert s.admin.token.get_secret_value() == "adm"
    assert (s.server.host, s.server.port, s.logging.level) == ("127.0.0.1", 9999, "debug")
    assert s.server.max_body_bytes == 2048
    assert s.units["metering"] == {"on_low_balance": "clamp"}
    assert "sovereign-alpha" in s.models


def test_env_wins_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"server": {"port": 1234}, "store": {"url": "redis://a:1/0"}}))
    s = load_settings(path, env={"SOVEREIGN_PORT": "4321"})
    assert s.server.port == 4321 and s.store.url == "redis://a:1/0"


@pytest.mark.parametrize(
    "data, path",
    [
        ({"server": {"port": "eighty"}}, "server.port"),
        ({"models": {"m": {"upstream": "default"}}}, "models.m"),
        ({"models": {"m": {"free": True, "upstream": "nope"}}}, "models.m.upstream"),
        ({"models": {"m": {"free": True, "price": {"input_per_million": -1}}}}, "models.m.price.input_per_million"),
        ({"upstreams": {"default": {"url": "ftp://x"}}}, "upstreams.default.url"),
        ({"pipeline": ["auth", "auth"]}, "pipeline"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_settings_name_the_field(tmp_path, data, path):
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_settings(file, env={})
    assert path in str(info.value)


def test_masked_dump_hides_every_secret():
    s = load_settings(env={"SOVEREIGN_UPSTREAM_API_KEY": "sk-very-secret", "SOVEREIGN_ADMIN_TOKEN": "adm-secret"})
    text = repr(s.masked())
    assert "sk-very-secret" not in text and "adm-secret" not in text
    assert s.masked()["admin"]["token"] == "********"


@pytest.mark.parametrize("with_file", [True, False], ids=["shipped file", "no file"])
def test_an_env_name_changes_the_configured_model_it_spells(tmp_path, monkeypatch, with_file):
    """`SOVEREIGN_MODELS__SOVEREIGN_ALPHA__…` is `models.sovereign-alpha`, not a new `sovereign_alpha` beside it."""
    if not with_file:
        monkeypatch.setattr("proxy.core.settings.SHIPPED_CONFIG", tmp_path / "not-shipped.yaml")
    s = load_settings(env={"SOVEREIGN_MODELS__SOVEREIGN_ALPHA__PRICE__INPUT_PER_MILLION": "100"})
    assert set(s.models) == {"sovereign-alpha"}
    price = s.models["sovereign-alpha"].price
    assert (price.input_per_million, price.output_per_million) == (100, 1500)  # the rest of the price is kept
    assert s.models["sovereign-alpha"].upstream == "default"


def test_env_names_match_dots_and_capitals_and_new_names_stay_new(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": {
        "GPT-4.1": {"upstream": "default", "price": {"input_per_million": 1, "output_per_million": 2}},
    }}))
    s = load_settings(path, env={
        "SOVEREIGN_MODELS__GPT_4_1__PRICE__OUTPUT_PER_MILLION": "7",
        "SOVEREIGN_MODELS__FRESH__FREE": "true",
    })
    assert set(s.models) == {"GPT-4.1", "fresh"}
    assert s.models["GPT-4.1"].price.output_per_million == 7 and s.models["fresh"].free


def test_an_env_name_that_spells_two_configured_names_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": {
        "a-b": {"free": True, "upstream": "default"},
        "a.b": {"free": True, "upstream": "default"},
    }}))
    with pytest.raises(ConfigError, match=r"SOVEREIGN_MODELS__A_B matches both models\.a-b and models\.a\.b"):
        load_settings(path, env={"SOVEREIGN_MODELS__A_B__FREE": "false"})
