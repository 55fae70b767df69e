"""Segment kind 4, lm-packed: a run of lm chunks in one segment, under one table entry.

A table entry costs 32 bytes, 3 % of a 2047-token chunk's payload on alice29.txt (about
1,050 bytes); packed, a chunk costs a few bytes of the segment's own chunk table. Each chunk
is coded exactly as a kind 3 chunk (arithmetic /2, which equals /1 at 2048 positions or
fewer), after the prefix and independent of the others, so chunks decode in batches as
before. The segment's crc32 covers all its bytes (SPEC.md, "lm-packed payloads").
"""

from __future__ import annotations

from ..errors import InternalError, SegmentError
from ..limits import LM_LONG_POSITIONS
from . import lm

KIND = 4
NAME = "lm-packed"
NEEDS_MODEL = True
MAX_VARINT_BYTES = 5  # a count or length is below 2**32
# Per chunk beyond its coded tokens: the coder's slack and two varints of the chunk table.
CHUNK_OVERHEAD = lm.PAYLOAD_SLACK + 2 * MAX_VARINT_BYTES


def max_payload(token_count: int) -> int:
    """The most bytes a payload of `token_count` tokens may take: the chunk count, then per chunk
    its bound and two varints, at most one chunk per token."""
    return (lm.MAX_PAYLOAD_BYTES_PER_TOKEN + CHUNK_OVERHEAD) * token_count + MAX_VARINT_BYTES


def room(prefix) -> int:
    """The most tokens a chunk may hold after `prefix` (arithmetic /2's positions)."""
    return LM_LONG_POSITIONS - len(prefix)


def check_entry(entry, header) -> str | None:
    return entry_problem(entry, header, NAME)


def entry_problem(entry, header, name: str, extra: int = 0) -> str | None:
    """What is wrong with the entry of a segment of packed chunks (kind `name`, whose payload may
    have `extra` bytes before the chunk table), or None."""
    if not header.has_model or not header.prefix:
        return f"an {name} segment in an archive that names no model or prefix token"
    if entry.vector_count:
        return f"an {name} segment has a vector count"
    if not 1 <= entry.token_count <= entry.original_length:
        return f"token count {entry.token_count} is not between 1 and the segment's bytes"
    if entry.payload_length > max_payload(entry.token_count) + extra:
        return f"payload of {entry.payload_length} bytes is too long for {entry.token_count} tokens"
    return None


def work(entry) -> int:
    return entry.token_count


def varint(n: int) -> bytes:
    """n as unsigned LEB128 (7 bits a byte, low first; the high bit says another byte follows)."""
    if not 0 <= n < 1 << 32:
        raise ValueError(f"{n} does not fit a varint of lmzip's chunk table")
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(data: bytes, at: int) -> tuple[int, int]:
    """(value, next offset) of the varint at `at`; ValueError if cut off, too long or not minimal."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if at + i >= len(data):
            raise ValueError("the chunk table is cut off")
        byte = data[at + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and not byte:
                raise ValueError("a varint of the chunk table is not in its shortest form")
            if value >= 1 << 32:
                raise ValueError("a varint of the chunk table is over 2**32")
            return value, at + i + 1
    raise ValueError("a varint of the chunk table is over 5 bytes")


def pack(payloads: list[bytes], counts: list[int]) -> bytes:
    """The chunk table (count, each chunk's tokens, each chunk's payload length), then the payloads."""
    table = [varint(len(payloads)), *map(varint, counts), *(varint(len(p)) for p in payloads)]
    return b"".join(table + list(payloads))


def unpack(payload: bytes, token_count: int, room: int, group_positions: int | None = None
           ) -> tuple[list[bytes], list[int]]:
    """(payloads, token counts) of a packed payload whose entry says `token_count` tokens, each chunk
    at most `room` tokens; with `group_positions` (kind 6: the prefix's length), at most as many
    chunks as one group holds (mixing.group_limit); ValueError naming what is wrong."""
    n, at = read_varint(payload, 0)
    if not 1 <= n <= token_count:
        raise ValueError(f"{n} chunks for {token_count} tokens")
    counts, lengths = [], []
    for _ in range(n):
        count, at = read_varint(payload, at)
        if not 1 <= count <= room:
            raise ValueError(f"a chunk of {count} tokens is outside [1, {room}]")
        counts.append(count)
    for count in counts:
        length, at = read_varint(payload, at)
        if length > lm.MAX_PAYLOAD_BYTES_PER_TOKEN * count + lm.PAYLOAD_SLACK:
            raise ValueError(f"a chunk payload of {length} bytes is too long for {count} tokens")
        lengths.append(length)
    if sum(counts) != token_count:
        raise ValueError(f"the chunks hold {sum(counts)} tokens, the entry says {token_count}")
    if group_positions is not None:
        from ..exact.mixing import group_limit

        most = group_limit(group_positions + max(counts))
        if n > most:
            raise ValueError(f"{n} chunks in one group, more than the {most} its longest chunk allows")
    if at + sum(lengths) != len(payload):
        raise ValueError(f"the chunks take {sum(lengths)} bytes after the table, the payload has {len(payload) - at}")
    chunks = []
    for length in lengths:
        chunks.append(payload[at:at + length])
        at += length
    return chunks, counts


def encode(datas: list[bytes], counts: list[int], payloads: list[bytes], prefix, kind: int = KIND, name: str = NAME,
           grouped: bool = False):
    """One segment of the chunks; the writer refuses what a reader would (every bound of `unpack`)."""
    from . import CodedSegment

    tokens, payload = sum(counts), pack(payloads, counts)
    try:
        unpack(payload, tokens, room(prefix), len(prefix) if grouped else None)
    except ValueError as e:
        raise InternalError(f"lmzip bug: an {name} segment a reader would refuse: {e}") from None
    return CodedSegment(kind, b"".join(datas), payload, token_count=tokens,
                        stats={"tokens": tokens, "chunks": len(counts)})


def _chunks(job, most: int, name: str, group_positions: int | None = None) -> tuple[list[bytes], list[int]]:
    try:
        return unpack(job.payload, job.entry.token_count, most, group_positions)
    except ValueError as e:
        raise SegmentError(job.index, f"damaged {name} payload: {e}") from None


def decode(jobs, ctx, arithmetic: int = 2, name: str = NAME, grouped: bool = False) -> list[bytes]:
    """Each job's chunks, decoded together under `arithmetic` (2 for this kind; kind 5 passes 3);
    `grouped` (kind 6): each job's chunks coded with their shared counts mixed in."""
    from .memory import checked_length, detokenize

    most = room(ctx.header.prefix)
    group = len(ctx.header.prefix) if grouped else None
    chunk_tokens = lm.job_chunk_tokens(jobs, ctx, LM_LONG_POSITIONS, lambda job: _chunks(job, most, name, group),
                                       arithmetic, grouped)
    return [checked_length(job, b"".join(detokenize(ctx.model, ids) for ids in chunks))
            for job, chunks in zip(jobs, chunk_tokens)]
