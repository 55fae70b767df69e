"""What a segment being fitted does next: its first length, grow, salvage, shrink, escalate.

Plain functions of a segment's numbers and its stream (anything with the
`Stream` methods `length_at_least`, `length_at_most`, `ids`, `growing`,
`start`, `tokens_left`), apart from the tensors, so that each can be tested on
its own. The fit loop (fit.py) calls them only when a row has an event: it
verified its length in the float32 screen, or it ran out of steps.
"""

from __future__ import annotations

from typing import Sequence

import torch


def first_length(stream, start_tokens: int) -> int | None:
    """The length a new segment first aims at; None when no valid length starts here (zstd)."""
    if stream.growing:
        n = stream.length_at_least(min(start_tokens, len(stream.ids)))
    else:
        n = len(stream.ids)
    return n if n is not None else stream.length_at_most(len(stream.ids))


def tail_vectors(stream, k: int, held_tokens: int, held_vectors: int, start_tokens: int) -> int:
    """K for a grown stream's next segment. Near its end K vectors would hold far more than is
    left, and a segment's vectors are stored whole: the tail gets as many as the stream's density
    so far says it needs (up to a quarter vector's worth over is left to the fit to hold), and at
    most half when no more than the first length is left."""
    if not stream.growing or stream.start == 0:
        return k
    left, base = stream.tokens_left, k
    if held_vectors:
        # ceil(left / density - 1/4), density = held_tokens / held_vectors
        k = min(k, max(1, -(-(4 * left * held_vectors - held_tokens) // (4 * held_tokens))))
    if left <= start_tokens:
        k = min(k, max(1, base // 2))
    return k


def grown_length(stream, holding: int, best_n: int, grow_tokens: int) -> int | None:
    """A growing segment just verified `best_n` tokens and its vectors hold `holding`: the length
    to aim at next, past all that holds already; None when the stream has no longer one (close)."""
    n = stream.length_at_least(holding + grow_tokens) or stream.length_at_most(len(stream.ids))
    return n if n is not None and n > best_n else None


def salvaged_length(stream, holdings: Sequence[int], best_n: int) -> tuple[int, int] | None:
    """A growing segment out of patience: its vectors often hold more than the last verified
    length, just not the whole target. Of candidate vectors holding `holdings` leading tokens
    (float32 screen), (index, length) of the one giving the longest valid length, if it beats
    `best_n`; the first wins a tie. Without this, lengths landed on multiples of grow_tokens."""
    chosen = None
    for i, holding in enumerate(holdings):
        n = stream.length_at_most(holding)
        if n is not None and n > (chosen[1] if chosen else best_n):
            chosen = (i, n)
    return chosen


def shrunk_length(stream, n: int) -> int | None:
    """A growing segment that never verified: half the length, same vectors (None: give up)."""
    return stream.length_at_most(n // 2)


def escalated_vectors(k: int, vector_limit: int) -> int | None:
    """A fixed segment out of steps: twice the vectors, up to the limit (None: give up)."""
    more = min(2 * k, vector_limit)
    return more if more > k else None


def step_decisions(gap: torch.Tensor, valid: torch.Tensor, n: torch.Tensor, since: torch.Tensor,
                   max_steps: int, margin: float):
    """Per row, from one fit step's logit gaps (B, T): how many leading tokens hold by the margin,
    whether that covers the target length n (a candidate for the float32 screen), and whether the
    row is out of steps. Tensors on the batch's device: the caller reads them in one sync."""
    holds = ((gap >= margin) & valid).long().cumprod(1).sum(1)
    return holds, holds >= n, since >= max_steps
