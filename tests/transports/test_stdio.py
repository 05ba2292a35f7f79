"""The stdio channel on real pipes: lines in, JSON lines out, an over-long line dropped whole.

It runs in a child process (it owns that process's stdin and stdout), echoing what it reads.
"""

from __future__ import annotations

import json
import subprocess
import sys

ECHO = """
import asyncio
from fsm_hub.transports import stdio

async def main():
    channel = stdio.StdioChannel()
    await channel.open()
    while True:
        try:
            line = await channel.readline()
        except ValueError as exc:
            channel.write({"error": str(exc)})
            continue
        if line is None:
            break
        channel.write({"line": line.decode()})
    channel.write(b'{"raw": true}')
    await channel.drain()

stdio.MAX_LINE = 1024
asyncio.run(main())
"""


def test_lines_in_json_lines_out_and_an_over_long_line_is_one_error() -> None:
    given = b'{"a": 1}\n' + b"x" * 5000 + b"\n" + b'{"b": 2}\n' + b"y" * 3000 + b'{"c": 3}'
    done = subprocess.run([sys.executable, "-c", ECHO], input=given, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(b"\n")
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        {"line": '{"a": 1}\n'},
        {"error": "line too long"},
        {"line": '{"b": 2}\n'},
        {"error": "line too long"},  # the last line, over-long and without its newline
        {"raw": True},
    ]
