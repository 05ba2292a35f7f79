"""The dashboard at `/` of `serve --http`: instances with live states, history and timeline.

Live means pushed: every committed batch of events reaches each open page over one SSE
stream (`/dashboard/events`), no polling. The page is one self-contained document (inline
script and style under a nonce CSP, nothing fetched from elsewhere); requests pass the same
Host/Origin checks as `/mcp` and must come from this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from fsm_hub.core.display import redact
from fsm_hub.core.events import StoredEvent, utc_now
from fsm_hub.errors import FsmHubError
from fsm_hub.observe import timeline

if TYPE_CHECKING:
    from fsm_hub.supervision.hub import Hub

Refusal = Callable[[web.Request], web.StreamResponse | None]
QUEUE_LIMIT = 1000
"""Batches a slow page may fall behind by before its stream is closed (it reconnects, resynced)."""
KEEPALIVE = 15.0


def _loopback_peer(request: web.Request) -> bool:
    from fsm_hub.transports.http import is_loopback

    return is_loopback(request.remote or "")


class Dashboard:
    def __init__(self, hub: Hub, refusal: Refusal) -> None:
        self.hub = hub
        self._refusal = refusal
        self._streams: set[asyncio.Queue[Sequence[StoredEvent] | None]] = set()
        hub.store.subscribe(self._committed)

    def register(self, app: web.Application) -> None:
        app.router.add_get("/", self._page)
        app.router.add_get("/dashboard/events", self._events)
        app.router.add_get("/dashboard/history", self._history)
        app.router.add_get("/dashboard/timeline", self._timeline)
        app.on_shutdown.append(self._shutdown)

    async def _shutdown(self, app: web.Application) -> None:
        """End every open stream first, so an open page never holds the hub's exit."""
        self.close()

    def close(self) -> None:
        for queue in list(self._streams):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    def _committed(self, events: Sequence[StoredEvent]) -> None:
        for queue in list(self._streams):
            try:
                queue.put_nowait(events)
            except asyncio.QueueFull:  # too far behind: end its stream, the page resyncs
                self._streams.discard(queue)

    def _check(self, request: web.Request) -> web.StreamResponse | None:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        if not _loopback_peer(request):
            return web.Response(status=403, text="the dashboard is served to this machine only")
        return None

    def _snapshot(self) -> dict[str, Any]:
        view = self.hub.view
        listed = sorted(view.instances.values(), key=lambda i: (i.name, i.id))
        instances = [i.to_json() for i in listed]
        snapshot: dict[str, Any] = redact({"instances": instances, "last_seq": view.last_seq})
        return snapshot

    async def _page(self, request: web.Request) -> web.StreamResponse:
        refused = self._check(request)
        if refused is not None:
            return refused
        nonce = secrets.token_urlsafe(16)
        csp = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}';"
            " connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none';"
            " frame-ancestors 'none'"
        )
        return web.Response(
            text=PAGE.replace("{{nonce}}", nonce),
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                     "Cache-Control": "no-store"},
        )

    async def _events(self, request: web.Request) -> web.StreamResponse:
        refused = self._check(request)
        if refused is not None:
            return refused
        queue: asyncio.Queue[Sequence[StoredEvent] | None] = asyncio.Queue(QUEUE_LIMIT)
        self._streams.add(queue)  # before the snapshot: nothing committed after it is missed
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        try:
            await response.prepare(request)
            await _send(response, "snapshot", self._snapshot())
            while True:
                try:
                    batch = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if batch is None or queue not in self._streams:
                    break
                view = self.hub.view
                changed = sorted({e.stream for e in batch} & view.instances.keys())
                await _send(response, "change", redact({
                    "events": [e.to_json() for e in batch],
                    "instances": [view.instances[i].to_json() for i in changed],
                    "last_seq": view.last_seq,
                }))
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self._streams.discard(queue)
        return response

    def _instance(self, request: web.Request) -> str:
        ref = request.query.get("instance", "")
        try:
            return self.hub.resolve(ref)
        except FsmHubError as exc:
            raise web.HTTPNotFound(text=str(exc)) from None

    async def _history(self, request: web.Request) -> web.StreamResponse:
        refused = self._check(request)
        if refused is not None:
            return refused
        events = await self.hub.store.read(stream=self._instance(request), last=200)
        return web.json_response(redact({"events": [e.to_json() for e in events]}))

    async def _timeline(self, request: web.Request) -> web.StreamResponse:
        refused = self._check(request)
        if refused is not None:
            return refused
        events = await self.hub.store.read(stream=self._instance(request))
        lanes = timeline.lanes(events, until=utc_now())
        return web.Response(text=timeline.svg(lanes), content_type="image/svg+xml")


