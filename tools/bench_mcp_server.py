"""A minimal, fast MCP server for benchmarks: one process listening on many loopback ports.

Plain JSON answers to initialize, tools/list, ping and tools/call; 202 for notifications; 405 for
the GET stream; 200 for DELETE. Any session id is accepted. Once listening it prints one JSON
line, ``{"pid": …, "ports": […]}``. Commands on stdin, one a line:

    pause PORT…    keep accepting and reading on these ports, never answer (the process lives)
    resume PORT…   answer again

    python tools/bench_mcp_server.py --ports 250
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
from typing import Any

from aiohttp import web

TOOLS = {"tools": [{"name": f"tool_{n}", "inputSchema": {"type": "object"}} for n in range(10)]}
JSON = "application/json"


class Server:
    def __init__(self) -> None:
        self.paused: set[int] = set()
        self.never = asyncio.Event()
        self.sessions = itertools.count(1)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        port = request.transport.get_extra_info("sockname")[1] if request.transport else 0
        if port in self.paused:
            await self.never.wait()
        if request.method == "GET":
            return web.Response(status=405, headers={"Allow": "POST, DELETE"})
        if request.method == "DELETE":
            return web.Response(status=200)
        message = json.loads(await request.read())
        if "id" not in message:
            return web.Response(status=202)
        method, headers = message.get("method"), {}
        answer: dict[str, Any] = {"jsonrpc": "2.0", "id": message["id"]}
        if method == "initialize":
            answer["result"] = {
                "protocolVersion": message["params"]["protocolVersion"],
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "bench", "version": "1"},
            }
            headers["Mcp-Session-Id"] = f"{port}-{next(self.sessions)}"
        elif method == "ping":
            answer["result"] = {}
        elif method == "tools/list":
            answer["result"] = TOOLS
        elif method == "tools/call":
            answer["result"] = {"content": [{"type": "text", "text": "ok"}], "isError": False}
        else:
            answer["error"] = {"code": -32601, "message": "Method not found"}
        return web.Response(body=json.dumps(answer).encode(), content_type=JSON, headers=headers)

    async def commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            verb, *ports = line.decode().split()
            chosen = {int(p) for p in ports}
            if verb == "pause":
                self.paused |= chosen
            elif verb == "resume":
                self.paused -= chosen
            print(json.dumps({"ok": verb, "ports": sorted(chosen)}), flush=True)


async def serve(count: int) -> None:
    server = Server()
    app = web.Application()
    app.router.add_route("*", "/mcp", server.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    for _ in range(count):
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=64).start()
    ports = [address[1] for address in runner.addresses]
    print(json.dumps({"pid": os.getpid(), "ports": ports}), flush=True)
    await server.commands()  # stdin closed: the benchmark is over
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ports", type=int, default=250)
    asyncio.run(serve(parser.parse_args().ports))


if __name__ == "__main__":
    main()
