"""A light stdlib-only MCP server over stdio, and the ways stdio servers go wrong.

Run as ``python -S tests/servers/stdio_server.py [MODE] [N]`` (about 20–30 ms to answer, so
fifty of them start at once on a small machine). Modes:

- ``light`` (default): tools ``echo``, ``add``, ``progress`` (sends N progress notifications for
  the call's progressToken), ``ask`` (sends a server request and waits for its answer),
  ``changed`` (sends tools/list_changed), ``batch`` (answers in a JSON-RPC batch), ``env``
  (the server's environment and cwd as JSON); answers ``ping``; exits at the end of stdin.
  Session state like a real server's: ``resources/subscribe`` / ``unsubscribe`` (a URI starting
  ``bad:`` is refused with -32602) and ``logging/setLevel`` (an unknown level: -32602); tools
  ``touch`` (``resources/updated`` for each of ``uris`` this session subscribed to), ``log``
  (``notifications/message`` at ``level`` unless below the level set), ``mark`` (a
  ``prompts/list_changed`` carrying ``_meta.mark``: a barrier for tests), ``flood`` (``n``
  ``resources/list_changed``) and ``state`` (subscriptions, level, and every subscribe,
  unsubscribe and setLevel received, as JSON).
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
        ("touch", "Send resources/updated for each subscribed URI of `uris`."),
        ("log", "Send notifications/message at `level` with `data`, unless below the level set."),
        ("mark", "Send prompts/list_changed with _meta.mark = `mark`."),
        ("flood", "Send `n` resources/list_changed."),
        ("state", "Subscriptions, log level and the session requests received, as JSON."),
    )
]


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


def notify(method: str, params: dict[str, Any] | None = None) -> None:
    send({"jsonrpc": "2.0", "method": method, **({"params": params} if params is not None else {})})


def text(value: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": value}], "isError": False}


class Server:
    def __init__(self, mode: str, n: int) -> None:
        self.mode = mode
        self.n = n
        self.calls = 0
        self.subscribed: set[str] = set()
        self.level: str | None = None
        self.received: list[list[str]] = []
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
                "capabilities": {
                    "tools": {"listChanged": True},
                    "resources": {"subscribe": True, "listChanged": True},
                    "logging": {},
                },
                "serverInfo": {"name": "stdio-test-server", "version": "0.1"},
            }
        elif method == "ping":
            result = {}
        elif method == "tools/list":
            result = {"tools": TOOLS}
        elif method in ("resources/subscribe", "resources/unsubscribe", "logging/setLevel"):
            error = self.session_state(method, params)
            if error is not None:
                send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32602, "message": error}})
                return
            result = {}
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

    def session_state(self, method: str, params: dict[str, Any]) -> str | None:
        """Apply a subscribe, unsubscribe or setLevel; the error message if it is refused."""
        value = str(params.get("level") if method == "logging/setLevel" else params.get("uri"))
        self.received.append([method, value])
        if method == "logging/setLevel":
            if value not in LEVELS:
                return f"unknown level {value}"
            self.level = value
        elif value.startswith("bad:"):
            return f"cannot subscribe to {value}"
        elif method == "resources/subscribe":
            self.subscribed.add(value)
        else:
            self.subscribed.discard(value)
        return None

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
        if name == "touch":
            for uri in arguments.get("uris", []):
                if uri in self.subscribed:
                    notify("notifications/resources/updated", {"uri": uri})
            return text("touched")
        if name == "log":
            level = str(arguments.get("level", "info"))
            if self.level is None or LEVELS.index(level) >= LEVELS.index(self.level):
                notify("notifications/message", {"level": level, "data": arguments.get("data")})
            return text("logged")
        if name == "mark":
            notify("notifications/prompts/list_changed", {"_meta": {"mark": arguments.get("mark")}})
            return text("marked")
        if name == "flood":
            for _ in range(int(arguments.get("n", 1))):
                notify("notifications/resources/list_changed")
            return text("flooded")
        if name == "state":
            state = {"subscribed": sorted(self.subscribed), "level": self.level, "received": self.received}
            return text(json.dumps(state))
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
