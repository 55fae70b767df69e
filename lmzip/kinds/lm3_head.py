"""Segment kind 7, lm3-head: kind 6's group of chunks, the others primed with the first's head.

A chunk's first tokens cost the most: the model starts it knowing nothing of the text (8 bits a
token over its first 16 on alice29.txt, 4 past the 512th). In a kind 7 segment every chunk but the
first is coded after the prefix and the first H tokens of the segment's first chunk (its head), so
each starts knowing what the text is like. The group decodes in lockstep as kind 6's does: for its
first H steps a primed row takes the first chunk's token of that step as its input instead of
decoding one, so the head costs H steps of the batch and no serial phase. The counts shared by the
group are kind 6's, the head's tokens counted once, as the first chunk's (SPEC.md, "lm3-head
payloads (kind 7)").

Payload: a varint H, then kind 4's chunk table and chunks.
"""

from __future__ import annotations

from ..errors import InternalError, SegmentError
from ..limits import LM_LONG_POSITIONS
from . import lm, lm_packed

KIND = 7
NAME = "lm3-head"
NEEDS_MODEL = True
ARITHMETIC = 3
HEAD_TOKENS = 128  # what the writer takes, where the chunks leave room (BENCHMARKS.md)
work = lm.work


def head_length(prefix, counts, most: int = HEAD_TOKENS) -> int:
    """The head a group of chunks with these token counts gets: at most `most` tokens and the first
    chunk's, short enough that every other chunk fits its positions after it, and that the steps
    feeding it to the other chunks are at most the group's tokens (a reader bounds work by
    those); 0 for a lone chunk."""
    if len(counts) < 2:
        return 0
    fits = LM_LONG_POSITIONS - len(prefix) - max(counts[1:])
    return max(0, min(most, counts[0], fits, sum(counts) // (len(counts) - 1)))


def check_entry(entry, header) -> str | None:
    from ..exact.mixing import MAX_GROUP

    problem = lm_packed.entry_problem(entry, header, NAME, extra=lm_packed.MAX_VARINT_BYTES)
    if problem is None and entry.token_count > MAX_GROUP * lm_packed.room(header.prefix):
        problem = f"{entry.token_count} tokens are more than {MAX_GROUP} chunks hold"
    return problem


def pack(head: int, payloads: list[bytes], counts: list[int]) -> bytes:
    return lm_packed.varint(head) + lm_packed.pack(payloads, counts)


def unpack(payload: bytes, token_count: int, prefix) -> tuple[int, list[bytes], list[int]]:
    """(head, payloads, token counts); ValueError naming what is wrong: kind 6's bounds, with the
    group's positions counted after the head, and a head the chunks leave room for."""
    from ..exact.mixing import group_limit

    head, at = lm_packed.read_varint(payload, 0)
    payloads, counts = lm_packed.unpack(payload[at:], token_count, lm_packed.room(prefix))
    if head and head != head_length(prefix, counts, head):
        raise ValueError(f"a head of {head} tokens does not fit (the first chunk's tokens, the others' "
                         f"positions after it, its steps within the group's tokens, and none for a lone chunk)")
    most = group_limit(len(prefix) + max(counts[0], head + max(counts[1:], default=0)))
    if len(counts) > most:
        raise ValueError(f"{len(counts)} chunks in one group, more than the {most} its longest row allows")
    return head, payloads, counts


def encode(datas: list[bytes], counts: list[int], payloads: list[bytes], prefix, head: int):
    """One segment of the group's chunks; the writer refuses what a reader would."""
    from . import CodedSegment

    tokens, payload = sum(counts), pack(head, payloads, counts)
    try:
        unpack(payload, tokens, prefix)
    except ValueError as e:
        raise InternalError(f"lmzip bug: an {NAME} segment a reader would refuse: {e}") from None
    return CodedSegment(KIND, b"".join(datas), payload, token_count=tokens,
                        stats={"tokens": tokens, "chunks": len(counts)})


def parsed(job, prefix, unpack=unpack, name: str = NAME):
    """`unpack` of the job's payload (this kind's, or kind 8's), SegmentError if it is damaged."""
    try:
        return unpack(job.payload, job.entry.token_count, prefix)
    except ValueError as e:
        raise SegmentError(job.index, f"damaged {name} payload: {e}") from None


def group_tokens(jobs, ctx, tables: dict) -> list[list[list[int]]]:
    """Each job's chunks' tokens, decoded in one batch; `tables`: (head, payloads, token counts) by job index."""
    return lm.job_chunk_tokens(jobs, ctx, LM_LONG_POSITIONS, lambda job: tables[job.index][1:], ARITHMETIC,
                               grouped=True, heads=[tables[job.index][0] for job in jobs])


def decode(jobs, ctx) -> list[bytes]:
    from .memory import checked_length, detokenize

    tables = {job.index: parsed(job, ctx.header.prefix) for job in jobs}
    return [checked_length(job, b"".join(detokenize(ctx.model, ids) for ids in chunks))
            for job, chunks in zip(jobs, group_tokens(jobs, ctx, tables))]
