"""The hash chain that makes an edited, deleted, inserted or reordered row evident."""

from __future__ import annotations

from hashlib import sha256

GENESIS = bytes(32)
"""The predecessor of the first event."""


def stream_label(stream: str) -> str:
    """The stream's part of the canonical bytes; it never changes, so callers may keep it."""
    return f"\n{len(stream)}:{stream}\n"


def link_labelled(
    previous: bytes, seq: int, label: str, version: int, type: str, at: str, data: str
) -> bytes:
    """`link` with the stream's label made already: the one place the canonical bytes are built.

    The writer and `replay --verify` call it once per event, keeping each stream's label.
    """
    canonical = f"{seq}{label}{version}\n{len(type)}:{type}\n{at}\n{data}"
    return sha256(previous + canonical.encode("utf-8", "surrogatepass")).digest()


def link(previous: bytes, seq: int, stream: str, version: int, type: str, at: str, data: str) -> bytes:
    """SHA-256 over the predecessor's hash and the event's canonical bytes.

    Canonical bytes: seq, stream, version, type, at and the stored JSON text of data, one per
    line; stream and type carry their length, so no choice of names can make two events alike.
    """
    return link_labelled(previous, seq, stream_label(stream), version, type, at, data)
