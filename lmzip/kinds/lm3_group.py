"""Segment kind 6, lm3-group: kind 5's chunks, each token's frequencies mixed with counts shared
by the segment's chunks.

The chunks of a segment (at most 16, and 16 x 2048 positions in all: mixing.group_limit) decode
in one batch, one position per step, so each may use what all of them held at earlier positions:
counts of the token after the last one or two tokens, mixed into the lm frequencies under
arithmetic /3 (lmzip/exact/mixing.py, SPEC.md 1.7). Chunks are no longer independent within a
segment, only across segments, and a group is one batch whatever batch size the caller asks for
(its bound keeps the cache within the 1.5 GB of a batch of kind 5). On alice29.txt 0.9 % smaller
than kind 5, on asyoulik.txt 1.2 % (BENCHMARKS.md).
"""

from __future__ import annotations

from . import lm, lm_packed

KIND = 6
NAME = "lm3-group"
NEEDS_MODEL = True
ARITHMETIC = 3
work = lm.work


def check_entry(entry, header) -> str | None:
    from ..exact.mixing import MAX_GROUP

    problem = lm_packed.entry_problem(entry, header, NAME)
    if problem is None and entry.token_count > MAX_GROUP * lm_packed.room(header.prefix):
        problem = f"{entry.token_count} tokens are more than {MAX_GROUP} chunks hold"
    return problem


def encode(datas: list[bytes], counts: list[int], payloads: list[bytes], prefix):
    return lm_packed.encode(datas, counts, payloads, prefix, kind=KIND, name=NAME, grouped=True)


def decode(jobs, ctx) -> list[bytes]:
    return lm_packed.decode(jobs, ctx, arithmetic=ARITHMETIC, name=NAME, grouped=True)
