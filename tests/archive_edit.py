"""Editing archives field by field, for the format samples and the fuzz tests.

Each edit can recompute the checksum that guards the field, so that the damage
reaches the checks behind it. Fields are named as in SPEC.md, in the blob's own
format version.
"""

from __future__ import annotations

import struct

from lmzip.container import _CRC, _ENTRY, _HEADER_V1, _HEADER_V2, _HEADER_V3, ENTRY_SIZE, crc32

_LEGACY_FIELDS = ("magic", "version", "flags", "header_size", "original_size", "content_sha256",
                  "segment_count", "hidden_size", "vectors_per_segment", "compute_dtype", "reserved",
                  "margin", "tokenizer_sha256", "weights_sha256", "model_id_length")
HEADERS = {
    1: (_HEADER_V1, _LEGACY_FIELDS),
    2: (_HEADER_V2, _LEGACY_FIELDS + ("prefix_length",)),
    3: (_HEADER_V3, ("magic", "version", "incompatible_flags", "header_size", "compatible_flags",
                     "model_source", "compute_dtype", "original_size", "content_sha256", "segment_count",
                     "hidden_size", "vectors_per_segment", "prefix_length", "margin", "tokenizer_sha256",
                     "weights_sha256", "model_id_length", "revision_length")),
}
ENTRY_FIELDS = ("kind", "flags", "vector_count", "token_count", "original_length",
                "payload_length", "payload_offset", "crc32", "payload_crc32")
ENTRY_FORMATS = ("B", "B", "H", "I", "I", "I", "Q", "I", "I")
# Fields whose change moves the header's own layout (so the checksum lands elsewhere).
LAYOUT_FIELDS = ("model_id_length", "revision_length", "prefix_length")


def version_of(blob: bytes) -> int:
    return struct.unpack_from("<H", blob, 8)[0]


def header_fields(blob: bytes) -> tuple[str, ...]:
    return HEADERS[version_of(blob)][1]


def header_formats(blob: bytes) -> list[str]:
    """struct codes of the header's fields, in order (for drawing values)."""
    layout = HEADERS[version_of(blob)][0]
    return [code for code in _split(layout.format)]


def _split(fmt: str):
    count = ""
    for ch in fmt.lstrip("<"):
        if ch.isdigit():
            count += ch
        else:
            yield (count + ch) if ch == "s" else ch
            if ch != "s":
                for _ in range(int(count or 1) - 1):
                    yield ch
            count = ""


def edit_header(blob: bytes, **changes) -> bytes:
    """Change header fields (in the blob's own layout) and recompute the header checksum."""
    layout, names = HEADERS[version_of(blob)]
    fields = dict(zip(names, layout.unpack_from(blob, 0)))
    unknown = set(changes) - set(fields)
    assert not unknown, f"no such header fields in this version: {unknown}"
    fields.update(changes)
    size = struct.unpack_from("<I", blob, 12)[0]  # the layout stays: only values change
    body = bytearray(blob[: size - _CRC.size])
    layout.pack_into(body, 0, *fields.values())
    return bytes(body) + _CRC.pack(crc32(body)) + blob[size:]


def header_value(blob: bytes, name: str):
    layout, names = HEADERS[version_of(blob)]
    return dict(zip(names, layout.unpack_from(blob, 0)))[name]


def table_span(blob: bytes) -> tuple[int, int]:
    start = struct.unpack_from("<I", blob, 12)[0]
    count = header_value(blob, "segment_count")
    return start, start + count * ENTRY_SIZE


def edit_entry(blob: bytes, index: int, **changes) -> bytes:
    """Change one segment-table entry and recompute the table checksum."""
    start, end = table_span(blob)
    out = bytearray(blob)
    at = start + index * ENTRY_SIZE
    fields = dict(zip(ENTRY_FIELDS, _ENTRY.unpack_from(out, at)))
    fields.update(changes)
    _ENTRY.pack_into(out, at, *fields.values())
    _CRC.pack_into(out, end, crc32(out[start:end]))
    return bytes(out)


def flip(blob: bytes, offset: int, mask: int = 1) -> bytes:
    out = bytearray(blob)
    out[offset] ^= mask
    return bytes(out)


def payload_offset(blob: bytes, index: int) -> int:
    start, _ = table_span(blob)
    return _ENTRY.unpack_from(blob, start + index * ENTRY_SIZE)[6]


def kinds(blob: bytes) -> list[str]:
    """Each segment's kind, by name, as lmzip.inspect reports it."""
    import lmzip

    return [s["kind"] for s in lmzip.inspect(blob)["segments"]]


def entries(blob: bytes) -> list[dict]:
    start, end = table_span(blob)
    return [dict(zip(ENTRY_FIELDS, _ENTRY.unpack_from(blob, at))) for at in range(start, end, ENTRY_SIZE)]


def boundaries(blob: bytes) -> list[int]:
    """Every offset where a structure starts or ends."""
    start, end = table_span(blob)
    points = {0, 8, 10, 12, 16, start - 4, start, end, end + 4, len(blob)}
    points.update(range(start, end, ENTRY_SIZE))
    for e in entries(blob):
        points.update({e["payload_offset"], e["payload_offset"] + e["payload_length"]})
    return sorted(p for p in points if 0 <= p <= len(blob))
