"""Float32 that means float32: verification and decoding pin their matmul precision.

A host process may have allowed TF32 or bfloat16 passes for float32 matmuls
(`torch.set_float32_matmul_precision("high")` does so on CPUs through oneDNN too),
which would change the arithmetic the margin guard was measured in. Inside
`exact_float32()` they are off; the host's settings come back afterwards.
"""

from __future__ import annotations

import contextlib

import torch


def _settings() -> tuple:
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)


def _apply(settings: tuple) -> None:
    precision, matmul_tf32, cudnn_tf32 = settings
    torch.set_float32_matmul_precision(precision)
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


@contextlib.contextmanager
def exact_float32():
    saved = _settings()
    _apply(("highest", False, False))
    try:
        yield
    finally:
        _apply(saved)
