"""What a person sees, through the real console script on a real log written by a real hub."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fsm_hub import __version__
from tests.e2e.lab import FSM_HUB, Lab
from tests.e2e.observed import Lines, served_hub, wait_until
from tests.servers.faults import free_port
from tests.servers.launch import REPO_ROOT


def state_of(lab: Lab, name: str) -> str | None:
    done = lab.cli("instances", "--json")
    return {i["name"]: i["state"] for i in json.loads(done.stdout or "[]")}.get(name)


def test_the_banner_says_what_this_process_is(lab: Lab, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    with served_hub(lab, "--instances-dir", str(missing)) as hub:
        banner = hub.stderr.seen
        assert banner[0] == f"fsm-hub {__version__} (pid {hub.process.pid})"
        assert banner[1] == f"  log:        {lab.db}"
        assert banner[2] == f"  instances:  {missing} (does not exist yet; watched until it appears)"
        config = Path(os.environ["XDG_CONFIG_HOME"]) / "fsm-hub" / "servers.json"
        assert banner[3] == f"  config:     {config} (does not exist: no configured servers)"
        assert banner[4] == f"  serving:    {hub.url}/mcp (dashboard at {hub.url}/)"
        assert banner[5] == "  role:       owns the log (supervising)"
        assert hub.stop() == 0


def test_the_banner_says_why_a_directory_is_refused(lab: Lab) -> None:
    lab.instances_dir.chmod(0o777)
    with served_hub(lab) as hub:
        [line] = [line for line in hub.stderr.seen if line.startswith("  instances:  ")]
        assert line.startswith(f"  instances:  {lab.instances_dir} (refused: ")
        assert line.endswith("; no instances will be discovered)")
        assert hub.stop() == 0


def test_quiet_silences_the_banner_and_log_level_sets_logging(lab: Lab) -> None:
    with served_hub(lab, "--quiet", "--log-level", "info", ready=False) as hub:
        line = hub.stderr.wait_for(lambda line: "serving MCP over Streamable HTTP" in line)
        assert line == f"fsm-hub: serving MCP over Streamable HTTP at {hub.url}/mcp"  # an info message
        assert hub.stop() == 0
    assert not any(line.startswith(("fsm-hub 0", "  role:")) for line in hub.stderr.rest())


def test_status_with_and_without_a_hub_and_instances_after_a_stop(lab: Lab) -> None:
    web = lab.start("0123456789abcdef", "web")
    with served_hub(lab) as hub:
        wait_until(lambda: state_of(lab, "web") == "active")
        running = json.loads(lab.cli("status", "--json").stdout)
        assert running["hub"]["running"] is True
        assert running["hub"]["pid"] == hub.process.pid
        assert running["instances"] == {"total": 1, "by_state": {"active": 1}}
        assert running["log"]["path"] == str(lab.db) and running["log"]["events"] >= 4
        assert running["hub"]["serves"] == [f"{hub.url}/mcp"] and running["hub"]["attached"] == []
        attached = subprocess.Popen(
            [FSM_HUB, "serve", "--mcp", "--db", str(lab.db), "--instances-dir", str(lab.instances_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            Lines(attached.stderr).wait_for(
                lambda line: line == f"  role:       attached to the owning hub, pid {hub.process.pid}"
                " (takes over if it exits)")
            both = json.loads(lab.cli("status", "--json").stdout)["hub"]
            assert [p["pid"] for p in both["attached"]] == [attached.pid]
            text = lab.cli("status").stdout.splitlines()
            assert text[0].startswith(f"hub:        running, pid {hub.process.pid}, since ")
            assert text[1] == f"serves:     {hub.url}/mcp"
            assert text[3].startswith(f"attached:   pid {attached.pid} since ")
        finally:
            assert attached.stdin is not None
            attached.stdin.close()
            assert attached.wait(timeout=15) == 0
        assert json.loads(lab.cli("status", "--json").stdout)["hub"]["attached"] == []
        listed = lab.cli("instances")
        assert listed.stderr == "" and "web" in listed.stdout
        assert hub.stop() == 0
    os.kill(web.process.pid, signal.SIGKILL)  # dies after the hub stopped: the log cannot know
    web.process.wait()
    stopped = json.loads(lab.cli("status", "--json").stdout)
    assert stopped["hub"]["running"] is False and stopped["hub"]["last_stop_reason"] == "signal"
    listed = lab.cli("instances")
    assert listed.returncode == 0
    assert listed.stderr.startswith("fsm-hub: no hub is running; hub stopped at 20")
    assert listed.stderr.rstrip().endswith(": states as of then")
    assert "active" in listed.stdout


def test_follow_prints_a_committed_event_within_a_second_and_exits_0_on_sigint(lab: Lab) -> None:
    with served_hub(lab):
        follower = subprocess.Popen(
            [FSM_HUB, "history", "--all", "--follow", "--json", "--db", str(lab.db)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        lines = Lines(follower.stdout)
        try:
            lines.wait_for(lambda line: json.loads(line)["type"] == "hub_started")
            lab.start("fedcba9876543210", "api")
            seen = lines.wait_for(lambda line: json.loads(line)["type"] == "instance_discovered")
            printed_at = time.time()
            committed = json.loads(seen)["at"]
            from fsm_hub.core.events import parse_time

            assert printed_at - parse_time(committed).timestamp() < 1.0
            follower.send_signal(signal.SIGINT)
            assert follower.wait(timeout=10) == 0
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()


def test_announce_and_run_round_trip(lab: Lab) -> None:
    port = free_port()
    with served_hub(lab):
        runner = subprocess.Popen(
            [FSM_HUB, "run", "served", "--port", str(port), "--instances-dir", str(lab.instances_dir),
             "--", sys.executable, "-m", "tests.servers.sdk_server", "--port", str(port)],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            files = wait_until(lambda: list(lab.instances_dir.glob("served-*.json")))
            announced = json.loads(files[0].read_text())
            assert announced["port"] == port and announced["name"] == "served"
            assert oct(files[0].stat().st_mode & 0o777) == "0o600"
            wait_until(lambda: state_of(lab, "served") == "active")
            child = announced["process_info"]["pid"]
            os.kill(child, signal.SIGTERM)
            assert runner.wait(timeout=10) in (0, 128 + signal.SIGTERM)  # whatever the server did
            assert not files[0].exists()
            wait_until(lambda: state_of(lab, "served") == "dead")
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.wait()
    written = fsm_hub("announce", "other", "--port", str(port), "--pid", str(os.getpid()),
                      "--instances-dir", str(lab.instances_dir))
    assert (written.returncode, written.stderr) == (0, "")
    path = Path(written.stdout.strip())
    assert json.loads(path.read_text())["process_info"] == {"pid": os.getpid()}


def fsm_hub(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FSM_HUB, *args], capture_output=True, text=True, timeout=30)


def test_run_passes_the_exit_code_through_and_removes_its_file(lab: Lab) -> None:
    script = "import os, sys; sys.exit(7)"
    done = fsm_hub("run", "short", "--port", str(free_port()), "--instances-dir", str(lab.instances_dir),
                   "--", sys.executable, "-c", script)
    assert done.returncode == 7  # never listened: never announced
    port = free_port()
    listens = ("import socket, sys, os, time; s = socket.socket();"
               " s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); c, _ = s.accept(); c.close();"
               " end = time.monotonic() + 10\n"
               "while not os.listdir(sys.argv[2]) and time.monotonic() < end: time.sleep(0.01)\n"
               "sys.exit(9 if os.listdir(sys.argv[2]) else 8)")
    done = fsm_hub("run", "listens", "--port", str(port), "--instances-dir", str(lab.instances_dir),
                   "--", sys.executable, "-c", listens, str(port), str(lab.instances_dir))
    assert done.returncode == 9  # it saw its own announcement, and its code came through
    assert list(lab.instances_dir.iterdir()) == []


def test_announce_refuses_what_discovery_would_refuse(lab: Lab) -> None:
    done = fsm_hub("announce", "far", "--port", "80", "--url", "http://example.com/mcp",
                   "--instances-dir", str(lab.instances_dir))
    assert done.returncode == 1
    assert done.stderr.startswith("fsm-hub: not a valid instance file: url ")
    assert list(lab.instances_dir.iterdir()) == []
