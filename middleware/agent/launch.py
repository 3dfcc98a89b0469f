"""Starts a stdio tool server with exactly the environment its config gives.

The MCP SDK's `stdio_client` merges a few variables of the gateway's own
environment (HOME, PATH, USER, …) into the child's. The gateway instead runs
this script (``python -I launch.py``), which replaces itself with the
configured program and nothing but the configured environment, both read
from ``SOVEREIGN_TOOL_SERVER_SPEC`` (JSON: ``{"argv": […], "env": {…}}``).
It imports nothing of the gateway, so it costs one bare interpreter start.
"""

import json
import os
import sys

SPEC = "SOVEREIGN_TOOL_SERVER_SPEC"

if __name__ == "__main__":
    spec = json.loads(os.environ[SPEC])
    argv = spec["argv"]
    try:
        os.execve(argv[0], argv, spec["env"])
    except OSError as exc:
        sys.stderr.write(f"sovereign: cannot start tool server {argv[0]}: {exc.strerror}\n")
        sys.exit(127)
