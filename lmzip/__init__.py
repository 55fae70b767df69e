"""lmzip: lossless text compression into LLM memory vectors, in a .lmz container.

`encode()` and `decode()` are one-shot wrappers over `Codec`, which keeps the
loaded model between calls; `memory()` reads an archive's memory vectors as
plain data.
"""

from .codec import Codec, EncodeReport, Progress, inspect
from .container import FORMAT_VERSION, MAGIC
from .errors import (
    ClusterError,
    ContentChecksumError,
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
from .fit import FitConfig

__version__ = "0.1.0"

_default_codec: Codec | None = None


def _codec() -> Codec:
    global _default_codec
    if _default_codec is None:
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
]
