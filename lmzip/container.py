"""The .lmz container, format v3 (reads v1 and v2 too): a strict reader and a streaming writer.

SPEC.md is the normative description; this module follows it field by field.
The reader runs in one fixed order (magic, header size, header checksum,
version, flags, fields, table, entries, offsets, end of file) and checks every
size it reads against a named limit (`limits`) before using it, so a hostile
file costs at most a few comparisons. Entries are checked by their kind's module
(`kinds`); payload checksums by `check_payloads`; payload contents by the decoder.
The writer runs the reader's checks on what it writes, so it cannot write a file
the reader refuses.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from . import kinds
from .errors import (HeaderError, InternalError, LimitError, NotLmzError, SegmentError, SegmentTableError,
                     TrailingDataError, TruncatedError, UnsupportedError, UnsupportedVersionError)
from .limits import (MAX_ANY_HEADER_SIZE, MAX_HEADER_EXTENSION, MAX_HIDDEN_SIZE, MAX_MODEL_ID_BYTES,
                     MAX_ORIGINAL_SIZE, MAX_PREFIX_TOKENS, MAX_REVISION_BYTES, MAX_SEGMENT_BYTES,
                     MAX_SEGMENTS, MAX_VECTORS_PER_SEGMENT)

# PNG's trick: a high-bit byte catches 7-bit channels, CR LF catches line-ending
# conversion, 0x1A stops `type` on DOS, and the final LF catches LF -> CRLF.
MAGIC = b"\x89LMZ\r\n\x1a\n"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

KIND_ZSTD = kinds.zstd.KIND
KIND_MEMORY = kinds.memory.KIND

DTYPE_NONE = 0
DTYPE_FLOAT32 = 1
DTYPE_NAMES = {DTYPE_NONE: "none", DTYPE_FLOAT32: "float32"}

# Where the decoder finds the model (v3). Versions 1 and 2 name it by model_id alone.
SOURCE_NONE, SOURCE_EMBEDDED, SOURCE_HUB, SOURCE_LOCAL = 0, 1, 2, 3
SOURCE_NAMES = {SOURCE_NONE: "none", SOURCE_EMBEDDED: "embedded", SOURCE_HUB: "hub", SOURCE_LOCAL: "local"}
SOURCE_LEGACY = -1  # a v1 or v2 header: model_id is a hub ID, a directory or the embedded model's ID
SOURCE_CODES = {name: code for code, name in SOURCE_NAMES.items()}

# Flags a v3 reader knows: none yet. An unknown incompatible bit means "unsupported";
# unknown compatible bits are ignored (and let the header carry extra bytes, see SPEC.md).
KNOWN_INCOMPATIBLE_FLAGS = 0
ENTRY_INCOMPATIBLE_MASK = 0x0F
KNOWN_ENTRY_INCOMPATIBLE_FLAGS = 0

# Layouts (SPEC.md). v1/v2: magic, version, flags, header_size, original_size, content_sha256,
# segment_count, hidden_size, vectors_per_segment, compute_dtype, reserved, margin,
# tokenizer_sha256, weights_sha256, model_id_length (v2: prefix_length).
_HEADER_V1 = struct.Struct("<8sHHIQ32sIIHBBf32s32sH")
_HEADER_V2 = struct.Struct("<8sHHIQ32sIIHBBf32s32sHH")
# v3: magic, version, incompatible_flags, header_size, compatible_flags, model_source,
# compute_dtype, original_size, content_sha256, segment_count, hidden_size,
# vectors_per_segment, prefix_length, margin, tokenizer_sha256, weights_sha256,
# model_id_length, revision_length; then model_id, revision, prefix ids, the CRC-32.
_HEADER_V3 = struct.Struct("<8sHHIHBBQ32sIIHHf32s32sHH")
_LEGACY_HEADERS = {1: _HEADER_V1, 2: _HEADER_V2}
_CRC = struct.Struct("<I")
_TOKEN = struct.Struct("<I")
LEGACY_MIN_HEADER_SIZE = _HEADER_V1.size + _CRC.size
LEGACY_MAX_HEADER_SIZE = _HEADER_V2.size + MAX_MODEL_ID_BYTES + MAX_PREFIX_TOKENS * _TOKEN.size + _CRC.size
MIN_HEADER_SIZE = _HEADER_V3.size + _CRC.size  # a v3 header naming no model
# kind, flags, vector_count, token_count, original_length, payload_length, payload_offset,
# crc32, payload_crc32 (v1/v2: reserved, zero)
_ENTRY = struct.Struct("<BBHIIIQII")
ENTRY_SIZE = _ENTRY.size

assert (LEGACY_MIN_HEADER_SIZE, LEGACY_MAX_HEADER_SIZE, MIN_HEADER_SIZE, ENTRY_SIZE) == (142, 1424, 148, 32), \
    "layout must match SPEC.md"

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
    model_source: int = SOURCE_NONE
    revision: str = ""            # hub revision the model was loaded at (v3)
    compatible_flags: int = 0
    version: int = FORMAT_VERSION

    @property
    def has_model(self) -> bool:
        return bool(self.model_id)

    @property
    def source_name(self) -> str:
        return SOURCE_NAMES.get(self.model_source, "named")


@dataclass(frozen=True)
class Segment:
    kind: int
    original_length: int
    payload_length: int
    payload_offset: int
    crc32: int
    token_count: int = 0
    vector_count: int = 0
    payload_crc32: int | None = None  # v3; None in v1 and v2
    flags: int = 0

    @property
    def kind_name(self) -> str:
        return kinds.get(self.kind).NAME


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


# -- writing ------------------------------------------------------------------------------


def pack_header(h: Header) -> bytes:
    """The header's bytes in format v3, checked by the reader's own rules."""
    if h.version != 3:
        raise InternalError("lmzip bug: lmzip writes format version 3 only")
    model_id, revision = h.model_id.encode("utf-8"), h.revision.encode("utf-8")
    fields = [MAGIC, 3, 0, 0, h.compatible_flags, h.model_source, h.compute_dtype, h.original_size,
              h.content_sha256, h.segment_count, h.hidden_size, h.vectors_per_segment, len(h.prefix),
              h.margin, h.tokenizer_sha256, h.weights_sha256, len(model_id), len(revision)]
    if max(len(model_id), len(revision), len(h.prefix)) > 0xFFFF:
        raise LimitError("model ID, revision or prefix too long for the header")
    fields[3] = _HEADER_V3.size + len(model_id) + len(revision) + _TOKEN.size * len(h.prefix) + _CRC.size
    body = (_HEADER_V3.pack(*fields) + model_id + revision
            + b"".join(_TOKEN.pack(t & 0xFFFFFFFF) for t in h.prefix))
    packed = body + _CRC.pack(crc32(body))
    if parse_header(memoryview(packed)) != h:  # every check the reader makes, on what we write
        raise HeaderError("lmzip bug: the header does not read back as written")
    return packed


def _pack_entry(s: Segment) -> bytes:
    return _ENTRY.pack(s.kind, s.flags, s.vector_count, s.token_count, s.original_length,
                       s.payload_length, s.payload_offset, s.crc32, s.payload_crc32 or 0)


class ArchiveWriter:
    """Collects coded segments as they are made and writes the archive at the end.

    The header and table come first in the file but are known last, so payloads
    wait in a spooled temporary file: memory stays bounded however long the
    input is, and the table costs 32 bytes a segment.
    """

    SPOOL_IN_MEMORY = 16 << 20

    def __init__(self):
        self._spool = tempfile.SpooledTemporaryFile(max_size=self.SPOOL_IN_MEMORY)
        self._entries: list[Segment] = []  # payload offsets are set in finish()

    def add(self, segment: kinds.CodedSegment) -> None:
        if segment.payload is None:
            raise InternalError("lmzip bug: a raw piece reached the writer uncoded")
        if len(segment.data) > MAX_SEGMENT_BYTES:
            raise LimitError(f"segment of {len(segment.data)} bytes is over the {MAX_SEGMENT_BYTES}-byte limit")
        self._spool.write(segment.payload)
        self._entries.append(Segment(segment.kind, len(segment.data), len(segment.payload), 0,
                                     crc32(segment.data), segment.token_count, segment.vector_count,
                                     crc32(segment.payload)))

    @property
    def segment_count(self) -> int:
        return len(self._entries)

    def finish(self, out: BinaryIO, header: Header) -> int:
        """Write the whole archive to `out`; return the number of bytes written."""
        header_bytes = pack_header(header)
        offset = len(header_bytes) + ENTRY_SIZE * len(self._entries) + _CRC.size
        table = bytearray()
        for i, entry in enumerate(self._entries):
            entry = Segment(**{**entry.__dict__, "payload_offset": offset})
            _check_entry(i, entry, header)
            table += _pack_entry(entry)
            offset += entry.payload_length
        if sum(e.original_length for e in self._entries) != header.original_size:
            raise SegmentTableError("lmzip bug: the segments do not add up to the original size")
        out.write(header_bytes)
        out.write(table)
        out.write(_CRC.pack(crc32(table)))
        self._spool.seek(0)
        while chunk := self._spool.read(1 << 20):
            out.write(chunk)
        self._spool.close()
        return offset


# -- reading ------------------------------------------------------------------------------


def _need(data: memoryview, end: int, what: str) -> None:
    if len(data) < end:
        raise TruncatedError(f"truncated archive: {len(data)} bytes, too short for {what} ({end} bytes)")


def _damaged(problem: str, error=HeaderError):
    raise error(f"damaged header: {problem}")


def parse_header(data: memoryview) -> Header:
    n = len(data)
    if n < len(MAGIC) or bytes(data[: len(MAGIC)]) != MAGIC:
        if n < len(MAGIC) and MAGIC.startswith(bytes(data)):
            raise TruncatedError(f"truncated archive: {n} bytes, shorter than the magic number")
        raise NotLmzError("not an lmzip archive (bad magic number)")
    _need(data, 16, "the header's fixed fields")
    (version,) = struct.unpack_from("<H", data, 8)
    (header_size,) = struct.unpack_from("<I", data, 12)
    # Any version keeps these four fields here and ends its header with a CRC-32 of the rest,
    # so a header checksum that holds tells a newer format from damage.
    if not 16 + _CRC.size <= header_size <= MAX_ANY_HEADER_SIZE:
        _damaged(f"header size {header_size} is outside [{16 + _CRC.size}, {MAX_ANY_HEADER_SIZE}]")
    _need(data, header_size, "the header")
    (stored_crc,) = _CRC.unpack_from(data, header_size - _CRC.size)
    if crc32(data[: header_size - _CRC.size]) != stored_crc:
        _damaged("header checksum mismatch")
    if version not in READABLE_VERSIONS:
        raise UnsupportedVersionError(
            f"unsupported format version {version} (this lmzip reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); a newer lmzip may read it")
    header = _parse_v3(data, header_size) if version == 3 else _parse_legacy(data, header_size, version)
    _check_fields(header)
    return header


def _strings(data: memoryview, at: int, *lengths: int) -> list[str]:
    out = []
    for length in lengths:
        try:
            out.append(bytes(data[at : at + length]).decode("utf-8"))
        except UnicodeDecodeError:
            _damaged("model ID or revision is not UTF-8")
        at += length
    return out


def _tokens(data: memoryview, at: int, count: int) -> tuple[int, ...]:
    return tuple(_TOKEN.unpack_from(data, at + _TOKEN.size * i)[0] for i in range(count))


def _parse_v3(data: memoryview, header_size: int) -> Header:
    if header_size < MIN_HEADER_SIZE:
        _damaged(f"header size {header_size} is below the {MIN_HEADER_SIZE} bytes of version 3")
    (_, _, incompatible, _, compatible, source, dtype, original_size, content_sha, segment_count, hidden_size,
     vectors, prefix_len, margin, tok_sha, weights_sha, id_len, rev_len) = _HEADER_V3.unpack_from(data, 0)
    if incompatible & ~KNOWN_INCOMPATIBLE_FLAGS:
        raise UnsupportedError(f"unsupported feature: incompatible header flags 0x{incompatible:04x} "
                               "(written by a newer lmzip)")
    if id_len > MAX_MODEL_ID_BYTES or rev_len > MAX_REVISION_BYTES or prefix_len > MAX_PREFIX_TOKENS:
        _damaged(f"model ID ({id_len} bytes), revision ({rev_len}) or prefix ({prefix_len} tokens) is over "
                 f"its limit ({MAX_MODEL_ID_BYTES}, {MAX_REVISION_BYTES}, {MAX_PREFIX_TOKENS})", LimitError)
    known = _HEADER_V3.size + id_len + rev_len + _TOKEN.size * prefix_len + _CRC.size
    extension = header_size - known
    if extension < 0 or (extension and not compatible):
        _damaged("model ID, revision and prefix lengths disagree with the header size")
    if extension > MAX_HEADER_EXTENSION:
        _damaged(f"{extension} bytes of header extension is over the limit of {MAX_HEADER_EXTENSION}", LimitError)
    if source not in SOURCE_NAMES:
        _damaged(f"unknown model source code {source}")
    model_id, revision = _strings(data, _HEADER_V3.size, id_len, rev_len)
    if (source == SOURCE_NONE) != (not model_id) or (revision and source != SOURCE_HUB):
        _damaged("the model source disagrees with the model ID or revision")
    prefix = _tokens(data, _HEADER_V3.size + id_len + rev_len, prefix_len)
    return Header(original_size, bytes(content_sha), segment_count, model_id, bytes(tok_sha), bytes(weights_sha),
                  hidden_size, vectors, dtype, margin, prefix, source, revision, compatible, 3)


def _parse_legacy(data: memoryview, header_size: int, version: int) -> Header:
    if not LEGACY_MIN_HEADER_SIZE <= header_size <= LEGACY_MAX_HEADER_SIZE:
        _damaged(f"header size {header_size} is outside [{LEGACY_MIN_HEADER_SIZE}, {LEGACY_MAX_HEADER_SIZE}]")
    layout = _LEGACY_HEADERS[version]
    (_, _, flags, _, original_size, content_sha, segment_count, hidden_size, vectors, dtype,
     reserved, margin, tok_sha, weights_sha, model_id_len, *rest) = layout.unpack_from(data, 0)
    prefix_len = rest[0] if rest else 0
    if flags or reserved:
        _damaged("reserved bits are set")
    if prefix_len > MAX_PREFIX_TOKENS:
        _damaged(f"{prefix_len} prefix tokens is over the limit of {MAX_PREFIX_TOKENS}", LimitError)
    if header_size != layout.size + model_id_len + _TOKEN.size * prefix_len + _CRC.size:
        _damaged("model ID and prefix lengths disagree with the header size")
    (model_id,) = _strings(data, layout.size, model_id_len)
    prefix = _tokens(data, layout.size + model_id_len, prefix_len)
    return Header(original_size, bytes(content_sha), segment_count, model_id, bytes(tok_sha), bytes(weights_sha),
                  hidden_size, vectors, dtype, margin, prefix, SOURCE_LEGACY if model_id else SOURCE_NONE,
                  version=version)


def _check_fields(h: Header) -> None:
    """The field rules every version shares."""
    if h.compute_dtype not in DTYPE_NAMES:
        _damaged(f"unknown compute dtype code {h.compute_dtype}")
    if h.segment_count > MAX_SEGMENTS:
        _damaged(f"{h.segment_count} segments is over the limit of {MAX_SEGMENTS}", LimitError)
    if h.original_size > MAX_ORIGINAL_SIZE or h.original_size > h.segment_count * MAX_SEGMENT_BYTES:
        _damaged(f"original size {h.original_size} is impossible for {h.segment_count} segments", LimitError)
    if h.hidden_size > MAX_HIDDEN_SIZE or h.vectors_per_segment > MAX_VECTORS_PER_SEGMENT:
        _damaged(f"hidden size {h.hidden_size} or vector count {h.vectors_per_segment} over the limit", LimitError)
    if h.has_model and (h.hidden_size == 0 or h.compute_dtype == DTYPE_NONE):
        _damaged("a model is named but its hidden size or dtype is missing")
    if not h.has_model and (h.hidden_size or h.vectors_per_segment or h.compute_dtype or h.prefix
                            or any(h.tokenizer_sha256) or any(h.weights_sha256)):
        _damaged("model fields are set but no model is named")
    if h.margin != h.margin or h.margin < 0:  # NaN or negative
        _damaged("the margin is not a non-negative number")


def _check_entry(i: int, s: Segment, header: Header) -> None:
    def bad(problem: str):
        raise SegmentTableError(f"damaged segment table: segment {i}: {problem}")

    if header.version < 3 and (s.flags or s.payload_crc32):
        bad("reserved bits are set")
    if s.flags & ENTRY_INCOMPATIBLE_MASK & ~KNOWN_ENTRY_INCOMPATIBLE_FLAGS:
        raise UnsupportedError(f"unsupported feature: segment {i} has incompatible flags 0x{s.flags:02x} "
                               "(written by a newer lmzip)")
    if s.original_length > MAX_SEGMENT_BYTES:
        bad(f"original length {s.original_length} is over the limit of {MAX_SEGMENT_BYTES}")
    problem = kinds.get(s.kind).check_entry(s, header)
    if problem:
        bad(problem)


def parse(blob) -> Archive:
    """Parse and bound-check a whole archive held in memory (payload contents are not read)."""
    data = memoryview(blob).cast("B")
    header = parse_header(data)
    table_start = struct.unpack_from("<I", data, 12)[0]
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
         payload_crc) = _ENTRY.unpack_from(data, table_start + i * ENTRY_SIZE)
        s = Segment(kind, orig_len, pay_len, offset, crc, tokens, vectors,
                    payload_crc if header.version >= 3 else (payload_crc or None), flags)
        _check_entry(i, s, header)
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


def check_payload(archive: Archive, index: int) -> None:
    """A v3 payload's CRC-32 (no model needed); v1 and v2 have none to check."""
    s = archive.segments[index]
    if s.payload_crc32 is not None and crc32(archive.payload(index)) != s.payload_crc32:
        raise SegmentError(index, "payload checksum mismatch")


def check_payloads(archive: Archive) -> None:
    for i in range(len(archive.segments)):
        check_payload(archive, i)
