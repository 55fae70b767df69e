"""The .lmz container, format v2 (reads v1 too): a strict reader and a streaming writer.

SPEC.md is the normative description; this module follows it field by field.
The reader runs in one fixed order (magic, header size, header checksum,
version, fields, table, offsets, end of file) and checks every size it reads
against a named limit before using it, so a hostile file costs at most a few
comparisons. Payload contents are checked later, by the decoder.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from .errors import (
    HeaderError,
    LimitError,
    NotLmzError,
    SegmentTableError,
    TrailingDataError,
    TruncatedError,
    UnsupportedVersionError,
)

# PNG's trick: a high-bit byte catches 7-bit channels, CR LF catches line-ending
# conversion, 0x1A stops `type` on DOS, and the final LF catches LF -> CRLF.
MAGIC = b"\x89LMZ\r\n\x1a\n"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

# Decoder limits (SPEC.md, "Limits"). Every size read from a file is checked
# against one of these before it is used.
MAX_MODEL_ID_BYTES = 1024
MAX_SEGMENTS = 1 << 24
MAX_SEGMENT_BYTES = 1 << 20
MAX_ORIGINAL_SIZE = 1 << 40
MAX_TOKENS_PER_SEGMENT = 8192
MAX_VECTORS_PER_SEGMENT = 1024
MAX_HIDDEN_SIZE = 16384
MAX_PREFIX_TOKENS = 64
# A zstd frame is never much larger than its content (ZSTD_compressBound).
MAX_ZSTD_PAYLOAD = MAX_SEGMENT_BYTES + (MAX_SEGMENT_BYTES >> 8) + 1024

KIND_ZSTD = 0
KIND_MEMORY = 1
KIND_NAMES = {KIND_ZSTD: "zstd", KIND_MEMORY: "memory"}

DTYPE_NONE = 0
DTYPE_FLOAT32 = 1
DTYPE_NAMES = {DTYPE_NONE: "none", DTYPE_FLOAT32: "float32"}

# magic, version, flags, header_size, original_size, content_sha256,
# segment_count, hidden_size, vectors_per_segment, compute_dtype, reserved,
# margin, tokenizer_sha256, weights_sha256, model_id_length; version 2 adds
# prefix_length. The model ID, then (v2) the prefix token ids, then a CRC-32 follow.
_HEADER_V1 = struct.Struct("<8sHHIQ32sIIHBBf32s32sH")
_HEADER = struct.Struct("<8sHHIQ32sIIHBBf32s32sHH")
_HEADERS = {1: _HEADER_V1, 2: _HEADER}
_CRC = struct.Struct("<I")
_TOKEN = struct.Struct("<I")
MIN_HEADER_SIZE = _HEADER_V1.size + _CRC.size  # a v1 header naming no model
MAX_HEADER_SIZE = _HEADER.size + MAX_MODEL_ID_BYTES + MAX_PREFIX_TOKENS * _TOKEN.size + _CRC.size
# kind, flags, vector_count, token_count, original_length, payload_length,
# payload_offset, crc32, reserved
_ENTRY = struct.Struct("<BBHIIIQII")
ENTRY_SIZE = _ENTRY.size

assert MIN_HEADER_SIZE == 142 and MAX_HEADER_SIZE == 1424 and ENTRY_SIZE == 32, "layout must match SPEC.md"

NO_HASH = bytes(32)


@dataclass(frozen=True)
class Header:
    original_size: int
    content_sha256: bytes
    segment_count: int
    model_id: str = ""
    tokenizer_sha256: bytes = NO_HASH
    weights_sha256: bytes = NO_HASH
    hidden_size: int = 0
    vectors_per_segment: int = 0
    compute_dtype: int = DTYPE_NONE
    margin: float = 0.0
    prefix: tuple[int, ...] = ()  # token ids fed before the memory vectors (v2)
    version: int = FORMAT_VERSION

    @property
    def has_model(self) -> bool:
        return bool(self.model_id)

    @property
    def size(self) -> int:
        """Bytes from the start of the file to the end of the header checksum."""
        return (_HEADERS[self.version].size + len(self.model_id.encode("utf-8"))
                + _TOKEN.size * len(self.prefix) + _CRC.size)


@dataclass(frozen=True)
class Segment:
    kind: int
    original_length: int
    payload_length: int
    payload_offset: int
    crc32: int
    token_count: int = 0
    vector_count: int = 0

    @property
    def kind_name(self) -> str:
        return KIND_NAMES[self.kind]


@dataclass(frozen=True)
class Archive:
    """A parsed archive: header, segment table and the raw file it came from."""

    header: Header
    segments: list[Segment]
    data: memoryview = field(repr=False)

    def payload(self, index: int) -> memoryview:
        s = self.segments[index]
        return self.data[s.payload_offset : s.payload_offset + s.payload_length]


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _pack_header(h: Header) -> bytes:
    model_id = h.model_id.encode("utf-8")
    if len(model_id) > MAX_MODEL_ID_BYTES:
        raise LimitError(f"model ID is {len(model_id)} bytes; the limit is {MAX_MODEL_ID_BYTES}")
    if len(h.prefix) > MAX_PREFIX_TOKENS:
        raise LimitError(f"{len(h.prefix)} prefix tokens; the limit is {MAX_PREFIX_TOKENS}")
    if h.version == 1 and h.prefix:
        raise ValueError("format version 1 has no prefix tokens")
    fields = [MAGIC, h.version, 0, h.size, h.original_size, h.content_sha256, h.segment_count,
              h.hidden_size, h.vectors_per_segment, h.compute_dtype, 0, h.margin,
              h.tokenizer_sha256, h.weights_sha256, len(model_id)]
    if h.version >= 2:
        fields.append(len(h.prefix))
    body = _HEADERS[h.version].pack(*fields) + model_id + b"".join(_TOKEN.pack(t) for t in h.prefix)
    return body + _CRC.pack(crc32(body))


def _pack_entry(s: Segment) -> bytes:
    return _ENTRY.pack(s.kind, 0, s.vector_count, s.token_count, s.original_length,
                       s.payload_length, s.payload_offset, s.crc32, 0)


class ArchiveWriter:
    """Collects segments as they are made and writes the archive at the end.

    The header and table come first in the file but are known last, so payloads
    wait in a spooled temporary file: memory stays bounded however long the
    input is, and the table costs 32 bytes a segment.
    """

    SPOOL_IN_MEMORY = 16 << 20

    def __init__(self):
        self._spool = tempfile.SpooledTemporaryFile(max_size=self.SPOOL_IN_MEMORY)
        self._entries: list[tuple] = []  # (kind, orig_len, payload_len, crc, tokens, vectors)

    def add(self, kind: int, original: bytes, payload: bytes, token_count: int = 0,
            vector_count: int = 0) -> None:
        if len(original) > MAX_SEGMENT_BYTES:
            raise LimitError(f"segment of {len(original)} bytes is over the {MAX_SEGMENT_BYTES}-byte limit")
        self._spool.write(payload)
        self._entries.append((kind, len(original), len(payload), crc32(original),
                              token_count, vector_count))

    @property
    def segment_count(self) -> int:
        return len(self._entries)

    def finish(self, out: BinaryIO, header: Header) -> int:
        """Write the whole archive to `out`; return the number of bytes written."""
        header_bytes = _pack_header(header)
        offset = len(header_bytes) + ENTRY_SIZE * len(self._entries) + _CRC.size
        table = bytearray()
        for kind, orig_len, pay_len, crc, tokens, vectors in self._entries:
            table += _pack_entry(Segment(kind, orig_len, pay_len, offset, crc, tokens, vectors))
            offset += pay_len
        out.write(header_bytes)
        out.write(table)
        out.write(_CRC.pack(crc32(table)))
        self._spool.seek(0)
        while chunk := self._spool.read(1 << 20):
            out.write(chunk)
        self._spool.close()
        return offset


def _need(data: memoryview, end: int, what: str) -> None:
    if len(data) < end:
        raise TruncatedError(f"truncated archive: {what} needs {end} bytes, the file has {len(data)}")


def parse_header(data: memoryview) -> Header:
    n = len(data)
    if n < len(MAGIC) or bytes(data[: len(MAGIC)]) != MAGIC:
        if n < len(MAGIC) and MAGIC.startswith(bytes(data)):
            raise TruncatedError(f"truncated archive: {n} bytes, shorter than the magic number")
        raise NotLmzError("not an lmzip archive (bad magic number)")
    _need(data, 16, "the header's fixed fields")
    (header_size,) = struct.unpack_from("<I", data, 12)
    if not MIN_HEADER_SIZE <= header_size <= MAX_HEADER_SIZE:
        raise HeaderError(f"damaged header: header size {header_size} is outside "
                          f"[{MIN_HEADER_SIZE}, {MAX_HEADER_SIZE}]")
    _need(data, header_size, "the header")
    body = data[: header_size - _CRC.size]
    (stored_crc,) = _CRC.unpack_from(data, header_size - _CRC.size)
    if crc32(body) != stored_crc:
        raise HeaderError("damaged header: header checksum mismatch")
    (version,) = struct.unpack_from("<H", data, 8)
    if version not in READABLE_VERSIONS:
        raise UnsupportedVersionError(
            f"unsupported format version {version} (this lmzip reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))})")
    layout = _HEADERS[version]
    (_, _, flags, _, original_size, content_sha, segment_count, hidden_size, vectors, dtype,
     reserved, margin, tok_sha, weights_sha, model_id_len, *rest) = layout.unpack_from(data, 0)
    prefix_len = rest[0] if rest else 0
    if flags or reserved:
        raise HeaderError("damaged header: reserved bits are set")
    if prefix_len > MAX_PREFIX_TOKENS:
        raise LimitError(f"damaged header: {prefix_len} prefix tokens is over the limit of {MAX_PREFIX_TOKENS}")
    if header_size != layout.size + model_id_len + _TOKEN.size * prefix_len + _CRC.size:
        raise HeaderError("damaged header: model ID and prefix lengths disagree with the header size")
    try:
        model_id = bytes(data[layout.size : layout.size + model_id_len]).decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError("damaged header: model ID is not UTF-8") from None
    prefix_at = layout.size + model_id_len
    prefix = tuple(_TOKEN.unpack_from(data, prefix_at + _TOKEN.size * i)[0] for i in range(prefix_len))
    if dtype not in DTYPE_NAMES:
        raise HeaderError(f"damaged header: unknown compute dtype code {dtype}")
    if segment_count > MAX_SEGMENTS:
        raise LimitError(f"damaged header: {segment_count} segments is over the limit of {MAX_SEGMENTS}")
    if original_size > MAX_ORIGINAL_SIZE or original_size > segment_count * MAX_SEGMENT_BYTES:
        raise LimitError(f"damaged header: original size {original_size} is impossible "
                         f"for {segment_count} segments")
    if hidden_size > MAX_HIDDEN_SIZE or vectors > MAX_VECTORS_PER_SEGMENT:
        raise LimitError(f"damaged header: hidden size {hidden_size} or vector count {vectors} over the limit")
    if model_id and (hidden_size == 0 or dtype == DTYPE_NONE):
        raise HeaderError("damaged header: a model is named but its hidden size or dtype is missing")
    if not model_id and (hidden_size or vectors or dtype or prefix or any(tok_sha) or any(weights_sha)):
        raise HeaderError("damaged header: model fields are set but no model is named")
    if margin != margin or margin < 0:  # NaN or negative
        raise HeaderError("damaged header: the margin is not a non-negative number")
    return Header(original_size, bytes(content_sha), segment_count, model_id, bytes(tok_sha),
                  bytes(weights_sha), hidden_size, vectors, dtype, margin, prefix, version)


def _check_entry(i: int, s: Segment, flags: int, reserved: int, header: Header) -> None:
    def bad(problem: str):
        raise SegmentTableError(f"damaged segment table: segment {i}: {problem}")

    if flags or reserved:
        bad("reserved bits are set")
    if s.original_length > MAX_SEGMENT_BYTES:
        bad(f"original length {s.original_length} is over the limit of {MAX_SEGMENT_BYTES}")
    if s.kind == KIND_ZSTD:
        if s.token_count or s.vector_count:
            bad("a zstd segment has a token or vector count")
        if s.payload_length > MAX_ZSTD_PAYLOAD:
            bad(f"payload of {s.payload_length} bytes is over the limit of {MAX_ZSTD_PAYLOAD}")
    elif s.kind == KIND_MEMORY:
        if not header.has_model:
            bad("a memory segment in an archive that names no model")
        if not 1 <= s.vector_count <= MAX_VECTORS_PER_SEGMENT:
            bad(f"vector count {s.vector_count} is outside [1, {MAX_VECTORS_PER_SEGMENT}]")
        if not 1 <= s.token_count <= min(MAX_TOKENS_PER_SEGMENT, s.original_length):
            bad(f"token count {s.token_count} is outside [1, {MAX_TOKENS_PER_SEGMENT}] "
                "or more than the segment's bytes")
        if s.payload_length != s.vector_count * header.hidden_size * 2:
            bad(f"payload of {s.payload_length} bytes does not hold {s.vector_count} fp16 vectors "
                f"of size {header.hidden_size}")
    else:
        bad(f"unknown kind {s.kind}")


def parse(blob) -> Archive:
    """Parse and bound-check a whole archive held in memory."""
    data = memoryview(blob).cast("B")
    header = parse_header(data)
    table_start = header.size
    table_end = table_start + ENTRY_SIZE * header.segment_count
    _need(data, table_end + _CRC.size, f"the table of {header.segment_count} segments")
    (stored_crc,) = _CRC.unpack_from(data, table_end)
    if crc32(data[table_start:table_end]) != stored_crc:
        raise SegmentTableError("damaged segment table: checksum mismatch")
    segments = []
    expected_offset = table_end + _CRC.size
    total = 0
    for i in range(header.segment_count):
        (kind, flags, vectors, tokens, orig_len, pay_len, offset, crc,
         reserved) = _ENTRY.unpack_from(data, table_start + i * ENTRY_SIZE)
        s = Segment(kind, orig_len, pay_len, offset, crc, tokens, vectors)
        _check_entry(i, s, flags, reserved, header)
        if offset != expected_offset:
            raise SegmentTableError(f"damaged segment table: segment {i} payload offset {offset} "
                                    f"should be {expected_offset} (payloads are contiguous)")
        expected_offset += pay_len
        total += orig_len
        segments.append(s)
    if total != header.original_size:
        raise SegmentTableError(f"damaged segment table: segments add up to {total} bytes, "
                                f"the header says {header.original_size}")
    _need(data, expected_offset, "the payloads")
    if len(data) > expected_offset:
        raise TrailingDataError(f"{len(data) - expected_offset} bytes of trailing data after the last payload")
    return Archive(header, segments, data)
