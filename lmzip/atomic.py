"""Output files that appear whole or not at all.

Data goes to a temporary file beside the target, which is renamed over the
target only once everything succeeded; any error or Ctrl-C removes it. A
target that is a device or a FIFO (/dev/null, a pipe) is written in place,
never replaced, once the whole output is ready. Temporary files that killed
runs left are removed by the next run to the same target (part_files.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from . import part_files
from .errors import OutputExistsError

SPOOL_IN_MEMORY = 64 << 20  # a larger output waits on disk


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
    part_files.remove_stale(path)
    # mkstemp makes it 0600, so nothing can read it before it has its final mode
    try:
        fd, tmp = tempfile.mkstemp(prefix=part_files.prefix(path), suffix=part_files.SUFFIX, dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from None
    held = None
    try:
        with os.fdopen(fd, "wb") as f:
            held = part_files.hold(f.fileno())  # until the rename, after the file itself is closed
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
        except FileNotFoundError:
            if os.path.lexists(tmp):
                raise
            raise FileNotFoundError(errno.ENOENT, "the temporary file vanished before it could be renamed "
                                    "(removed by another program?)", tmp) from None
        except OSError as e:
            raise _naming(e, path) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        if held is not None:
            os.close(held)
