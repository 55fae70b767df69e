"""zstd payloads: one frame per segment, with its content size, read strictly."""

from __future__ import annotations

import zstandard

from .container import MAX_SEGMENT_BYTES

DEFAULT_LEVEL = 19
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A zstd frame must not ask for a window larger than a segment can be.
_MAX_WINDOW = 1 << (MAX_SEGMENT_BYTES.bit_length())


def compress(data: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def decompress(payload, original_length: int) -> bytes:
    """Decode exactly one frame of exactly `original_length` bytes, or raise ValueError."""
    payload = bytes(payload)
    if payload[:4] != ZSTD_MAGIC:  # a skippable frame would also pass frame_content_size
        raise ValueError("not a zstd frame (bad magic number)")
    try:
        size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as e:
        raise ValueError(f"not a zstd frame ({e})") from None
    if size != original_length:
        raise ValueError(f"zstd frame holds {size} bytes, the table says {original_length}")
    decompressor = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW).decompressobj()
    try:
        out = decompressor.decompress(payload)
    except zstandard.ZstdError as e:
        raise ValueError(f"zstd error ({e})") from None
    if not decompressor.eof:
        raise ValueError("zstd frame is incomplete")
    if decompressor.unused_data:
        raise ValueError("bytes follow the zstd frame")
    if len(out) != original_length:
        raise ValueError(f"zstd frame gave {len(out)} bytes, the table says {original_length}")
    return out
