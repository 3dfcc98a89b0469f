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


def _block(readme: str, after: str, language: str) -> str:
    """The first ```language fenced block after the line `after`."""
    rest = readme[readme.index(after):]
    start = rest.index(f"```{language}\n") + len(language) + 4
    return rest[start:rest.index("```\n", start)]


async def test_using_it_examples_run_as_printed_against_the_demo(tmp_path):
    """The README's "Using it" shell and Python blocks, pasted against `sovereign demo`: only key and port differ."""
    import asyncio
    import json
    import re
    import subprocess
    import sys

    from tests.support import Process, free_port, wait_http

    readme = (REPO / "README.md").read_text()
    shell = _block(readme, "With the demo running (`make run`), in another shell:", "bash")
    python = _block(readme, "With the official OpenAI SDK, unchanged:", "python")
    port = free_port()
    proc = Process(["demo", "--port", str(port), "--upstream-port", str(free_port())], log_path=tmp_path / "demo.log")
    try:
        await wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        while "Press Ctrl-C" not in proc.output():
            await asyncio.sleep(0.05)
        key = re.search(r"API key\s+(sk-sov-live-\w+)", proc.output()).group(1)

        def pasted(text: str) -> str:
            assert "sk-sov-live-..." in text and "127.0.0.1:8080" in text
            return text.replace("sk-sov-live-...", key).replace("127.0.0.1:8080", f"127.0.0.1:{port}")

        shell_run = await asyncio.to_thread(subprocess.run, ["bash", "-e", "-c", pasted(shell)],
                                            capture_output=True, text=True, timeout=60)
        assert shell_run.returncode == 0 and shell_run.stderr == "", shell_run.stderr  # -s: no progress meters
        decoder = json.JSONDecoder()
        completion, end = decoder.raw_decode(shell_run.stdout)
        assert completion["object"] == "chat.completion"
        streamed, credits = shell_run.stdout[end:].rsplit("data: [DONE]\n\n", 1)
        assert streamed.lstrip().startswith("data: {") and json.loads(credits)["object"] == "credits"

        python_run = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", pasted(python)],
                                             capture_output=True, text=True, timeout=60)
        assert python_run.returncode == 0, python_run.stderr
        assert python_run.stdout.strip()
    finally:
        proc.signal(2)
        assert proc.wait(15) == 0
