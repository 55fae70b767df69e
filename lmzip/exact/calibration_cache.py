"""Arithmetic /3's calibration maxima, kept in lmzip's cache between runs.

Building /3 takes /2's model and its pass over the calibration text, about 5 of the 6 seconds a
run of `--method lm` spends before its first token (BENCHMARKS.md). The maxima that pass gives
depend only on the model's files and the calibration text, so they are kept in a file named by
a digest of both. The file ends with the SHA-256 of its contents and must match the model's
shape; anything else is treated as missing, and the maxima computed and written again. The
cache is a saving, never a requirement: a cache that cannot be written is left alone.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .smoothing import CALIBRATION_SHA256, CALIBRATION_TOKENS, Maxima

FORMAT = b"lmzip /3 calibration maxima v1"
DIGEST_BYTES = 32


def cache_file(lm) -> Path:
    """Where the maxima of this model's files (and of lmzip's calibration text) are kept."""
    from ..embedded import cache_root

    key = hashlib.sha256(b"\0".join([FORMAT, lm.weights_sha256, lm.tokenizer_sha256,
                                     CALIBRATION_SHA256.encode(), str(CALIBRATION_TOKENS).encode()]))
    return cache_root() / "exact" / f"maxima-{key.hexdigest()[:32]}.npz"


def cached_maxima(lm, shape, compute: Callable[[], Maxima], refresh: bool = False) -> Maxima:
    """The maxima from the cache if it holds them for this model (and not `refresh`), else
    compute(), then kept."""
    path = cache_file(lm)
    maxima = None if refresh else read(path, shape)
    if maxima is None:
        maxima = compute()
        write(path, maxima)
    return maxima


def encode(maxima: Maxima) -> bytes:
    arrays = {"head": maxima.head.numpy()}
    for name in ("attn", "mlp", "down"):
        arrays.update((f"{name}{i}", t.numpy()) for i, t in enumerate(getattr(maxima, name)))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    return data + hashlib.sha256(data).digest()


def decode(data: bytes, shape) -> Maxima | None:
    """The maxima in `data` if its digest holds and every array has the model's shape, else None."""
    body, digest = data[:-DIGEST_BYTES], data[-DIGEST_BYTES:]
    if len(data) <= DIGEST_BYTES or hashlib.sha256(body).digest() != digest:
        return None
    widths = {"attn": shape.hidden, "mlp": shape.hidden, "down": shape.intermediate}
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as arrays:
            lists = {name: [_checked(arrays[f"{name}{i}"], width) for i in range(shape.layers)]
                     for name, width in widths.items()}
            head = _checked(arrays["head"], shape.hidden)
    except (KeyError, ValueError, OSError):
        return None
    if head is None or any(t is None for ts in lists.values() for t in ts):
        return None
    return Maxima(lists["attn"], lists["mlp"], lists["down"], head)


def _checked(a: np.ndarray, width: int) -> torch.Tensor | None:
    if a.dtype != np.float64 or a.shape != (width,) or not np.all(np.isfinite(a)) or np.any(a < 0):
        return None
    return torch.from_numpy(a.copy())


def read(path: Path, shape) -> Maxima | None:
    try:
        return decode(path.read_bytes(), shape)
    except OSError:
        return None


def write(path: Path, maxima: Maxima) -> None:
    """Keep the maxima at `path`, whole or not at all; a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=".maxima-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(encode(maxima))
            os.replace(staging, path)
        except BaseException:
            os.unlink(staging)
            raise
    except OSError:
        pass
