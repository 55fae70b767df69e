"""Temporary output files (.TARGET.XXXXXXXX.part) that a killed run left behind.

A run holds a lock on its own temporary file from its creation to its rename, so the
next run to the same target can tell one left by `kill -9` or a crash (a minute old,
and locked by nobody) and remove it. Best effort, and only where the file system has
working flock locks: where it has none (some network mounts), or where locks are not
shared between machines (NFS with local_lock), stale files are not recognised as such,
or, in the second case, a run on another machine may take a live one for stale.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no locks, so no clean-up
    fcntl = None

STALE_AFTER_S = 60  # an unlocked temporary file this old is no run's: a run locks its own at once
SUFFIX = ".part"
_RANDOM_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")  # mkstemp's, 8 of them


def prefix(target: Path) -> str:
    return f".{target.name}."


def hold(fd: int) -> int | None:
    """Lock the temporary file open at `fd` for as long as the returned duplicate stays open
    (the caller closes it after the rename, when the file itself is already closed)."""
    if fcntl is None:
        return None
    held = os.dup(fd)
    with contextlib.suppress(OSError):
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return held


def is_ours(name: str, target: Path) -> bool:
    """`name` is what mkstemp makes for `target`: .TARGET.XXXXXXXX.part."""
    start = prefix(target)
    if not (name.startswith(start) and name.endswith(SUFFIX)):
        return False
    middle = name[len(start):-len(SUFFIX)]
    return len(middle) == 8 and set(middle) <= _RANDOM_CHARS


def _remove_if_stale(part: str) -> None:
    fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        status = os.fstat(fd)
        if (not stat.S_ISREG(status.st_mode) or status.st_uid != os.getuid()
                or time.time() - status.st_mtime < STALE_AFTER_S):
            return
        # shared: it conflicts with a live run's exclusive lock, and needs no write access (NFS)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # BlockingIOError: a live run holds it
        now = os.stat(part, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (status.st_dev, status.st_ino):  # still the file we locked
            os.unlink(part)
    finally:
        os.close(fd)


def remove_stale(target: Path) -> None:
    """Remove the temporary files of `target` that killed runs left behind. A file that cannot
    be opened, locked or removed stays."""
    if fcntl is None:
        return
    folder = target.parent
    try:
        names = [e.name for e in os.scandir(folder) if is_ours(e.name, target)]
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):
            _remove_if_stale(os.path.join(folder, name))
