"""Chunks of tokens to range-coded payloads under the exact model, and back.

A chunk is coded after the prefix tokens, each token under the frequencies
the exact model gives it from the prefix and the chunk's earlier tokens. The
encoder runs one whole-sequence pass per chunk; the decoder runs all chunks of
a batch in lockstep, one token per step with a key/value cache per row, which
gives the same frequencies bit for bit (forward.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..rangecoder import RangeDecoder, RangeEncoder
from ..sharding import deal, map_shards, map_shards_forked
from .forward import Cache, forward, frequencies
from .model import MAX_POSITIONS, ExactModel

FREQ_ROWS = 64  # positions whose frequency rows are built at once (each row is V int64)


def _check_lengths(exact: ExactModel, prefix: Sequence[int], counts: Sequence[int], positions: int) -> None:
    if not prefix:
        raise ValueError("the lm coder needs at least one prefix token")
    if any(not 0 <= t < exact.shape.vocab for t in prefix):
        raise ValueError("a prefix token is outside the vocabulary")
    limit = min(positions, MAX_POSITIONS) - len(prefix)
    for count in counts:
        if not 0 <= count <= limit:
            raise ValueError(f"a chunk of {count} tokens is outside 0..{limit}")


def _symbol_frequencies(exact: ExactModel, logits: torch.Tensor, symbols: torch.Tensor):
    """For logits (S, V) and the symbols coded under them (S,): (cum, freq, total) int64 lists."""
    cums, freqs, totals = [], [], []
    for start in range(0, logits.shape[0], FREQ_ROWS):
        f = frequencies(exact, logits[start:start + FREQ_ROWS])
        s = symbols[start:start + FREQ_ROWS, None]
        inclusive = torch.cumsum(f, dim=-1)
        freq = f.gather(1, s)[:, 0]
        cums += (inclusive.gather(1, s)[:, 0] - freq).tolist()
        freqs += freq.tolist()
        totals += inclusive[:, -1].tolist()
    return cums, freqs, totals


def chunk_logits(exact: ExactModel, chunk: Sequence[int], prefix: Sequence[int]) -> torch.Tensor:
    """(len(chunk), V) float32 logits of each token of the chunk, from one whole-sequence pass."""
    ids = torch.tensor([list(prefix) + list(chunk)], dtype=torch.long, device=exact.device)
    cache = Cache(exact.shape, 1, ids.shape[1], exact.device)
    logits = forward(exact, ids, cache)[0]
    return logits[len(prefix) - 1:-1]


def encode_chunks(exact: ExactModel, chunks: Sequence[Sequence[int]], prefix: Sequence[int],
                  positions: int = MAX_POSITIONS, threads: int = 1,
                  done: Callable[[int, bytes], None] | None = None) -> list[bytes]:
    """One range-coded payload per chunk of token ids, each at most `positions` with the prefix;
    chunks are dealt to up to `threads` CPU threads (the arithmetic is the same on any).
    `done(index, payload)` is called as each chunk is coded, from the thread that coded it."""
    prefix = tuple(int(t) for t in prefix)
    _check_lengths(exact, prefix, [len(c) for c in chunks], positions)
    if any(not 0 <= t < exact.shape.vocab for chunk in chunks for t in chunk):
        raise ValueError("a token is outside the vocabulary")

    def shard(indices: list[int]) -> list[bytes]:
        payloads = []
        for i in indices:
            payloads.append(_encode_chunk(exact, chunks[i], prefix))
            if done:
                done(i, payloads[-1])
        return payloads

    shards = deal([len(c) for c in chunks], max(1, min(threads, len(chunks))))
    return map_shards(shard, shards, len(chunks))


def _encode_chunk(exact: ExactModel, chunk: Sequence[int], prefix: tuple[int, ...]) -> bytes:
    encoder = RangeEncoder()
    if chunk:
        symbols = torch.tensor(list(chunk), dtype=torch.long, device=exact.device)
        for cum, freq, total in zip(*_symbol_frequencies(exact, chunk_logits(exact, chunk, prefix), symbols)):
            encoder.encode(cum, freq, total)
    return encoder.finish()


def decode_chunks(exact: ExactModel, payloads: Sequence[bytes], token_counts: Sequence[int],
                  prefix: Sequence[int], batch_size: int = 64, positions: int = MAX_POSITIONS,
                  threads: int = 1) -> list[list[int]]:
    """The token ids of each payload; raises ValueError on a payload the coder cannot follow.

    Chunks are dealt to up to `threads` CPU cores (forked processes of one thread where the
    platform allows, else threads), and each runs its chunks `batch_size` at a time (longest
    first, so a batch's rows finish close together);
    a damaged payload decodes to wrong tokens or raises ValueError, never loops: each row stops
    after its token count.
    """
    prefix = tuple(int(t) for t in prefix)
    if len(payloads) != len(token_counts):
        raise ValueError("one token count per payload")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    _check_lengths(exact, prefix, token_counts, positions)
    shards = deal(token_counts, max(1, min(threads, len(payloads))))
    # processes, not threads: a step is thousands of small operations, and threads queue on the GIL
    return map_shards_forked(lambda indices: _decode_shard(exact, [payloads[i] for i in indices],
                                                           [token_counts[i] for i in indices], prefix,
                                                           batch_size),
                             shards, len(payloads))


def _decode_shard(exact: ExactModel, payloads, counts, prefix, batch_size: int) -> list[list[int]]:
    order = sorted(range(len(payloads)), key=lambda i: -counts[i])
    out: list[list[int]] = [[] for _ in payloads]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for i, tokens in zip(rows, _decode_batch(exact, [payloads[i] for i in rows],
                                                  [counts[i] for i in rows], prefix)):
            out[i] = tokens
    return out


def _decode_batch(exact: ExactModel, payloads, counts, prefix) -> list[list[int]]:
    device = exact.device
    decoders = [RangeDecoder(p) for p in payloads]
    tokens: list[list[int]] = [[] for _ in payloads]
    active = [i for i, n in enumerate(counts) if n > 0]
    if active:
        cache = Cache(exact.shape, len(active), len(prefix) + max(counts), device)
        step_ids = torch.tensor([list(prefix)] * len(active), dtype=torch.long, device=device)
    while active:
        logits = forward(exact, step_ids, cache)[:, -1]                      # (B, V)
        inclusive = torch.cumsum(frequencies(exact, logits), dim=-1)         # (B, V) int64, exact
        totals = inclusive[:, -1].tolist()
        targets = [decoders[i].target(total) for i, total in zip(active, totals)]
        target_t = torch.tensor(targets, dtype=torch.long, device=device)[:, None]
        symbols = torch.searchsorted(inclusive, target_t, right=True)        # first cum > target
        upper = inclusive.gather(1, symbols)[:, 0].tolist()
        symbols = symbols[:, 0]
        below = torch.where(symbols > 0, inclusive.gather(1, (symbols - 1).clamp(min=0)[:, None])[:, 0], 0)
        keep = []
        for row, (i, sym, lo, hi) in enumerate(zip(active, symbols.tolist(), below.tolist(), upper)):
            decoders[i].consume(lo, hi - lo)
            tokens[i].append(sym)
            if len(tokens[i]) < counts[i]:
                keep.append(row)
            else:
                decoders[i].finish()
        if len(keep) < len(active):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.select(index)
            symbols = symbols[index]
            active = [active[r] for r in keep]
        step_ids = symbols[:, None]
    for i, n in enumerate(counts):
        if n == 0:
            decoders[i].finish()
    return tokens
