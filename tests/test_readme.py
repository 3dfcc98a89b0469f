"""The README's configuration reference is generated from the settings model and must match it."""

from __future__ import annotations

from proxy.core.reference import BEGIN, END, config_reference
from tests.support import REPO


def test_readme_embeds_the_current_configuration_reference():
    readme = (REPO / "README.md").read_text()
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    assert readme[start:end] == config_reference(), "run `sovereign config-reference` and paste it into README.md"


def test_every_setting_appears_in_the_reference():
    reference = config_reference()
    for path in ("server.drain_seconds", "store.url", "units.metering.on_disconnect", "units.sessions.auto_create",
                 "units.auth.cache_seconds", "routing.breaker_cooldown", "models.<MODEL>.price"):
        assert f"`{path}`" in reference
