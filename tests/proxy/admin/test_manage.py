"""`sovereign tenants …` / `sovereign keys …` as real subprocesses against the real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import REDIS_URL, REPO


@pytest.fixture
def sovereign(redis_prefix):
    env = {**os.environ, "SOVEREIGN_STORE_URL": REDIS_URL, "SOVEREIGN_STORE__PREFIX": redis_prefix}
    env.pop("SOVEREIGN_CONFIG", None)

    def run(*args: str, ok: bool = True, store_url: str | None = None) -> subprocess.CompletedProcess:
        run_env = env if store_url is None else {**env, "SOVEREIGN_STORE_URL": store_url}
        proc = subprocess.run([sys.executable, "-m", "proxy", *args], cwd=REPO, env=run_env, capture_output=True,
                              text=True, timeout=30)
        assert (proc.returncode == 0) == ok, (proc.returncode, proc.stdout, proc.stderr)
        return proc

    return run


def test_tenant_and_key_workflow(sovereign):
    created = json.loads(sovereign("tenants", "create", "acme", "--credits", "1000", "--json").stdout)
    assert (created["id"], created["balance"], created["reserved"]) == ("acme", 1000, 0)
    assert "already exists" in sovereign("tenants", "create", "acme", ok=False).stderr

    first = sovereign("tenants", "topup", "acme", "250", "--idempotency-key", "inv-7")
    assert "added 250" in first.stdout and "1250" in first.stdout
    again = sovereign("tenants", "topup", "acme", "250", "--idempotency-key", "inv-7", "--json")
    assert json.loads(again.stdout)["balance"] == 1250  # applied once
    other = sovereign("tenants", "topup", "acme", "300", "--idempotency-key", "inv-7", ok=False)
    assert "different amount" in other.stderr and "Traceback" not in other.stderr
    auto = sovereign("tenants", "topup", "acme", "5")
    assert "idempotency key: auto-" in auto.stderr

    show = sovereign("tenants", "show", "acme").stdout
    assert [line.split() for line in show.splitlines()][:2] == [["tenant", "acme"], ["balance", "1255"]]
    ledger = json.loads(sovereign("tenants", "ledger", "acme", "--limit", "2", "--json").stdout)
    assert [e["credits"] for e in ledger["data"]] == [5, 250]
    table = sovereign("tenants", "ledger", "acme").stdout.splitlines()
    assert table[0].split() == ["TIME", "TYPE", "CREDITS", "BALANCE", "ENTRY"] and len(table) == 4

    key = json.loads(sovereign("keys", "create", "--tenant", "acme", "--name", "ci", "--models", "sovereign-alpha",
                               "--rpm", "60", "--max-concurrency", "2", "--json").stdout)
    assert key["key"].startswith("sk-sov-live-") and key["models"] == ["sovereign-alpha"] and key["rpm"] == 60
    readable = sovereign("keys", "create", "--tenant", "acme").stdout
    assert readable.splitlines()[0].startswith("sk-sov-live-") and "shown once" in readable

    listed = sovereign("keys", "list", "--tenant", "acme", "--json").stdout
    assert key["key"] not in listed and len(json.loads(listed)["data"]) == 2
    rows = sovereign("keys", "list", "--tenant", "acme").stdout.splitlines()
    assert rows[0].split()[:3] == ["ID", "NAME", "STATUS"] and len(rows) == 3
    assert "sk-sov-live-" not in "\n".join(rows)
    assert rows[0].index("STATUS") == rows[1].index("active")  # aligned columns

    revoked = json.loads(sovereign("keys", "revoke", key["id"], "--json").stdout)
    assert revoked["revoked_at"] is not None
    assert "revoked" in sovereign("keys", "list", "--tenant", "acme").stdout


def test_errors_are_one_clear_line_and_nonzero(sovereign):
    sovereign("tenants", "create", "acme")
    cases = [
        (("tenants", "show", "nobody"), "No such tenant"),
        (("tenants", "create", "bad id!"), "tenant id"),
        (("tenants", "topup", "acme", "0"), "between"),
        (("tenants", "ledger", "acme", "--limit", "0"), "--limit"),
        (("keys", "create", "--tenant", "acme", "--models", "sovereign-alpha,gpt-x"), "models[1]"),
        (("keys", "create", "--tenant", "acme", "--rpm", "0"), "rpm"),
        (("keys", "create", "--tenant", "nobody"), "No such tenant"),
        (("keys", "revoke", "key_nope"), "No such key"),
    ]
    for args, message in cases:
        proc = sovereign(*args, ok=False)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_unreachable_store_and_memory_warning(sovereign):
    down = sovereign("tenants", "show", "acme", ok=False, store_url="redis://127.0.0.1:1")
    assert "cannot reach the store" in down.stderr and "Traceback" not in down.stderr
    memory = sovereign("tenants", "create", "acme", store_url="memory://")
    assert "memory://" in memory.stderr and "lost" in memory.stderr


def test_revoke_help_names_the_real_cache_setting():
    from proxy.core.reference import config_reference

    shown = subprocess.run([sys.executable, "-m", "proxy", "keys", "revoke", "--help"], cwd=REPO, capture_output=True,
                           text=True, timeout=30)
    assert shown.returncode == 0
    help_text = " ".join(shown.stdout.split())  # argparse wraps lines
    assert "within units.auth.cache_seconds" in help_text
    assert "`units.auth.cache_seconds`" in config_reference()  # the setting the help names exists under that path
    # `keys update` (listed by `keys --help`) says the same of the changes it makes.
    listed = subprocess.run([sys.executable, "-m", "proxy", "keys", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=30)
    listed_text = " ".join(listed.stdout.split())
    assert "applies within units.auth.cache_seconds" in listed_text and " auth.cache_seconds" not in listed_text


def test_budgets_and_thresholds_from_the_shell(sovereign):
    tenant = json.loads(sovereign("tenants", "create", "acme", "--low-balance-threshold", "100", "--json").stdout)
    assert tenant["low_balance_threshold"] == 100
    cleared = json.loads(sovereign("tenants", "update", "acme", "--clear-low-balance-threshold", "--json").stdout)
    assert cleared["low_balance_threshold"] is None

    key = json.loads(sovereign("keys", "create", "--tenant", "acme", "--budget", "1000", "--budget-period", "day", "--json").stdout)
    assert key["budget"] == {"credits": 1000, "period": "day"}
    updated = json.loads(sovereign("keys", "update", key["id"], "--budget", "50", "--rpm", "10", "--name", "ci", "--json").stdout)
    assert updated["budget"] == {"credits": 50, "period": "day", "spent": 0, "held": 0}  # a new amount keeps the period
    assert (updated["rpm"], updated["name"]) == (10, "ci")
    assert "0/50 per day" in sovereign("keys", "list", "--tenant", "acme").stdout
    lifetime = json.loads(sovereign("keys", "update", key["id"], "--budget", "50", "--budget-period", "total", "--json").stdout)
    assert lifetime["budget"]["period"] == "total"
    rows = sovereign("keys", "list", "--tenant", "acme").stdout
    assert "0/50 total" in rows
    cleared_key = json.loads(sovereign("keys", "update", key["id"], "--clear-budget", "--rpm", "0", "--json").stdout)
    assert cleared_key["budget"] is None and cleared_key["rpm"] is None
    assert "budget.credits" in sovereign("keys", "update", key["id"], "--budget", "-5", ok=False).stderr
    assert "No such key" in sovereign("keys", "update", "key_nope", "--name", "x", ok=False).stderr


def test_a_store_that_refuses_the_credentials_is_one_line_not_a_traceback(sovereign):
    # The shared test Redis has no password: AUTH is refused (a ResponseError, not a connection error).
    url = REDIS_URL.replace("redis://", "redis://:wrong-password@", 1)
    failed = sovereign("tenants", "show", "acme", ok=False, store_url=url)
    assert "Traceback" not in failed.stderr and "wrong-password" not in failed.stderr
    assert failed.stderr.startswith("sovereign: cannot use the store at redis://:***@"), failed.stderr


def test_an_expiry_in_milliseconds_is_refused_before_any_key_is_made(sovereign):
    sovereign("tenants", "create", "far", "--credits", "10")
    refused = sovereign("keys", "create", "--tenant", "far", "--expires-at", "1800000000000", ok=False)
    assert "expires_at" in refused.stderr and "Traceback" not in refused.stderr
    assert json.loads(sovereign("keys", "list", "--tenant", "far", "--json").stdout)["data"] == []


def test_updates_that_would_silently_do_the_wrong_thing_are_refused(sovereign):
    sovereign("tenants", "create", "quiet", "--credits", "10", "--low-balance-threshold", "200")
    # No flag used to clear the threshold (the text output never showed it).
    assert "one of the arguments" in sovereign("tenants", "update", "quiet", ok=False).stderr
    shown = sovereign("tenants", "show", "quiet").stdout
    assert "low-balance threshold" in shown and "200" in shown
    key = json.loads(sovereign("keys", "create", "--tenant", "quiet", "--budget", "100", "--json").stdout)
    refused = sovereign("keys", "update", key["id"], "--budget-period", "day", ok=False)
    assert "--budget-period needs --budget" in refused.stderr
    listed = json.loads(sovereign("keys", "list", "--tenant", "quiet", "--json").stdout)["data"]
    assert listed[0]["budget"]["period"] == "total"  # unchanged


def test_tenants_list_shows_every_tenant(sovereign):
    for tenant in ("list-b", "list-a"):
        sovereign("tenants", "create", tenant, "--credits", "5")
    listed = json.loads(sovereign("tenants", "list", "--json").stdout)["data"]
    assert [t["id"] for t in listed if t["id"].startswith("list-")] == ["list-a", "list-b"]
    text = sovereign("tenants", "list").stdout
    assert text.splitlines()[0].split() == ["ID", "BALANCE", "RESERVED", "AVAILABLE", "CREATED"] and "list-a" in text
