"""An MCP server (Streamable HTTP, aiohttp, in-process) that asks its client things.

Its tool `ask` sends `sampling/createMessage` on the call's SSE stream and answers with
whatever the client sent back (result or error); `whoami` names the session; `announce` sends
`prompts/list_changed` and `resources/list_changed` on the session's GET stream, which ends
after each event it carries (so the client must reopen it, with `Last-Event-ID`). It records every
session: the capabilities and clientInfo it was initialized with, and whether it was DELETEd.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class AskedSession:
    capabilities: dict[str, Any]
    client_info: dict[str, Any]
    deleted: bool = False
    answers: dict[Any, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    outbox: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    last_event_ids: list[str | None] = field(default_factory=list)
    """The ``Last-Event-ID`` of each GET stream the client opened."""


class AskingMcp:
    def __init__(self) -> None:
        self.sessions: dict[str, AskedSession] = {}
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self._stopping = asyncio.Event()

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/mcp", self._post)
        app.router.add_delete("/mcp", self._delete)
        app.router.add_get("/mcp", self._get)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/mcp"
        return self.url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def live(self) -> list[AskedSession]:
        return [s for s in self.sessions.values() if not s.deleted]

    async def _get(self, request: web.Request) -> web.StreamResponse:
        session = self.sessions.get(request.headers.get("Mcp-Session-Id", ""))
        if session is None or session.deleted:
            return web.Response(status=404)
        session.last_event_ids.append(request.headers.get("Last-Event-ID"))
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        getter = asyncio.ensure_future(session.outbox.get())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait((getter, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not getter.done():
            getter.cancel()
            return stream
        message = getter.result()
        await stream.write(f"id: e{next(self._ids)}\ndata: {json.dumps(message)}\n\n".encode())
        await stream.write_eof()  # one event per stream: the client has to come back
        return stream

    async def _delete(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.headers.get("Mcp-Session-Id", ""))
        if session is not None:
            session.deleted = True
        return web.Response(status=200)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        message = json.loads(await request.read())
        method = message.get("method")
        if method == "initialize":
            session_id = f"s{next(self._ids)}"
            params = message["params"]
            self.sessions[session_id] = AskedSession(
                params.get("capabilities", {}), params.get("clientInfo", {})
            )
            result = {
                "protocolVersion": params["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "asking", "version": "1"},
                "instructions": "ask me",
            }
            return _json(message["id"], result, {"Mcp-Session-Id": session_id})
        session = self.sessions.get(request.headers.get("Mcp-Session-Id", ""))
        if session is None or session.deleted:
            return web.Response(status=404)
        if "method" not in message:  # the client's answer to our question
            future = session.answers.pop(message.get("id"), None)
            if future is not None and not future.done():
                future.set_result(message)
            return web.Response(status=202)
        if "id" not in message:
            return web.Response(status=202)
        if method == "tools/list":
            tools = [{"name": n, "inputSchema": {"type": "object"}} for n in ("ask", "whoami", "announce")]
            return _json(message["id"], {"tools": tools})
        if method == "ping":
            return _json(message["id"], {})
        if method == "tools/call" and message["params"]["name"] == "whoami":
            sid = request.headers["Mcp-Session-Id"]
            return _json(message["id"], {"content": [{"type": "text", "text": sid}]})
        if method == "tools/call" and message["params"]["name"] == "announce":
            for kind in ("prompts", "resources"):
                session.outbox.put_nowait({"jsonrpc": "2.0", "method": f"notifications/{kind}/list_changed"})
            return _json(message["id"], {"content": [{"type": "text", "text": "announced"}]})
        if method == "tools/call" and message["params"]["name"] == "ask":
            return await self._ask(request, session, message)
        return _json(message["id"], None, error={"code": -32601, "message": f"no {method}"})

    async def _ask(
        self, request: web.Request, session: AskedSession, message: dict[str, Any]
    ) -> web.StreamResponse:
        question_id = 900 + next(self._ids)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        session.answers[question_id] = answer
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        question = {
            "jsonrpc": "2.0",
            "id": question_id,
            "method": "sampling/createMessage",
            "params": {
                "messages": [{"role": "user", "content": {"type": "text", "text": "2+2?"}}],
                "maxTokens": 5,
            },
        }
        await stream.write(f"data: {json.dumps(question)}\n\n".encode())
        reply = await asyncio.wait_for(answer, 10)
        text = json.dumps({"id": reply.get("id"), "result": reply.get("result"), "error": reply.get("error")})
        result = {
            "jsonrpc": "2.0",
            "id": message["id"],
            "result": {"content": [{"type": "text", "text": text}]},
        }
        await stream.write(f"data: {json.dumps(result)}\n\n".encode())
        await stream.write_eof()
        return stream


def _json(
    request_id: Any,
    result: Any,
    headers: dict[str, str] | None = None,
    *,
    error: dict[str, Any] | None = None,
) -> web.Response:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
    if error is not None:
        body["error"] = error
    else:
        body["result"] = result
    return web.Response(text=json.dumps(body), content_type="application/json", headers=headers)
