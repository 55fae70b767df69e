"""Segment kind 0, zstd: one frame per segment, with its content size, read strictly."""

from __future__ import annotations

import zstandard

from ..errors import SegmentError
from ..limits import MAX_SEGMENT_BYTES, MAX_ZSTD_PAYLOAD

KIND = 0
NAME = "zstd"
NEEDS_MODEL = False
DEFAULT_LEVEL = 19
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A zstd frame must not ask for a window larger than a segment can be.
_MAX_WINDOW = 1 << (MAX_SEGMENT_BYTES.bit_length())


def check_entry(entry, header) -> str | None:
    if entry.token_count or entry.vector_count:
        return "a zstd segment has a token or vector count"
    if entry.payload_length > MAX_ZSTD_PAYLOAD:
        return f"payload of {entry.payload_length} bytes is over the limit of {MAX_ZSTD_PAYLOAD}"
    return None


def work(entry) -> int:
    return 0


def compress(data: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def encode(data: bytes, level: int = DEFAULT_LEVEL):
    from . import CodedSegment

    return CodedSegment(KIND, data, compress(data, level))


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


def decode(jobs, ctx) -> list[bytes]:
    out = []
    for job in jobs:
        try:
            out.append(decompress(job.payload, job.entry.original_length))
        except ValueError as e:
            raise SegmentError(job.index, str(e)) from None
    return out
