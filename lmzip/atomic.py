"""Output files that appear whole or not at all.

Data goes to a temporary file beside the target, which is renamed over the
target only once everything succeeded; any error or Ctrl-C removes it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import OutputExistsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False, like: os.stat_result | None = None):
    """Yield a binary file that becomes `path` when the block succeeds.

    With `like` (the input's status), the output takes its permission bits and
    access and modification times, as gzip, xz and zstd give their outputs the input's.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists (use -f to overwrite)")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    # mkstemp makes it 0600, so nothing can read it before it has its final mode
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent or ".")
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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
