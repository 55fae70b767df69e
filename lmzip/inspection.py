"""Reading an archive without its model: its description, and its integrity.

Nothing here needs torch or a model, so `lmzip info` and `lmzip test --no-model`
answer in a fraction of a second.
"""

from __future__ import annotations

from . import container, kinds
from .errors import InputError, SegmentError


def archive_bytes(blob):
    """`blob` if it is bytes-like; an archive comes as bytes, never as a path or a file."""
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return blob
    raise InputError(f"lmzip decodes an archive given as bytes, not {type(blob).__name__}")


def decode_work(archive: container.Archive) -> int:
    """The model steps decoding the archive costs (tokens to generate), from its table alone."""
    return sum(kinds.get(s.kind).work(s) for s in archive.segments)


def check(blob) -> container.Archive:
    """Integrity without the model: structure, limits, every payload's CRC-32 (v3), and what a
    kind can check in a payload on its own (memory: finite vectors)."""
    archive = container.parse(archive_bytes(blob))
    container.check_payloads(archive)
    for i, s in enumerate(archive.segments):
        checker = getattr(kinds.get(s.kind), "check_payload", None)
        problem = checker(archive.payload(i), s) if checker else None
        if problem:
            raise SegmentError(i, problem)
    return archive


def inspect(blob) -> dict:
    """Describe an archive without decoding it: header fields and the segment table."""
    archive = container.parse(archive_bytes(blob))
    h = archive.header
    return {
        "format_version": h.version,
        "original_size": h.original_size,
        "archive_size": len(archive.data),
        "content_sha256": h.content_sha256.hex(),
        "model_id": h.model_id or None,
        "model_source": h.source_name if h.has_model else None,
        "model_revision": h.revision or None,
        "tokenizer_sha256": h.tokenizer_sha256.hex() if h.has_model else None,
        "weights_sha256": h.weights_sha256.hex() if h.has_model else None,
        "hidden_size": h.hidden_size,
        "vectors_per_segment": h.vectors_per_segment,
        "compute_dtype": container.DTYPE_NAMES[h.compute_dtype],
        "margin": h.margin,
        "prefix_tokens": list(h.prefix),
        "decode_work": decode_work(archive),
        "segments": [
            {"index": i, "kind": s.kind_name, "original_length": s.original_length,
             "payload_length": s.payload_length, "token_count": s.token_count,
             "vector_count": s.vector_count, "crc32": f"{s.crc32:08x}",
             "payload_crc32": None if s.payload_crc32 is None else f"{s.payload_crc32:08x}"}
            for i, s in enumerate(archive.segments)
        ],
    }