async def _send(response: web.StreamResponse, name: str, payload: dict[str, Any]) -> None:
    data = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    await response.write(f"event: {name}\ndata: {data}\n\n".encode())


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fsm-hub</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style nonce="{{nonce}}">
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #ddd; vertical-align: top; }
tr.instance { cursor: pointer; } tr.instance:hover, tr.selected { background: #f3f3f3; }
.state { font-weight: 600; padding: 1px 6px; border-radius: 4px; color: #fff; }
.state-discovered { background: #5bc0de; } .state-connecting { background: #f0ad4e; }
.state-active { background: #5cb85c; } .state-retrying { background: #b05cc8; }
.state-dead { background: #d9534f; }
#live { font-size: 12px; color: #666; } .error { color: #b00; }
#detail { margin-top: 1.5em; } #timeline { overflow-x: auto; }
</style></head>
<body>
<h1>fsm-hub <span id="live">connecting…</span></h1>
<table><thead><tr><th>name</th><th>id</th><th>state</th><th>since</th><th>port</th>
<th>retries</th><th>last error</th></tr></thead><tbody id="instances"></tbody></table>
<p id="empty" hidden>no instances yet — announce one in the instances directory</p>
<section id="detail" hidden><h2 id="detail-title"></h2><div id="timeline"></div>
<table><thead><tr><th>time</th><th>event</th><th>from → to</th><th>reason</th></tr></thead>
<tbody id="history"></tbody></table></section>
<script nonce="{{nonce}}">
"use strict";
const rows = new Map(); let selected = null;
const $ = (id) => document.getElementById(id);
function cell(tr, text, cls) { const td = document.createElement("td");
  if (cls) { const s = document.createElement("span"); s.className = cls; s.textContent = text;
    td.appendChild(s); } else { td.textContent = text; } tr.appendChild(td); return td; }
function render(i) {
  let tr = rows.get(i.id);
  if (!tr) { tr = document.createElement("tr"); tr.className = "instance"; rows.set(i.id, tr);
    tr.addEventListener("click", () => select(i.id)); }
  tr.replaceChildren(); tr.dataset.id = i.id; tr.dataset.state = i.state;
  cell(tr, i.name); cell(tr, i.id); cell(tr, i.state, "state state-" + i.state);
  cell(tr, i.since.replace("T", " ").slice(0, 19) + "Z"); cell(tr, i.port ?? "");
  cell(tr, String(i.retry_count)); cell(tr, i.last_error ?? "").className = "error";
  tr.classList.toggle("selected", i.id === selected);
}
function order() { const body = $("instances");
  const sorted = [...rows.values()].sort((a, b) =>
    (a.children[0].textContent + a.dataset.id).localeCompare(b.children[0].textContent + b.dataset.id));
  body.replaceChildren(...sorted); $("empty").hidden = rows.size > 0; }
function reason(d) { let r = d.reason || ""; const e = d.error || "";
  if (e && !r.includes(e)) r = r ? r + ": " + e : e; return r; }
async function detail() {
  if (!selected) return; const q = "?instance=" + encodeURIComponent(selected);
  const [h, t] = await Promise.all([fetch("/dashboard/history" + q), fetch("/dashboard/timeline" + q)]);
  if (!h.ok || !t.ok) return;
  const events = (await h.json()).events; const body = $("history"); body.replaceChildren();
  for (const e of events) { const tr = document.createElement("tr"); const d = e.data;
    cell(tr, e.at.replace("T", " ").slice(0, 23) + "Z");
    cell(tr, e.type === "transition" ? d.event : e.type);
    cell(tr, e.type === "transition" ? d.from + " → " + d.to : "");
    cell(tr, e.type === "transition" ? reason(d) : ""); body.appendChild(tr); }
  const svg = new DOMParser().parseFromString(await t.text(), "image/svg+xml").documentElement;
  $("timeline").replaceChildren(document.importNode(svg, true));
}
function select(id) { selected = id; $("detail").hidden = false;
  $("detail-title").textContent = rows.get(id).children[0].textContent + " (" + id + ")";
  for (const [key, tr] of rows) tr.classList.toggle("selected", key === id); detail(); }
const source = new EventSource("/dashboard/events");
source.addEventListener("snapshot", (m) => { const s = JSON.parse(m.data); rows.clear();
  for (const i of s.instances) render(i); order(); $("live").textContent = "live";
  document.body.dataset.seq = s.last_seq; if (selected && rows.has(selected)) detail(); });
source.addEventListener("change", (m) => { const c = JSON.parse(m.data);
  for (const i of c.instances) render(i); order(); document.body.dataset.seq = c.last_seq;
  if (selected && c.events.some((e) => e.stream === selected)) detail(); });
source.onerror = () => { $("live").textContent = "reconnecting…"; };
</script></body></html>
"""
