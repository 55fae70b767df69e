"""Segment kind 8, lm3-text: kind 7's group of chunks, over text whose line breaks were made what
the model reads best (lmzip/linebreaks.py).

The chunks' tokens code their text with CRLF as LF (flag 1) and, with flag 2, with their soft
line breaks as spaces, which a break stream tells apart from the spaces that were spaces. On
alice29.txt (CRLF, wrapped at about 70 columns) the text has 11 % fewer tokens and the archive is
6 % smaller than kind 7's (BENCHMARKS.md). The writer writes kind 7 for a group that neither
changes (kind 6 without a head).

Payload: a flags byte (1 CRLF, 2 unwrap; at least one), with flag 2 a varint n and the n bytes of
the break stream, then kind 7's payload (SPEC.md, "lm3-text payloads (kind 8)").
"""

from __future__ import annotations

from .. import linebreaks
from ..errors import InternalError, SegmentError
from . import lm, lm3_head, lm_packed

KIND = 8
NAME = "lm3-text"
NEEDS_MODEL = True
ARITHMETIC = 3
work = lm.work
# Before kind 7's payload: the flags byte and the stream's varint; the stream takes at most 16 bits
# (its totals' bound) a soft space, at most one every other character, and its coder's flush
STREAM_SLACK = 16


def check_entry(entry, header) -> str | None:
    from ..exact.mixing import MAX_GROUP

    extra = 1 + 2 * lm_packed.MAX_VARINT_BYTES + entry.original_length + STREAM_SLACK
    problem = lm_packed.entry_problem(entry, header, NAME, extra=extra)
    if problem is None and entry.token_count > MAX_GROUP * lm_packed.room(header.prefix):
        problem = f"{entry.token_count} tokens are more than {MAX_GROUP} chunks hold"
    return problem


def pack(flags: int, stream: bytes, head: int, payloads: list[bytes], counts: list[int]) -> bytes:
    lines = bytes([flags]) + (lm_packed.varint(len(stream)) + stream if flags & linebreaks.UNWRAP else b"")
    return lines + lm3_head.pack(head, payloads, counts)


def unpack(payload: bytes, token_count: int, prefix) -> tuple[int, bytes, int, list[bytes], list[int]]:
    """(flags, break stream, head, payloads, token counts); ValueError naming what is wrong."""
    if not payload:
        raise ValueError("no line flags")
    flags, at, stream = payload[0], 1, b""
    if not flags or flags & ~linebreaks.FLAGS:
        raise ValueError(f"line flags {flags:#x} (1 CRLF, 2 unwrap; at least one)")
    if flags & linebreaks.UNWRAP:
        n, at = lm_packed.read_varint(payload, at)
        if at + n > len(payload):
            raise ValueError(f"a break stream of {n} bytes runs past the payload")
        stream, at = payload[at:at + n], at + n
    return (flags, stream, *lm3_head.unpack(payload[at:], token_count, prefix))


def encode(datas: list[bytes], counts: list[int], payloads: list[bytes], prefix, head: int, lines: int):
    """The group's segment under the `lines` flags that change its text, or None where none does (the
    writer refuses what a reader would)."""
    from . import CodedSegment

    texts = [d.decode("utf-8") for d in datas]
    flags, joined = group_lines(texts, lines)
    if not flags:
        return None
    if joined.texts != [linebreaks.coded(t, lines) for t in texts]:  # what the chunks' tokens were made from
        raise InternalError(f"lmzip bug: a group's line flags {flags} code other text than its chunks' {lines}")
    tokens, payload = sum(counts), pack(flags, joined.stream, head, payloads, counts)
    try:
        unpack(payload, tokens, prefix)
    except ValueError as e:
        raise InternalError(f"lmzip bug: an {NAME} segment a reader would refuse: {e}") from None
    return CodedSegment(KIND, b"".join(datas), payload, token_count=tokens,
                        stats={"tokens": tokens, "chunks": len(counts), "line_breaks": joined.breaks})


def group_lines(texts: list[str], lines: int):
    """The flags of `lines` that change these chunks' texts, and their join."""
    flags = lines & linebreaks.CRLF if any("\r\n" in t for t in texts) else 0
    if lines & linebreaks.UNWRAP:
        joined = linebreaks.join(texts, flags | linebreaks.UNWRAP)
        if joined.breaks:
            return flags | linebreaks.UNWRAP, joined
    return flags, linebreaks.join(texts, flags)


def decode(jobs, ctx) -> list[bytes]:
    from .memory import checked_length

    parsed = {job.index: lm3_head.parsed(job, ctx.header.prefix, unpack, NAME) for job in jobs}
    out = []
    for job, chunks in zip(jobs, lm3_head.group_tokens(jobs, ctx, {i: p[2:] for i, p in parsed.items()})):
        flags, stream = parsed[job.index][:2]
        texts = [ctx.model.tokenizer.decode(ids, clean_up_tokenization_spaces=False) for ids in chunks]
        coded = sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts)
        if coded > job.entry.original_length:  # restoring never shortens a text: refused before the walk
            raise SegmentError(job.index, f"decoded {coded} bytes of coded text, more than the segment's "
                                          f"{job.entry.original_length}")
        try:
            texts = linebreaks.restore(texts, flags, stream)
        except ValueError as e:
            raise SegmentError(job.index, f"damaged {NAME} payload: {e}") from None
        out.append(checked_length(job, "".join(texts).encode("utf-8", errors="surrogatepass")))
    return out
