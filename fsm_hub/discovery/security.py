"""Who may have written what we read: the directory and each file must be ours alone.

Another user who can write in the instances directory, or swap a file for a link, could
announce an instance the hub would trust and connect to.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fsm_hub.discovery.announcement import MAX_FILE_SIZE
from fsm_hub.errors import InvalidAnnouncement, RefusedAnnouncement


def directory_refusal(directory: Path, st: os.stat_result) -> str | None:
    """Why `directory` (stat `st`) must not be used, or None if only we can write there."""
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{directory} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})"
    if mode & stat.S_IWOTH:
        return f"{directory} is writable by every user (mode {mode:04o})"
    if mode & stat.S_IWGRP and st.st_gid != os.getegid():
        return f"{directory} is writable by group {st.st_gid}, not ours (mode {mode:04o})"
    return None


def read_own_file(path: Path) -> bytes:
    """Open without following links and check the open file itself, so a swap can't fool us."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP from O_NOFOLLOW, EACCES, ...
        if os.path.islink(path):
            raise RefusedAnnouncement("it is a symbolic link") from None
        raise InvalidAnnouncement(f"cannot open it ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedAnnouncement("it is not a regular file")
        if st.st_uid != os.geteuid():
            raise RefusedAnnouncement(f"it is owned by uid {st.st_uid}, not by us")
        if st.st_size > MAX_FILE_SIZE:
            raise RefusedAnnouncement(f"it is larger than {MAX_FILE_SIZE // 1024} KiB")
        data = b""
        while len(data) <= MAX_FILE_SIZE and (chunk := os.read(fd, MAX_FILE_SIZE + 1 - len(data))):
            data += chunk
    except OSError as exc:  # EIO and friends: one bad file must not stop the scan
        raise InvalidAnnouncement(f"cannot read it ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_SIZE:  # it grew while we read
        raise RefusedAnnouncement(f"it is larger than {MAX_FILE_SIZE // 1024} KiB")
    return data
