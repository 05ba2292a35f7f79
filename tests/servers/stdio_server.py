"""A light stdlib-only MCP server over stdio, and the ways stdio servers go wrong.

Run as ``python -S tests/servers/stdio_server.py [MODE] [N]`` (about 20–30 ms to answer, so
fifty of them start at once on a small machine). Modes:

- ``light`` (default): tools ``echo``, ``add``, ``progress`` (sends N progress notifications for
  the call's progressToken), ``ask`` (sends a server request and waits for its answer),
  ``changed`` (sends tools/list_changed), ``batch`` (answers in a JSON-RPC batch), ``env``
  (the server's environment and cwd as JSON); answers ``ping``; exits at the end of stdin.
- ``exit-after N``: answers N tools/call, then exits with code 3 in the middle of the next one.
- ``exit-at-start``: says ``fatal: cannot open the database`` on stderr and exits with code 2.
- ``garbage``: handshakes normally, then answers tools/call with a line that is not JSON.
- ``no-initialize``: reads everything and answers nothing.
- ``ignore-sigterm``: serves normally, says so on stderr when it gets SIGTERM and carries on, and
  ignores the end of stdin; only SIGKILL ends it.
- ``flood-stderr N``: writes N MiB to stderr (default 4) before answering initialize, and 1 MiB
  before each tools/call answer: a hub that does not drain stderr deadlocks on it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

TOOLS = [
    {"name": name, "description": description, "inputSchema": {"type": "object"}}
    for name, description in (
        ("echo", "Return the text unchanged."),
        ("add", "Add two integers."),
        ("progress", "Report `steps` progress notifications, then finish."),
        ("ask", "Send a server request (ping) and answer with what came back."),
        ("changed", "Announce tools/list_changed."),
        ("env", "The environment and cwd this server runs with."),
        ("batch", "Answer inside a JSON-RPC batch, after a log notification."),
    )
]


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def text(value: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": value}], "isError": False}


class Server:
    def __init__(self, mode: str, n: int) -> None:
        self.mode = mode
        self.n = n
        self.calls = 0
        self.lines = iter(sys.stdin.readline, "")

    def run(self) -> None:
        if self.mode == "exit-at-start":
            sys.stderr.write("starting\nfatal: cannot open the database\n")
            sys.exit(2)
        if self.mode == "ignore-sigterm":
            signal.signal(signal.SIGTERM, lambda *_: sys.stderr.write("got SIGTERM, ignoring it\n"))
        for line in self.lines:
            if not line.strip():
                continue
            message = json.loads(line)
            if self.mode == "no-initialize" or "method" not in message:
                continue
            self.handle(message)
        if self.mode == "ignore-sigterm":
            while True:
                time.sleep(60)

    def handle(self, message: dict[str, Any]) -> None:
        method, request_id = message["method"], message.get("id")
        if request_id is None:
            return  # notifications: initialized, cancelled
        params = message.get("params") or {}
        if method == "initialize":
            if self.mode == "flood-stderr":
                self.flood(self.n or 4)
            result: dict[str, Any] = {
                "protocolVersion": params.get("protocolVersion", "2025-06-18"),
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "stdio-test-server", "version": "0.1"},
            }
        elif method == "ping":
            result = {}
        elif method == "tools/list":
            result = {"tools": TOOLS}
        elif method == "tools/call":
            self.calls += 1
            if self.mode == "exit-after" and self.calls > self.n:
                sys.stderr.write(f"exiting after {self.n} calls\n")
                sys.stderr.flush()
                os._exit(3)
            if self.mode == "garbage":
                sys.stdout.write("Traceback (most recent call last): this is not JSON\n")
                sys.stdout.flush()
                return
            if self.mode == "flood-stderr":
                self.flood(1)
            if params.get("name") == "batch":
                note = {
                    "jsonrpc": "2.0",
                    "method": "notifications/message",
                    "params": {"level": "info", "data": "b"},
                }
                answer = {"jsonrpc": "2.0", "id": request_id, "result": text("batched")}
                sys.stdout.write(json.dumps([note, answer]) + "\n")
                sys.stdout.flush()
                return
            result = self.call(params.get("name"), params.get("arguments") or {}, params)
        else:
            send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": f"no {method}"}})
            return
        send({"jsonrpc": "2.0", "id": request_id, "result": result})

    def call(self, name: str, arguments: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        if name == "echo":
            return text(str(arguments.get("text", "")))
        if name == "add":
            return text(str(int(arguments["a"]) + int(arguments["b"])))
        if name == "progress":
            token = (params.get("_meta") or {}).get("progressToken")
            steps = int(arguments.get("steps", 3))
            for step in range(1, steps + 1):
                if token is not None:
                    progress = {"progressToken": token, "progress": step, "total": steps}
                    send({"jsonrpc": "2.0", "method": "notifications/progress", "params": progress})
            return text(f"done after {steps} steps")
        if name == "ask":
            send({"jsonrpc": "2.0", "id": "server-1", "method": "ping"})
            for line in self.lines:  # the answer comes before anything else we care about
                answer = json.loads(line)
                if answer.get("id") == "server-1":
                    return text(json.dumps(answer))
            return text("no answer")
        if name == "changed":
            send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
            return text("changed")
        if name == "env":
            return text(json.dumps({"env": dict(os.environ), "cwd": os.getcwd()}))
        return {"content": [{"type": "text", "text": f"unknown tool {name}"}], "isError": True}

    @staticmethod
    def flood(mib: int) -> None:
        line = "x" * 1023 + "\n"
        for i in range(mib * 1024):
            sys.stderr.write(line if i % 1024 else f"flood line {i}\n")
        sys.stderr.write("flood done\n")
        sys.stderr.flush()


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "light"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    try:
        Server(mode, n).run()
    except (BrokenPipeError, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()
