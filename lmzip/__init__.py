"""lmzip: lossless text compression into LLM memory vectors, in a .lmz container.

`encode()` and `decode()` are one-shot wrappers over `Codec`, which keeps the
loaded model between calls; `memory()` reads an archive's memory vectors as
plain data. `Codec`, `EncodeReport` and `Progress` are imported on first use
(they bring torch), so reading an archive's table needs no torch.
"""

from typing import TYPE_CHECKING

from .container import FORMAT_VERSION, MAGIC
from .errors import (
    ClusterError,
    ContentChecksumError,
    DeviceMemoryError,
    HeaderError,
    InputError,
    InternalError,
    JournalError,
    LimitError,
    LmzError,
    ModelError,
    ModelMismatchError,
    ModelUnavailableError,
    NotLmzError,
    OptionError,
    OutputExistsError,
    SegmentError,
    SegmentTableError,
    TrailingDataError,
    TruncatedError,
    UnsupportedError,
    UnsupportedKindError,
    UnsupportedVersionError,
    WorkLimitError,
)
from .export import MemorySegment, memory
from .fit_config import FitConfig
from .inspection import inspect

if TYPE_CHECKING:  # for type checkers and editors; at run time, __getattr__ below
    from .codec import Codec, EncodeReport, Progress

__version__ = "0.1.0"

_LAZY = ("Codec", "EncodeReport", "Progress")
_default_codec: "Codec | None" = None


def __getattr__(name):
    if name in _LAZY:
        from . import interrupts

        with interrupts.deferred():  # codec brings torch
            from . import codec
        return getattr(codec, name)
    raise AttributeError(f"module 'lmzip' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


def _codec() -> "Codec":
    global _default_codec
    if _default_codec is None:
        from .codec import Codec

        _default_codec = Codec()
    return _default_codec


def encode(data, **options) -> bytes:
    """Compress bytes (or str, as UTF-8) into a .lmz archive. See Codec.encode_to for options."""
    return _codec().encode(data, **options)


def decode(blob, **options) -> bytes:
    """Decompress a .lmz archive to exactly its original bytes, or raise LmzError."""
    return _codec().decode(blob, **options)


__all__ = [
    "Codec", "EncodeReport", "FitConfig", "Progress", "encode", "decode", "inspect", "memory",
    "MemorySegment",
    "FORMAT_VERSION", "MAGIC", "LmzError", "NotLmzError", "UnsupportedVersionError",
    "TruncatedError", "TrailingDataError", "HeaderError", "LimitError", "SegmentTableError",
    "SegmentError", "ContentChecksumError", "ModelError", "ModelUnavailableError",
    "ModelMismatchError", "InputError", "OptionError", "OutputExistsError", "UnsupportedError",
    "UnsupportedKindError", "WorkLimitError", "JournalError", "InternalError", "ClusterError",
    "DeviceMemoryError",
]
