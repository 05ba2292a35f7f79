"""A hub run as `fsm-hub serve --http` in a subprocess, with its stderr read as it comes."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tests.e2e.lab import FAST, FSM_HUB, Lab
from tests.servers.faults import free_port


def wait_until(check: Callable[[], Any], timeout: float = 15.0, poll: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; bounded, for real processes only."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if outcome:
            return outcome
        assert time.monotonic() < deadline, f"not reached within {timeout}s"
        time.sleep(poll)


@dataclass
class Lines:
    """The lines a process writes to one pipe, collected by a thread."""

    pipe: Any
    seen: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.pipe:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, match: Callable[[str], bool], timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching line within {timeout}s; saw {self.seen!r}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"stream ended; saw {self.seen!r}")
            self.seen.append(line)
            if match(line):
                return line


    def rest(self, timeout: float = 15.0) -> list[str]:
        """Every line up to the end of the stream (the process must be exiting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty as exc:
                raise AssertionError(f"stream still open after {timeout}s") from exc
            if line is None:
                return self.seen
            self.seen.append(line)


@dataclass
class ServedHub:
    process: subprocess.Popen[str]
    stderr: Lines
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=20)


@contextmanager
def served_hub(lab: Lab, *extra: str, ready: bool = True) -> Iterator[ServedHub]:
    port = free_port()
    args = [FSM_HUB, "serve", "--http", f"127.0.0.1:{port}", "--db", str(lab.db),
            "--instances-dir", str(lab.instances_dir), *FAST, *extra]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    hub = ServedHub(process, Lines(process.stderr), port)
    try:
        if ready:
            hub.stderr.wait_for(lambda line: line.startswith("  role:"))
        yield hub
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
