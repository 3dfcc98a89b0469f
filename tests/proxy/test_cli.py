"""The `sovereign` command as a user runs it: real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time

import openai
import pytest
import yaml

from tests.support import REPO, Process, free_port, wait_http

UPSTREAM_KEY = "sk-upstream-very-secret-0123456789"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_prints_the_effective_config_with_secrets_masked():
    result = run_cli(
        "check-config",
        env={"SOVEREIGN_UPSTREAM_API_KEY": UPSTREAM_KEY, "SOVEREIGN_ADMIN_TOKEN": "admin-secret-1", "SOVEREIGN_PORT": "9090"},
    )
    assert result.returncode == 0, result.stderr
    assert UPSTREAM_KEY not in result.stdout and "admin-secret-1" not in result.stdout
    config = yaml.safe_load(result.stdout)
    assert config["server"]["port"] == 9090
    assert config["upstreams"]["default"]["api_key"] == "********"
    assert "sovereign-alpha" in config["models"]


def test_check_config_masks_url_passwords_and_the_webhook_path():
    """The Redis password and a chat-tool webhook's token (in its path) used to be printed in clear."""
    result = run_cli("check-config", env={
        "SOVEREIGN_STORE_URL": "redis://default:hunter2-redis-pass@10.0.0.5:6379/0",
        "SOVEREIGN_WEBHOOKS__URL": "https://hooks.example.com/services/T000/B000/XXXXsecretXXXX?token=abc",
        "SOVEREIGN_WEBHOOKS__SECRET": "whsec-0123456789",
    })
    assert result.returncode == 0, result.stderr
    for secret in ("hunter2-redis-pass", "XXXXsecretXXXX", "token=abc", "whsec-0123456789"):
        assert secret not in result.stdout
    config = yaml.safe_load(result.stdout)
    assert config["store"]["url"] == "redis://default:***@10.0.0.5:6379/0"
    assert config["webhooks"]["url"] == "https://hooks.example.com/********"


@pytest.mark.parametrize("webhooks, field", [
    ({"SOVEREIGN_WEBHOOKS__URL": "https://hooks.example.com/in"}, "webhooks.secret is required"),
    ({"SOVEREIGN_WEBHOOKS__URL": "not a url", "SOVEREIGN_WEBHOOKS__SECRET": "s"}, "webhooks.url: must be an http"),
], ids=["unsigned", "not_a_url"])
def test_webhooks_need_a_secret_and_an_http_url(webhooks, field):
    """Without a secret every event was signed with an empty key: anyone could forge one."""
    result = run_cli("check-config", env=webhooks)
    assert result.returncode == 2 and field in result.stderr, result.stderr


def test_invalid_config_exits_non_zero_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  m:\n    upstream: default\n    price: {output_per_million: lots}\n")
    result = run_cli("check-config", "--config", str(bad))
    assert result.returncode == 2
    assert "models.m.price.output_per_million" in result.stderr
    result = run_cli("check-config", env={"SOVEREIGN_UNITS__METERING__ON_LOW_BALANCE": "maybe"})
    assert result.returncode == 2
    assert "units.metering.on_low_balance" in result.stderr


async def test_serve_runs_from_env_alone_and_logs_one_line_per_request(mock, tmp_path):
    port = free_port()
    env = {
        "SOVEREIGN_CONFIG": "",
        "SOVEREIGN_UPSTREAM_URL": mock.url,
        "SOVEREIGN_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "SOVEREIGN_UPSTREAM_MODEL": "mock-model",
        "SOVEREIGN_STORE_URL": "memory://",
        "SOVEREIGN_HOST": "127.0.0.1",
        "SOVEREIGN_PORT": str(port),
        "SOVEREIGN_LOG_LEVEL": "info",
        # The open pipeline: no keys needed for this test of the process itself.
        "SOVEREIGN_PIPELINE": "[]",
    }
    proc = Process(["serve"], env=env, log_path=tmp_path / "serve.log")
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http(base + "/healthz", proc=proc)
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="sk-anything", max_retries=0)
        secret_prompt = "my-private-prompt-text-42"
        raw = await client.chat.completions.with_raw_response.create(
            model="sovereign-alpha", messages=[{"role": "user", "content": secret_prompt}],
            extra_headers={"X-Request-ID": "log-check-1", "x-mock-echo-auth": "1"},
        )
        assert raw.headers["X-Request-ID"] == "log-check-1"
        assert UPSTREAM_KEY not in raw.text
        await client.close()
        await asyncio.sleep(0.3)
    finally:
        proc.signal(15)
        assert proc.wait(15) == 0
    output = proc.output()
    assert secret_prompt not in output and UPSTREAM_KEY not in output
    assert "memory://" in output  # the non-durable store is announced
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("event") == "request" and line.get("request_id") == "log-check-1"]
    assert len(requests) == 1
    line = requests[0]
    assert line["status"] == 200 and line["model"] == "sovereign-alpha" and line["upstream"] == "default"
    assert line["input_tokens"] is None or isinstance(line["input_tokens"], int)
    for field in ("tenant", "key_id", "duration_ms", "upstream_latency_ms", "credits"):
        assert field in line


async def test_demo_prints_a_working_key_and_curl_line(tmp_path):
    port, upstream_port = free_port(), free_port()
    proc = Process(["demo", "--port", str(port), "--upstream-port", str(upstream_port)], log_path=tmp_path / "demo.log")
    try:
        await wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        deadline = time.monotonic() + 15
        while "Press Ctrl-C" not in proc.output() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        text = proc.output()
        key = re.search(r"API key\s+(sk-sov-live-\w+)", text).group(1)
        assert f"curl -s http://127.0.0.1:{port}/v1/chat/completions" in text
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        reply = await client.chat.completions.create(model="sovereign-alpha", messages=[{"role": "user", "content": "Hello!"}])
        assert reply.choices[0].message.content
        credits = await client.get("/credits", cast_to=object)
        assert credits["balance"] < 1_000_000  # the demo meters its own traffic
        await client.close()
    finally:
        proc.signal(2)
        assert proc.wait(15) == 0


def _held_port() -> tuple[socket.socket, int]:
    """A port some other program is listening on."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


@pytest.mark.parametrize(
    "command, flag",
    [
        (["demo", "--port", "{busy}", "--upstream-port", "{free}"], "--port"),
        (["demo", "--port", "{free}", "--upstream-port", "{busy}"], "--upstream-port"),
        (["mock-upstream", "--port", "{busy}"], "--port"),
        (["serve"], "server.port in the config or SOVEREIGN_PORT"),
    ],
    ids=["demo", "demo-upstream", "mock-upstream", "serve"],
)
def test_a_busy_port_is_one_line_naming_the_port_and_the_flag(command, flag):
    holder, busy = _held_port()
    with holder:
        args = [part.format(busy=busy, free=free_port()) for part in command]
        env = {"SOVEREIGN_HOST": "127.0.0.1", "SOVEREIGN_PORT": str(busy), "SOVEREIGN_LOG_LEVEL": "warning"}
        result = run_cli(*args, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [
        f"sovereign: cannot listen on 127.0.0.1:{busy}: port {busy} is already in use; choose another with {flag}"
    ]


def test_make_run_passes_ports_and_flags_to_the_demo():
    # Run as a newcomer would: not as a sub-make of `make test` (whose MAKEFLAGS and
    # MAKELEVEL would make this make print "Entering/Leaving directory" lines).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "run", "PORT=8181", "UPSTREAM_PORT=9191", "ARGS=--host 0.0.0.0"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == ".venv/bin/sovereign demo --port 8181 --upstream-port 9191 --host 0.0.0.0"
