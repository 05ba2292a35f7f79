"""An attached `serve --http`: the public HTTP endpoint of a process that does not own the log.

It checks what the owner's public endpoint would (Host, Origin, media types, limits) and passes
each request to the owner's private endpoint, streaming the answer back untouched; the owner
holds the sessions. When the owner goes, the relay follows whoever owns the log next (this
process, if it takes over): clients then get 404 for their old session and re-initialize, as
the spec asks of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

import aiohttp
from aiohttp import web

from fsm_hub.mcp import jsonrpc
from fsm_hub.mcp.jsonrpc import INVALID_REQUEST, error_response
from fsm_hub.mcp.protocol import JSON, SESSION_HEADER, SSE, VERSION_HEADER, instance_url
from fsm_hub.serve.ownership import Owner
from fsm_hub.transports.connections import ConnectionGuard
from fsm_hub.transports.http import RELAYED_HEADER, HttpLimits, mcp_url, origin_refusal, start_guarded

log = logging.getLogger(__name__)

_PASSED_ON: Final = ("Content-Type", "Accept", SESSION_HEADER, VERSION_HEADER, "Last-Event-ID")
_PASSED_BACK: Final = ("Content-Type", SESSION_HEADER, "Retry-After", "Cache-Control")


class HttpRelay:
    """Serves `/mcp` at `host:port` by relaying to the current owner's private endpoint."""

    def __init__(
        self,
        host: str,
        port: int,
        owner: Callable[[], Owner | None],
        *,
        limits: HttpLimits | None = None,
        call_timeout: float = 300.0,
    ) -> None:
        self.host = host
        self.port = port
        self.limits = limits or HttpLimits()
        self.call_timeout = call_timeout
        self._owner = owner
        """Reads the advertised owner (it changes when one takes over)."""
        self.connections = ConnectionGuard(
            self.limits.max_connections, self.limits.head_timeout, self.limits.idle_timeout
        )
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        owner = self._owner()
        return f"<HttpRelay {self.url} → {owner.url if owner else None} {self.connections!r}>"

    @property
    def url(self) -> str:
        return mcp_url(self.host, self.port)

    async def start(self) -> str:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2), auto_decompress=False
        )
        app = web.Application(client_max_size=self.limits.max_body)
        app.router.add_route("*", "/mcp", self._relay)
        app.router.add_route("*", "/instances/{ref}/mcp", self._relay)  # per-instance endpoints
        self._runner, self.port = await start_guarded(app, self.host, self.port, self.connections)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        refused = origin_refusal(request, self.host, None)
        if refused is not None:
            return refused
        if request.method not in ("POST", "GET", "DELETE"):
            return web.Response(status=405, headers={"Allow": "GET, POST, DELETE"})
        guarded = self.connections.of(request.transport)
        if guarded is not None:
            guarded.busy()
        try:
            body = b""
            if request.method == "POST":
                try:
                    async with asyncio.timeout(self.limits.body_timeout):
                        body = await request.read()
                except TimeoutError:
                    return _error("Request Timeout: body too slow", 408)
                except web.HTTPRequestEntityTooLarge:
                    return _error(f"Invalid Request: body exceeds {self.limits.max_body} bytes", 413)
            return await self._pass_on(request, body)
        finally:
            if guarded is not None:
                guarded.idle()

    async def _pass_on(self, request: web.Request, body: bytes) -> web.StreamResponse:
        """Send to the owner (a second owner once, if the first is gone) and stream its answer back."""
        assert self._http is not None
        tried: Owner | None = None
        for _ in range(2):
            owner = self._owner()
            if owner is None or owner == tried:
                break
            tried = owner
            headers = {name: request.headers[name] for name in _PASSED_ON if name in request.headers}
            headers["Authorization"] = f"Bearer {owner.token}"
            headers[RELAYED_HEADER] = "1"
            try:
                ref = request.match_info.get("ref")
                url = owner.url if ref is None else instance_url(owner.url, ref)
                upstream = await self._http.request(request.method, url, data=body, headers=headers)
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.2)  # a takeover advertises within moments
                continue
            try:
                return await _stream_back(request, upstream, self.call_timeout)
            finally:
                upstream.release()
        return _error("fsm-hub: no owning hub is reachable right now", 503, retry=True)


async def _stream_back(
    request: web.Request, upstream: aiohttp.ClientResponse, call_timeout: float
) -> web.StreamResponse:
    headers = {name: upstream.headers[name] for name in _PASSED_BACK if name in upstream.headers}
    if upstream.content_type != SSE:
        try:
            async with asyncio.timeout(call_timeout):
                data = await upstream.read()
        except (TimeoutError, aiohttp.ClientError):
            return _error("fsm-hub: the owning hub did not answer", 504)
        return web.Response(status=upstream.status, body=data, headers=headers)
    response = web.StreamResponse(status=upstream.status, headers=headers)
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    except (aiohttp.ClientError, ConnectionResetError):
        pass  # either side went away: the stream just ends
    await response.write_eof()
    return response


def _error(message: str, status: int, *, retry: bool = False) -> web.Response:
    response = web.Response(
        body=jsonrpc.encode(error_response(None, INVALID_REQUEST, message)), content_type=JSON, status=status
    )
    if retry:
        response.headers["Retry-After"] = "1"
    return response

