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
def atomic_output(path: str | os.PathLike, force: bool = False):
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists (use -f to overwrite)")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent or ".")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would surprise; act like open()
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if path.exists() and not force:  # appeared while we worked
            raise OutputExistsError(f"{path} already exists (use -f to overwrite)")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
