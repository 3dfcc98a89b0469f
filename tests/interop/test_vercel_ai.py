"""The Vercel AI SDK (`ai` + `@ai-sdk/openai`, Node) through Sovereign: a tool loop on the
Responses API with `store: true`, as `generateText` and as `streamText`.

This is the client of issue 15's first two findings: on its second step it sends
`item_reference` items for the earlier reasoning, and it reads reasoning only
from summary parts. Node packages are not part of the Python dev extra, so the
test runs when `node` is on PATH and the pinned packages are installed
(`npm install --prefix tests/interop/vercel`); otherwise it is skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "vercel"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (HERE / "node_modules" / "@ai-sdk" / "openai").is_dir(),
    reason="needs node and `npm install --prefix tests/interop/vercel`",
)


async def test_generate_and_stream_tool_loops(interop):
    proc = await asyncio.create_subprocess_exec(
        "node", str(HERE / "agent.mjs"), cwd=HERE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SOVEREIGN_V1": interop.v1, "SOVEREIGN_KEY": interop.key})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-3000:]
    loops = [json.loads(line) for line in out.decode().splitlines()]
    assert [loop["loop"] for loop in loops] == ["generateText", "streamText"]
    for loop in loops:
        assert loop["text"] == "Done: get_weather returned sunny in value " and loop["calls"] == 1
        # The provider's reasoning reached the SDK (both steps reason "think think ").
        assert "".join(loop["reasoning"]) == "think think " * 2
        first, second = loop["inputs"]
        # Step two refers to the stored reasoning item instead of resending it.
        references = [item for item in second if item.get("type") == "item_reference"]
        assert references and all(item["id"].startswith("rs_") for item in references)
        assert [item.get("type") for item in second][-1] == "function_call_output"
