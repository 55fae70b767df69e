"""Token counts shared by a group of chunks decoded in lockstep, mixed into the lm frequencies.

A chunk's model sees only its own context, so a name or a turn of phrase that an earlier part of
the text made common is news to every chunk again. The chunks of a group decode side by side,
one position per step, so at position p every chunk of the group may use the tokens of all of
them at positions below p. Counts of which token followed which one or two tokens there form a
second prediction, mixed linearly into the lm's integer frequencies with a weight per context
order and count (SPEC.md 1.7):

    F[t] = (64 - w) * f[t] + w * floor(n[t] * T / N)

f the lm frequencies, T their sum, n[t] the count of token t after the context and N the
context's count; integers throughout, so the encoder and the decoder compute the same F.
"""

from __future__ import annotations

from typing import Sequence

import torch

ONE = 64  # weights are in 64ths
# WEIGHTS[order - 1][min(floor(log2 N), 15)]: fitted on alice29.txt and asyoulik.txt together
# (tools/lm_mix_study.py lockstep, groups of 16); part of the format
WEIGHTS = ((1, 2, 2, 2, 2, 3, 4, 5, 6, 2, 0, 0, 0, 0, 0, 0),
           (4, 5, 6, 7, 7, 9, 8, 4, 3, 0, 0, 0, 0, 0, 0, 0))
MAX_GROUP = 16  # chunks in a group, decoded as one batch of rows
MAX_GROUP_POSITIONS = 16 * 2048  # chunks x (prefix + longest chunk): the key/value cache of one batch
MAX_VOCAB = 262_139  # 64 * V * (2**24 + 1) stays within the range coder's 2**48


def group_limit(positions: int) -> int:
    """The most chunks a group may hold whose longest chunk takes `positions` with the prefix."""
    return max(1, min(MAX_GROUP, MAX_GROUP_POSITIONS // positions))


def weight(order: int, seen: int) -> int:
    return WEIGHTS[order - 1][min(seen.bit_length() - 1, 15)]


class Counts:
    """Counts of (context, token) over the tokens added so far: order 2 (the two tokens before)
    and order 1 (the one before), within each chunk."""

    def __init__(self):
        self.next: dict[tuple[int, ...], dict[int, int]] = {}
        self.seen: dict[tuple[int, ...], int] = {}

    def add(self, before: Sequence[int], token: int) -> None:
        """Count `token` after the tokens `before` it in its chunk (the last two at most)."""
        for k in (1, 2):
            if len(before) >= k:
                ctx = tuple(before[-k:])
                after = self.next.setdefault(ctx, {})
                after[token] = after.get(token, 0) + 1
                self.seen[ctx] = self.seen.get(ctx, 0) + 1

    def context(self, before: Sequence[int]) -> tuple[int, tuple[tuple[int, int], ...], int] | None:
        """(order, (token, count) of the tokens after it in token order, their sum) of the longest
        context of `before` counted so far, or None where there is none or its weight is 0 (so at
        most 1023 tokens to sort): a snapshot, unchanged by later `add`s."""
        for k in (2, 1):
            if len(before) >= k:
                ctx = tuple(before[-k:])
                if ctx in self.seen:
                    if not weight(k, self.seen[ctx]):
                        return None
                    return k, tuple(sorted(self.next[ctx].items())), self.seen[ctx]
        return None


def additions(after, seen: int, total: int, w: int) -> tuple[list[int], list[int]]:
    """(tokens, w * floor(n * total / seen)) of the counted (token, n), in token order."""
    return [t for t, _ in after], [w * (n * total // seen) for _, n in after]


def mix_rows(freqs: torch.Tensor, found: Sequence) -> None:
    """Mix each row's counts (Counts.context's answer, or None) into the (B, V) int64 frequencies,
    in place, with a few tensor operations for the whole batch."""
    weights = [(row, weight(hit[0], hit[2]), hit) for row, hit in enumerate(found) if hit is not None]
    weights = [(row, w, hit) for row, w, hit in weights if w]
    if not weights:
        return
    totals = freqs.sum(dim=-1).tolist()  # before mixing: T of each row
    factors = [1] * freqs.shape[0]
    at, adds = [], []
    vocab = freqs.shape[1]
    for row, w, (_, after, seen) in weights:
        factors[row] = ONE - w
        tokens, values = additions(after, seen, totals[row], w)
        at += [row * vocab + t for t in tokens]
        adds += values
    device = freqs.device
    freqs.mul_(torch.tensor(factors, dtype=torch.int64, device=device)[:, None])
    freqs.view(-1).index_add_(0, torch.tensor(at, dtype=torch.long, device=device),
                              torch.tensor(adds, dtype=torch.int64, device=device))


def mix_symbol(cum: int, freq: int, total: int, token: int, found) -> tuple[int, int, int]:
    """(cum, freq, total) of `token` under the mixed frequencies, from its lm ones: the same
    numbers as its row of mix_rows' would give."""
    if found is None:
        return cum, freq, total
    order, after, seen = found
    w = weight(order, seen)
    if not w:
        return cum, freq, total
    tokens, adds = additions(after, seen, total, w)
    below = sum(a for t, a in zip(tokens, adds) if t < token)
    own = sum(a for t, a in zip(tokens, adds) if t == token)
    return (ONE - w) * cum + below, (ONE - w) * freq + own, (ONE - w) * total + sum(adds)


def group_contexts(chunks: Sequence[Sequence[int]], row: int, head: int = 0):
    """For chunk `row` of a group, at each of its positions: Counts.context of the tokens before it,
    over the group's tokens at positions below it. With a `head` (kind 7), each chunk but the first
    follows the first chunk's first `head` tokens: positions count from the head's start, and the
    head's tokens are counted once, as the first chunk's."""
    seqs = [list(chunks[0])] + [list(chunks[0][:head]) + list(c) for c in chunks[1:]] if chunks else []
    starts = [0] + [head] * (len(chunks) - 1)
    counts = Counts()
    seq = seqs[row]
    for p in range(len(seq)):
        if p:
            for own, first in zip(seqs, starts):
                if first <= p - 1 < len(own):
                    counts.add(own[max(0, p - 3):p - 1], own[p - 1])
        if p >= starts[row]:
            yield counts.context(seq[max(0, p - 2):p])
