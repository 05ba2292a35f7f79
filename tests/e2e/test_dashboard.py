"""The dashboard in a real headless Chromium: it loads, shows an instance, follows it live."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fsm_hub.core.events import parse_time
from tests.e2e.browser import MISSING, chromium
from tests.e2e.lab import Lab
from tests.e2e.observed import served_hub, wait_until

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def page_state(driver, instance_id: str) -> str | None:  # type: ignore[no-untyped-def]
    value = driver.execute_script(
        "const r = document.querySelector(`tr[data-id='${arguments[0]}']`); return r && r.dataset.state;",
        instance_id,
    )
    return value if isinstance(value, str) else None


def test_the_dashboard_follows_an_instance_from_active_to_retrying(lab: Lab, tmp_path: Path) -> None:
    web = lab.start("00aa11bb22cc33dd", "web")
    with served_hub(lab) as hub, chromium(tmp_path / "profile") as driver:
        driver.get(f"{hub.url}/")
        assert driver.title == "fsm-hub"
        wait_until(lambda: page_state(driver, web.id) == "active", 20, 0.02)
        assert "web" in driver.find_element("css selector", f"tr[data-id='{web.id}']").text
        driver.find_element("css selector", f"tr[data-id='{web.id}']").click()
        wait_until(lambda: "connecting → active" in driver.find_element("id", "history").text, 10, 0.02)
        assert driver.execute_script("return document.querySelectorAll('#timeline svg g.lane').length") == 1

        os.kill(web.process.pid, signal.SIGSTOP)  # alive but silent: pings fail, it is lost
        wait_until(lambda: page_state(driver, web.id) == "retrying", 20, 0.02)
        seen_at = time.time()
        events = json.loads(lab.cli("history", web.id, "--json").stdout)
        lost = next(e for e in events if e["type"] == "transition" and e["data"]["event"] == "lost")
        assert seen_at - parse_time(lost["at"]).timestamp() < 2.0
        wait_until(lambda: "active → retrying" in driver.find_element("id", "history").text, 5, 0.02)
        os.kill(web.process.pid, signal.SIGCONT)


def test_the_dashboard_keeps_the_mcp_endpoints_host_and_origin_rules(lab: Lab) -> None:
    with served_hub(lab) as hub:
        def status(path: str, **headers: str) -> int:
            request = urllib.request.Request(f"{hub.url}{path}", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status("/") == 200
        assert status("/", Host="evil.example") == 421
        assert status("/", Origin="http://evil.example") == 403
        assert status("/dashboard/events", Origin="http://evil.example") == 403
        assert status("/dashboard/history?instance=nobody") == 404
        with urllib.request.urlopen(f"{hub.url}/", timeout=10) as response:
            page = response.read().decode()
            csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp
        assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page


def test_an_open_page_never_holds_the_hubs_exit(lab: Lab) -> None:
    import http.client

    with served_hub(lab) as hub:
        connection = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
        connection.request("GET", "/dashboard/events")
        response = connection.getresponse()
        assert response.getheader("Content-Type") == "text/event-stream"
        assert response.readline() == b"event: snapshot\n"
        hub.process.send_signal(signal.SIGINT)
        rest = response.read()  # ended by the hub, cleanly: not cut off when the process exits
        assert rest.startswith(b"data: ")
        assert hub.process.wait(timeout=10) == 0
