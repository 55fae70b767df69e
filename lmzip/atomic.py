"""Output files that appear whole or not at all.

Data goes to a temporary file beside the target, which is renamed over the
target only once everything succeeded; any error or Ctrl-C removes it. A
target that is a device or a FIFO (/dev/null, a pipe) is written in place,
never replaced, once the whole output is ready. A run holds a lock on its
temporary file, so that the next run to the same target can tell one left by
`kill -9` or a crash (old, and locked by nobody) and remove it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from .errors import OutputExistsError

SPOOL_IN_MEMORY = 64 << 20  # a larger output waits on disk
STALE_AFTER_S = 60  # an unlocked temporary file this old is no run's: a run locks its own at once
_PART = ".part"
_RANDOM_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")  # mkstemp's, 8 of them


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def spooled(destination: BinaryIO):
    """Yield a buffer whose contents go to `destination` only if the block succeeds: nothing
    reaches a stream or a device unless the whole result checked out."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as buffer:
        yield buffer
        buffer.seek(0)
        shutil.copyfileobj(buffer, destination)
    destination.flush()


def names_a_folder(name: str) -> bool:
    """`name` ends in a slash, `.` or `..`: Path() would drop that and write a file."""
    return name.endswith(("/", os.sep)) or os.path.basename(name) in ("", ".", "..")


def is_special(path: str | os.PathLike) -> bool:
    """An existing device, FIFO or socket: something to write into, not to replace."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _write_into_special(path: Path, buffer) -> None:
    """Copy `buffer` into the device or FIFO at `path`, opened only now and never created or
    truncated: if it became a file meanwhile, nothing is written."""
    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
    with open(fd, "wb") as target:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            raise OutputExistsError(f"{path} changed while lmzip worked: nothing written")
        buffer.seek(0)
        shutil.copyfileobj(buffer, target)


def _lock(fd: int) -> None:
    """Mark a temporary file as in use for as long as this run holds it open (where the
    file system has no locks, stale files are just not recognised)."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _is_our_part(name: str, target: str) -> bool:
    """`name` is what mkstemp makes for `target`: .TARGET.XXXXXXXX.part."""
    prefix = f".{target}."
    middle = name[len(prefix):-len(_PART)]
    return (name.startswith(prefix) and name.endswith(_PART) and len(middle) == 8
            and set(middle) <= _RANDOM_CHARS)


def _remove_if_stale(part: str) -> None:
    fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        status = os.fstat(fd)
        if (not stat.S_ISREG(status.st_mode) or status.st_uid != os.getuid()
                or time.time() - status.st_mtime < STALE_AFTER_S):
            return
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live run holds it
        os.unlink(part)
    finally:
        os.close(fd)


def remove_stale_parts(path: Path) -> None:
    """Remove the temporary files of `path` that killed runs left behind. Best effort: a file
    that cannot be opened, locked or removed stays."""
    folder = path.parent
    try:
        names = [e.name for e in os.scandir(folder) if _is_our_part(e.name, path.name)]
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):
            _remove_if_stale(os.path.join(folder, name))


def _naming(e: OSError, path: Path) -> OSError:
    """The same error, naming the target instead of the temporary file."""
    return type(e)(e.errno, e.strerror, str(path))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False, like: os.stat_result | None = None):
    """Yield a binary file that becomes `path` when the block succeeds.

    With `like` (the input's status), the output takes its permission bits and
    access and modification times, as gzip, xz and zstd give their outputs the input's.
    """
    name = os.fspath(path)
    if names_a_folder(name):
        raise IsADirectoryError(errno.EISDIR, "names a folder, not a file", name)
    path = Path(name)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", name)
    if path.exists() and not force and name != os.devnull:  # as zstd, /dev/null needs no -f
        raise OutputExistsError(f"{path} already exists (use -f to overwrite)")
    if is_special(path):
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as buffer:
            yield buffer
            _write_into_special(path, buffer)
        return
    remove_stale_parts(path)
    # mkstemp makes it 0600, so nothing can read it before it has its final mode
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_PART, dir=path.parent or ".")
    except OSError as e:
        raise _naming(e, path) from None
    _lock(fd)
    held = os.dup(fd)  # the lock lasts until the rename, after the file itself is closed
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            # without `like`, act like open(); setuid, setgid and sticky bits are not copied
            os.fchmod(f.fileno(), like.st_mode & 0o777 if like is not None else 0o666 & ~_umask())
            os.fsync(f.fileno())
        if like is not None:
            os.utime(tmp, ns=(like.st_atime_ns, like.st_mtime_ns))
        if path.exists() and not force:  # appeared while we worked
            raise OutputExistsError(f"{path} already exists (use -f to overwrite)")
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _naming(e, path) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(held)
