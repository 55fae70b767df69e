"""Segment kind 3, lm-long: the lm kind's coding (lm.py) for chunks of up to 8192 positions.

Arithmetic `lmzip-exact-lm/2` (SPEC.md, "lm payloads"). A kind of its own so that a reader
that knows only arithmetic /1, which stops at 2048 positions, reports such a segment as
unsupported rather than damaged.
"""

from __future__ import annotations

from ..limits import LM_LONG_POSITIONS
from . import lm

KIND = 3
NAME = "lm-long"
NEEDS_MODEL = True
work = lm.work


def check_entry(entry, header) -> str | None:
    return lm.entry_problem(entry, header, LM_LONG_POSITIONS)


def decode(jobs, ctx) -> list[bytes]:
    from ..exact import MAX_POSITIONS
    from .memory import to_bytes

    return to_bytes(jobs, lm.token_lists(jobs, ctx, MAX_POSITIONS), ctx.model)
