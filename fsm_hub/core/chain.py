"""The hash chain that makes an edited, deleted, inserted or reordered row evident."""

from __future__ import annotations

from hashlib import sha256

GENESIS = bytes(32)
"""The predecessor of the first event."""


def link(previous: bytes, seq: int, stream: str, version: int, type: str, at: str, data: str) -> bytes:
    """SHA-256 over the predecessor's hash and the event's canonical bytes.

    Canonical bytes: seq, stream, version, type, at and the stored JSON text of data, one per
    line; stream and type carry their length, so no choice of names can make two events alike.
    """
    canonical = f"{seq}\n{len(stream)}:{stream}\n{version}\n{len(type)}:{type}\n{at}\n{data}"
    return sha256(previous + canonical.encode("utf-8", "surrogatepass")).digest()
