"""`sovereign demo`: the whole gateway on one machine with nothing else installed.

Starts the simulated provider and the gateway (embedded store, the shipped
pipeline) in one process, creates a demo tenant with credits and a key, and
prints a ready `curl` line and Python snippet.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import secrets
import shlex
import signal
import sys

from proxy.store.accounts import Accounts
from proxy.web.app import create_app
from proxy.core.gateway import GATEWAY
from proxy.core.logs import configure_logging
from proxy.core.loop import run
from proxy.devtools.mock_upstream import MockOptions, MockUpstream
from proxy.web.server import cannot_listen, listen, runner_for
from proxy.core.settings import load_settings

DEMO_TENANT = "demo"
DEMO_CREDITS = 1_000_000


def banner(base: str, key: str, admin_token: str, upstream: str) -> str:
    """What the demo prints: addresses, the key, and commands that paste and run as printed.

    The commands are flush-left (an indented heredoc terminator never ends the
    heredoc), and the Python snippet runs with this interpreter, the one that
    has `openai` installed by `make run` (the `demo` extra).
    """
    python = shlex.quote(sys.executable)
    needs_openai = "" if importlib.util.find_spec("openai") else f"# first: {python} -m pip install openai\n"
    return f"""
Sovereign demo is running.

  gateway            {base}/v1   (OpenAI-compatible)
  simulated provider {upstream}
  store              memory:// (in this process; lost at exit)
  tenant             {DEMO_TENANT} with {DEMO_CREDITS:,} credits
  API key            {key}
  admin token        {admin_token}

Try it (paste into another shell):

curl -s {base}/v1/chat/completions \\
  -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
  -d '{{"model": "sovereign-alpha", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

curl -s {base}/v1/credits -H "Authorization: Bearer {key}"

{needs_openai}{python} - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{key}")
reply = client.chat.completions.create(model="sovereign-alpha", messages=[{{"role": "user", "content": "Hello!"}}])
print(reply.choices[0].message.content)
PY

Press Ctrl-C to stop.
"""


async def _run(args: argparse.Namespace) -> None:
    mock = MockUpstream(MockOptions(delay_ms=30))
    try:
        upstream_url = await mock.start(args.host, args.upstream_port)
    except OSError as exc:
        await mock.close()
        raise cannot_listen(exc, args.host, args.upstream_port, "choose another with --upstream-port") from None
    admin_token = "sov-admin-" + secrets.token_urlsafe(24)
    settings = load_settings(
        overrides={
            "server": {"host": args.host, "port": args.port},
            "store": {"url": "memory://"},
            "admin": {"token": admin_token},
            "upstreams": {"default": {"url": upstream_url, "model": "mock-model"}},
            "logging": {"access_log": False},
        }
    )
    app = create_app(settings)
    runner = runner_for(app)
    await runner.setup()
    try:
        await listen(runner, args.host, args.port, "choose another with --port")
    except SystemExit:
        await runner.cleanup()
        await mock.close()
        raise
    accounts = Accounts(app[GATEWAY].store)
    await accounts.create_tenant(DEMO_TENANT, DEMO_CREDITS)
    key, _ = await accounts.create_key(DEMO_TENANT, name="demo key")
    print(banner(f"http://{args.host}:{args.port}", key, admin_token, upstream_url), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await mock.close()


def run_demo(args: argparse.Namespace) -> int:
    configure_logging("warning")
    run(_run(args))
    return 0
