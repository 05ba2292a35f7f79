"""The SDK test server (tests/servers/sdk_server.py) over stdio.

Run as ``python -m tests.servers.sdk_stdio_server`` from the repository root.
"""

from __future__ import annotations

from tests.servers.sdk_server import build_server


def main() -> None:
    build_server().run("stdio")


if __name__ == "__main__":
    main()
