"""Who may write the files the hub trusts: the checks shared by the instances directory and the config.

Anyone who can write an announcement or a `servers.json` can make the hub connect somewhere, or
run a program: such files and their directories must be ours and writable by no one else.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fsm_hub.discovery.announcement import MAX_FILE_SIZE
from fsm_hub.errors import InvalidAnnouncement, RefusedAnnouncement


def directory_refusal(directory: object, st: os.stat_result) -> str | None:
    """Another user who can write here could announce an instance the hub would trust."""
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    return _ownership_refusal(directory, st)


def file_refusal(path: object, st: os.stat_result) -> str | None:
    """The same rule for one file (stat it after opening, so a swap cannot fool the check)."""
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    return _ownership_refusal(path, st)


def _ownership_refusal(path: object, st: os.stat_result) -> str | None:
    """Ours, and writable by no other user: not by everyone, not by a group other than ours."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})"
    if mode & stat.S_IWOTH:
        return f"{path} is writable by every user (mode {mode:04o})"
    if mode & stat.S_IWGRP and st.st_gid != os.getegid():
        return f"{path} is writable by group {st.st_gid}, not ours (mode {mode:04o})"
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
