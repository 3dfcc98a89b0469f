"""`sovereign demo` as a newcomer meets it: the commands it prints paste into a shell and run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

from tests.support import Process, free_port, wait_http


async def banner_of(proc: Process) -> str:
    deadline = time.monotonic() + 20
    while "Press Ctrl-C" not in proc.output():
        assert time.monotonic() < deadline and proc.proc.poll() is None, proc.output()
        await asyncio.sleep(0.05)
    return proc.output()


async def test_the_printed_commands_run_as_pasted(tmp_path):
    port, upstream_port = free_port(), free_port()
    proc = Process(["demo", "--port", str(port), "--upstream-port", str(upstream_port)], log_path=tmp_path / "demo.log")
    try:
        await wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        text = await banner_of(proc)
        block = text.split("(paste into another shell):\n", 1)[1].split("\nPress Ctrl-C", 1)[0]
        assert "<<'PY'\nfrom openai import OpenAI\n" in block and "\nPY\n" in block  # flush-left, or the heredoc never ends
        # Exactly what a user pastes: the whole block, in a fresh shell, one command after another.
        run = await asyncio.to_thread(
            subprocess.run, ["bash", "-e", "-c", block], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        # curl prints bodies without a newline: two JSON documents, then what the Python snippet printed.
        decoder = json.JSONDecoder()
        completion, end = decoder.raw_decode(run.stdout)
        credits, end = decoder.raw_decode(run.stdout, end)
        python_reply = run.stdout[end:].strip().splitlines()
        assert completion["object"] == "chat.completion" and completion["choices"][0]["message"]["content"]
        assert credits["object"] == "credits" and credits["balance"] < 1_000_000
        # The snippet's own print: the reply text, the same text the simulated provider gave curl.
        assert python_reply == [completion["choices"][0]["message"]["content"].strip()]
    finally:
        proc.signal(2)
        assert proc.wait(15) == 0
