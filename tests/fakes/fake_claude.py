"""A stand-in for the ``claude`` CLI in headless mode (``-p --output-format json``).

Run as a script. It records what it was given (argv, stdin, cwd, environment
names, its process group) to ``$CLAUDE_FAKE_RECORD`` and answers as
``$CLAUDE_FAKE_MODE`` says:

- ``success`` (default): the documented JSON result, ``result`` from
  ``$CLAUDE_FAKE_RESULT`` (default "Done.");
- ``error``: ``is_error: true`` with subtype ``error_during_execution``;
- ``budget``: subtype ``error_max_budget_usd``;
- ``nojson``: garbage on stdout and exit status 2;
- ``hang``: start a grandchild in the same process group, record both pids, and
  sleep until killed (ignoring SIGTERM when ``$CLAUDE_FAKE_STUBBORN`` is set).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def main() -> int:
    prompt = sys.stdin.read()
    mode = os.environ.get("CLAUDE_FAKE_MODE", "success")
    record = {
        "argv": sys.argv[1:],
        "stdin": prompt,
        "cwd": os.getcwd(),
        "env": sorted(os.environ),
        "api_key": os.environ.get("ANTHROPIC_API_KEY"),
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
    }
    if mode == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        record["child_pid"] = child.pid
        if os.environ.get("CLAUDE_FAKE_STUBBORN"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    path = os.environ.get("CLAUDE_FAKE_RECORD")
    if path:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
    if mode == "hang":
        with open(os.path.join(os.getcwd(), "scratch.txt"), "w", encoding="utf-8") as f:
            f.write("work in progress")
        time.sleep(600)
        return 0
    if mode == "nojson":
        print("Error: something went wrong before any JSON")
        return 2
    subtype = {"error": "error_during_execution", "budget": "error_max_budget_usd"}.get(
        mode, "success"
    )
    result = {
        "type": "result",
        "subtype": subtype,
        "is_error": subtype != "success",
        "duration_ms": 1234,
        "duration_api_ms": 1000,
        "num_turns": 2,
        "result": os.environ.get("CLAUDE_FAKE_RESULT", "Done.")
        if subtype == "success"
        else "it went wrong",
        "stop_reason": "end_turn",
        "session_id": "0e639165-79b1-4bd4-bb0f-4cb4c15115d4",
        "total_cost_usd": 0.012345,
        "usage": {
            "input_tokens": 12,
            "cache_creation_input_tokens": 300,
            "cache_read_input_tokens": 4000,
            "output_tokens": 56,
            "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 100},
        },
        "permission_denials": [],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
