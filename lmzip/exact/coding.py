"""Chunks of tokens to range-coded payloads under the exact model, and back.

A chunk is coded after the prefix tokens, each token under the frequencies
the exact model gives it from the prefix and the chunk's earlier tokens. The
encoder runs one whole-sequence pass per chunk; the decoder runs all chunks of
a batch in lockstep, one token per step with a key/value cache per row, which
gives the same frequencies bit for bit (forward.py).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch

from ..rangecoder import RangeDecoder, RangeEncoder
from ..sharding import beat, deal, map_shards, map_shards_forked
from .forward import Cache, decoding_cache, final_states, forward, frequencies, head
from .mixing import Counts, mix_rows, mix_symbol
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


def _heads(heads, n: int) -> list[tuple[int, ...]]:
    if heads is None:
        return [()] * n
    if len(heads) != n:
        raise ValueError("one head per chunk")
    return [tuple(int(t) for t in h) for h in heads]


def _symbol_frequencies(exact: ExactModel, logits: torch.Tensor, symbols: torch.Tensor):
    """For logits (S, V) and the symbols coded under them (S,): (cum, freq, total) int64 lists."""
    cums, freqs, totals = [], [], []
    for start in range(0, logits.shape[0], FREQ_ROWS):
        _add_symbols(exact, logits[start:start + FREQ_ROWS], symbols[start:start + FREQ_ROWS], cums, freqs, totals)
    return cums, freqs, totals


def _add_symbols(exact: ExactModel, logits: torch.Tensor, symbols: torch.Tensor, cums: list, freqs: list,
                 totals: list) -> None:
    """Append each symbol's (cum, freq, total) under its row of logits (S, V) to the lists."""
    f = frequencies(exact, logits)
    s = symbols[:, None]
    inclusive = torch.cumsum(f, dim=-1)
    freq = f.gather(1, s)[:, 0]
    cums += (inclusive.gather(1, s)[:, 0] - freq).tolist()
    freqs += freq.tolist()
    totals += inclusive[:, -1].tolist()


def chunk_logits(exact: ExactModel, chunk: Sequence[int], prefix: Sequence[int]) -> torch.Tensor:
    """(len(chunk), V) float32 logits of each token of the chunk, from one whole-sequence pass."""
    ids = torch.tensor([list(prefix) + list(chunk)], dtype=torch.long, device=exact.device)
    cache = Cache(exact.shape, 1, ids.shape[1], exact.device)
    logits = forward(exact, ids, cache)[0]
    return logits[len(prefix) - 1:-1]


def chunk_symbols(exact: ExactModel, chunk: Sequence[int], prefix: Sequence[int]):
    """(cum, freq, total) lists of the chunk's tokens, from one whole-sequence pass: chunk_logits'
    frequencies, the logits made FREQ_ROWS positions at a time rather than all at once (400 MB
    for 2,047 tokens, which the pass would fault in page by page)."""
    ids = torch.tensor([list(prefix) + list(chunk)], dtype=torch.long, device=exact.device)
    q, step = final_states(exact, ids, Cache(exact.shape, 1, ids.shape[1], exact.device))
    q, step = q[0, len(prefix) - 1:-1], step[0, len(prefix) - 1:-1]
    symbols = torch.tensor(list(chunk), dtype=torch.long, device=exact.device)
    cums, freqs, totals = [], [], []
    logits = torch.empty(min(FREQ_ROWS, len(chunk)), exact.shape.vocab, device=exact.device)
    for start in range(0, len(chunk), FREQ_ROWS):
        rows = slice(start, start + FREQ_ROWS)
        block = head(exact, q[rows], step[rows], out=logits[:symbols[rows].shape[0]])
        _add_symbols(exact, block, symbols[rows], cums, freqs, totals)
    return cums, freqs, totals


def encode_chunks(exact: ExactModel, chunks: Sequence[Sequence[int]], prefix: Sequence[int],
                  positions: int = MAX_POSITIONS, threads: int = 1,
                  done: Callable[[int, bytes], None] | None = None, contexts=None,
                  heads: Sequence[Sequence[int]] | None = None) -> list[bytes]:
    """One range-coded payload per chunk of token ids, each at most `positions` with the prefix;
    chunks are dealt to up to `threads` CPU threads (the arithmetic is the same on any).
    `done(index, payload)` is called as each chunk is coded, from the thread that coded it.
    `contexts`, one per chunk: a callable giving, per position, the shared counts to mix in
    (mixing.group_contexts), or None for the lm frequencies alone. `heads`, one per chunk: tokens
    its context has after the prefix and before its own (kind 7's head; empty for none)."""
    prefix = tuple(int(t) for t in prefix)
    heads = _heads(heads, len(chunks))
    _check_lengths(exact, prefix, [len(h) + len(c) for h, c in zip(heads, chunks)], positions)
    if any(not 0 <= t < exact.shape.vocab for chunk in [*chunks, *heads] for t in chunk):
        raise ValueError("a token is outside the vocabulary")

    def shard(indices: list[int]) -> list[bytes]:
        payloads = []
        for i in indices:
            payloads.append(_encode_chunk(exact, chunks[i], prefix + heads[i], contexts[i]() if contexts else None))
            if done:
                done(i, payloads[-1])
        return payloads

    shards = deal([len(c) for c in chunks], max(1, min(threads, len(chunks))))
    return map_shards(shard, shards, len(chunks))


def _encode_chunk(exact: ExactModel, chunk: Sequence[int], prefix: tuple[int, ...], contexts=None) -> bytes:
    encoder = RangeEncoder()
    if chunk:
        symbols = zip(*chunk_symbols(exact, chunk, prefix))
        if contexts is not None:
            symbols = (mix_symbol(*symbol, token, found) for symbol, token, found in zip(symbols, chunk, contexts))
        for cum, freq, total in symbols:
            encoder.encode(cum, freq, total)
    return encoder.finish()


def decode_chunks(exact: ExactModel, payloads: Sequence[bytes], token_counts: Sequence[int],
                  prefix: Sequence[int], batch_size: int = 64, positions: int = MAX_POSITIONS,
                  threads: int = 1, groups: Sequence[Sequence[int]] | None = None,
                  heads: Sequence[int] | None = None) -> list[list[int]]:
    """The token ids of each payload; raises ValueError on a payload the coder cannot follow.

    Chunks are dealt to up to `threads` CPU cores (forked processes of one thread where the
    platform allows, else threads), and each runs its chunks `batch_size` at a time (longest
    first, so a batch's rows finish close together);
    a damaged payload decodes to wrong tokens or raises ValueError, never loops: each row stops
    after its token count. `groups` (index lists that partition the payloads): chunks coded with
    the counts of their group mixed in (mixing.py), each group decoded in one batch. `heads`, one
    per group (kind 7): each chunk of the group but the first was coded after the prefix and that
    many first tokens of the group's first chunk.
    """
    prefix = tuple(int(t) for t in prefix)
    if len(payloads) != len(token_counts):
        raise ValueError("one token count per payload")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if groups is None:
        groups = [[i] for i in range(len(payloads))]
        mixed = False
    else:
        mixed = True
        if sorted(i for g in groups for i in g) != list(range(len(payloads))):
            raise ValueError("the groups must partition the chunks")
    heads = list(heads) if heads is not None else [0] * len(groups)
    if len(heads) != len(groups) or any(not 0 <= h <= (token_counts[g[0]] if g else 0) for h, g in zip(heads, groups)):
        raise ValueError("a group's head is longer than its first chunk")
    _check_lengths(exact, prefix, [token_counts[i] + (h if i != g[0] else 0) for h, g in zip(heads, groups) for i in g],
                   positions)
    shards = deal([sum(token_counts[i] for i in g) for g in groups], max(1, min(threads, len(groups))))

    def shard(members: list[int]) -> list[list[int]]:
        own = [groups[g] for g in members]
        flat = [i for g in own for i in g]
        local = {i: j for j, i in enumerate(flat)}
        tokens = _decode_shard(exact, [payloads[i] for i in flat], [token_counts[i] for i in flat], prefix,
                               batch_size, [[local[i] for i in g] for g in own] if mixed else None,
                               [heads[g] for g in members])
        return [[tokens[local[i]] for i in g] for g in own]

    # processes, not threads: a step is thousands of small operations, and threads queue on the GIL
    per_group = map_shards_forked(shard, shards, len(groups))
    out: list[list[int]] = [[] for _ in payloads]
    for g, tokens in zip(groups, per_group):
        for i, t in zip(g, tokens):
            out[i] = t
    return out


CHECK_NOTE_STEPS = 128  # a check reports each row's state every this many tokens
RESTORE_POSITIONS = 512  # rows x positions per whole-sequence pass that rebuilds a check's cache
# (its logits take 4 * V bytes a position: 100 MB on the embedded model)


def check_chunks(exact: ExactModel, chunks: Sequence[Sequence[int]], payloads: Sequence[bytes],
                 prefix: Sequence[int], batch_size: int = 64, positions: int = MAX_POSITIONS, threads: int = 1,
                 resume: dict[int, tuple[int, str]] | None = None,
                 progress: Callable[[int, int, str], None] | None = None, every: int | None = None,
                 contexts=None, heads: Sequence[Sequence[int]] | None = None) -> set[int]:
    """The indices of the chunks whose payload does not decode back to them, decoded as
    decode_chunks does (the same steps, `next_symbols`); a row stops at its first wrong token.

    Every `every` (default CHECK_NOTE_STEPS) tokens, `progress(index, tokens, digest)` reports a
    row's state: a digest of its key/value cache and range decoder. `resume` maps an index to such
    a report: that row's cache is rebuilt by whole-sequence passes, its decoder replayed over its
    first tokens, and it goes on from there if the rebuilt state has the reported digest (the rest
    of the check is then the one the reporting run would have made); else it starts over.
    `contexts` and `heads` as encode_chunks's: the chunks were coded with shared counts mixed in,
    and after their heads (which, known here, are fed as part of the prefix).
    """
    prefix = tuple(int(t) for t in prefix)
    if len(payloads) != len(chunks):
        raise ValueError("one payload per chunk")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    heads = _heads(heads, len(chunks))
    _check_lengths(exact, prefix, [len(h) + len(c) for h, c in zip(heads, chunks)], positions)
    if any(not 0 <= t < exact.shape.vocab for head in heads for t in head):
        raise ValueError("a head token is outside the vocabulary")
    resume, every = resume or {}, every or CHECK_NOTE_STEPS
    starts = [resume[i][0] if i in resume and 0 < resume[i][0] < len(chunks[i]) else 0 for i in range(len(chunks))]
    digests = [resume[i][1] if starts[i] else None for i in range(len(chunks))]
    # a row's position in its head and chunk: rows restored to the same one share a batch; the
    # others start together, a row's head fed as the decoder feeds it, one token a step
    at = [len(heads[i]) + starts[i] if starts[i] else 0 for i in range(len(chunks))]
    seqs = [heads[i] + tuple(chunks[i]) for i in range(len(chunks))]

    def shard(indices: list[int]) -> list[bool]:
        failed = {}
        again: list[int] = []  # rows whose state could not be rebuilt: checked from their start
        for start in sorted({at[i] for i in indices} | {0}, reverse=True):
            group = [i for i in indices if at[i] == start] + (again if start == 0 else [])
            group.sort(key=lambda i: -len(seqs[i]))
            for first in range(0, len(group), batch_size):
                rows = group[first:first + batch_size]
                outcome = _check_batch(exact, seqs, [len(h) for h in heads], payloads, prefix, rows, start, digests,
                                       progress, every, contexts)
                again += [i for i in rows if outcome[i] is None]
                failed.update((i, bad) for i, bad in outcome.items() if bad is not None)
        return [failed[i] for i in indices]

    shards = deal([len(c) - s for c, s in zip(chunks, starts)], max(1, min(threads, len(chunks))))
    return {i for i, bad in enumerate(map_shards_forked(shard, shards, len(chunks))) if bad}


class StateDigests:
    """Each row's digest of its decoding state. The cached keys and values go into a running hash,
    extended at each report by the positions cached since the last one (hashing the whole cache
    each time would cost its length at every report); a report adds the range decoder's state."""

    def __init__(self, rows: int):
        self.chains, self.hashed = [b""] * rows, 0

    def extend(self, cache: Cache, length: int) -> None:
        """Hash each row's positions [self.hashed, length) of every layer's keys, values and steps."""
        for row, chain in enumerate(self.chains):
            h = hashlib.sha256(chain)
            for t in cache.row_positions(row, self.hashed, length):
                h.update(t.cpu().numpy())
            self.chains[row] = h.digest()
        self.hashed = length

    def select(self, keep: list[int]) -> None:
        self.chains = [self.chains[r] for r in keep]

    def of(self, row: int, decoder: RangeDecoder) -> str:
        state = repr((self.hashed, decoder.pos, decoder.code, decoder.width, decoder.low)).encode()
        return hashlib.sha256(self.chains[row] + state).hexdigest()


def _check_batch(exact: ExactModel, seqs, heads, payloads, prefix: tuple[int, ...], rows: list[int], start: int,
                 digests, progress, every: int, contexts=None) -> dict[int, bool | None]:
    """Each row's outcome: True if its payload fails, False if it decodes to its chunk, None if
    its state at `start` could not be rebuilt. `seqs`: each row's head (its first `heads` tokens,
    fed, not decoded) and chunk; `start`: the position in them every row goes on from (0: the
    rows start afresh)."""
    device = exact.device
    decoders = {i: RangeDecoder(payloads[i]) for i in rows}
    outcome: dict[int, bool | None] = {i: not _finishes(decoders[i]) for i in rows if len(seqs[i]) == heads[i]}
    active = [i for i in rows if len(seqs[i]) > heads[i]]
    if not active:
        return outcome
    cache = decoding_cache(exact, len(active), len(prefix) + max(len(seqs[i]) for i in active))
    states = StateDigests(len(active))
    found = {i: contexts[i]() for i in active} if contexts else None  # each row's counts, token by token
    if start:
        lost = set(_restore(exact, cache, states, [seqs[i] for i in active], [heads[i] for i in active], prefix,
                            start, [decoders[i] for i in active], [digests[i] for i in active], every,
                            [found[i] for i in active] if found else None))
        outcome.update((active[r], None) for r in lost)
        keep = [r for r in range(len(active)) if r not in lost]
        active = _keep_rows(cache, active, keep)
        states.select(keep)
        ids = [[seqs[i][start - 1]] for i in active]
    else:
        ids = [list(prefix)] * len(active)
    done = start
    while active:
        step_ids = torch.tensor(ids, dtype=torch.long, device=device)
        coded = [r for r, i in enumerate(active) if done >= heads[i]]  # the rows past their head
        mix = None
        if found is not None:
            hits = [next(found[active[r]]) for r in coded]
            mix = lambda f: mix_rows(f, hits)  # noqa: E731
        logits = forward(exact, step_ids, cache)[:, -1]
        if len(coded) < len(active):
            logits = logits[coded]
        symbols = dict(zip(coded, next_symbols(exact, logits, [decoders[active[r]] for r in coded], mix)))
        done += 1
        keep = []
        for row, i in enumerate(active):
            if row not in symbols:
                keep.append(row)  # a head's token, fed
            elif symbols[row] != seqs[i][done - 1]:  # a wrong token, or the decoder's ValueError
                outcome[i] = True
            elif done == len(seqs[i]):
                outcome[i] = not _finishes(decoders[i])
            else:
                keep.append(row)
        active = _keep_rows(cache, active, keep)
        states.select(keep)
        if progress and active and done % every == 0:
            states.extend(cache, cache.length)
            for row, i in enumerate(active):
                if done > heads[i]:
                    progress(i, done - heads[i], states.of(row, decoders[i]))
        ids = [[seqs[i][done - 1]] for i in active]
    return outcome


def _finishes(decoder: RangeDecoder) -> bool:
    try:
        decoder.finish()
    except ValueError:
        return False
    return True


def _restore(exact: ExactModel, cache: Cache, states: StateDigests, seqs, heads, prefix: tuple[int, ...], start: int,
             decoders: list[RangeDecoder], digests: list[str], every: int, found=None) -> list[int]:
    """Fill the empty `cache` with the prefix and each row's first start - 1 tokens of its head and
    chunk (`seqs`), in whole-sequence passes (the exact arithmetic makes them equal to decoding
    steps), and replay each row's decoder over its chunk's tokens among its first `start` (past its
    `heads` tokens) under their logits (and, with `found`, each row's iterator of shared counts,
    mixed in as they go): the state of a decoding loop that has just read token start - 1, its
    `states` hashed as that loop's reports did. The rows whose state differs from their digest."""
    ids = torch.tensor([list(prefix) + list(c[:start - 1]) for c in seqs], dtype=torch.long, device=exact.device)
    span = max(1, RESTORE_POSITIONS // len(seqs))
    wrong = set()
    for first in range(0, ids.shape[1], span):
        logits = forward(exact, ids[:, first:first + span], cache)
        beat()
        # position p predicts token p - (len(prefix) - 1)
        lo = max(first, len(prefix) - 1)
        hi = first + logits.shape[1]
        if lo >= hi:
            continue
        for row, (seq, head, decoder) in enumerate(zip(seqs, heads, decoders)):
            own = max(lo, len(prefix) - 1 + head)  # the first position that predicts a chunk's token
            if row in wrong or own >= hi:
                continue
            tokens = seq[own - len(prefix) + 1:hi - len(prefix) + 1]
            symbols = torch.tensor(tokens, dtype=torch.long, device=exact.device)
            for token, (cum, freq, total) in zip(tokens, zip(*_symbol_frequencies(exact, logits[row, own - first:],
                                                                                  symbols))):
                if found is not None:
                    cum, freq, total = mix_symbol(cum, freq, total, token, next(found[row]))
                try:
                    decoder.target(total)
                    decoder.consume(cum, freq)  # raises unless the target lies in [cum, cum + freq)
                except ValueError:
                    wrong.add(row)
                    break
    for reported in range(every, start + 1, every):
        states.extend(cache, len(prefix) + reported - 1)
    return [r for r in range(len(seqs)) if r in wrong or states.of(r, decoders[r]) != digests[r]]


def _decode_shard(exact: ExactModel, payloads, counts, prefix, batch_size: int, groups=None,
                  heads=None) -> list[list[int]]:
    """Each payload's tokens, in batches of at most `batch_size` rows (longest first); with `groups`,
    batches of whole groups, each group's counts mixed in (and `heads`, one per group: its other
    chunks' head, taken from its first chunk as it is decoded)."""
    if groups is None:
        order = sorted(range(len(payloads)), key=lambda i: -counts[i])
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    else:
        batches, rows = [], []
        for g in sorted(groups, key=lambda g: -max(counts[i] for i in g)):  # a group is never split
            if rows and len(rows) + len(g) > batch_size:
                batches.append(rows)
                rows = []
            rows = rows + list(g)
        if rows:
            batches.append(rows)
    plan = {}  # chunk index: (its group, the chunk its head comes from, the head's length)
    for n, g in enumerate(groups or []):
        h = heads[n] if heads else 0
        plan.update((i, (n, g[0], h if i != g[0] else 0)) for i in g)
    out: list[list[int]] = [[] for _ in payloads]
    for rows in batches:
        rowplan = None
        if groups is not None:
            at = {i: r for r, i in enumerate(rows)}
            rowplan = [(plan[i][0], at[plan[i][1]], plan[i][2]) for i in rows]
        for i, tokens in zip(rows, _decode_batch(exact, [payloads[i] for i in rows],
                                                  [counts[i] for i in rows], prefix, rowplan)):
            out[i] = tokens
    return out


def _decode_batch(exact: ExactModel, payloads, counts, prefix, rowplan=None) -> list[list[int]]:
    """The rows' tokens, decoded in lockstep; with `rowplan` (per row: its group, the row its head
    comes from, the head's length), the counts of each group's tokens at earlier positions mixed
    into its rows' frequencies, and a row with a head fed its source row's tokens, one a step, before
    its own are decoded (so its sequence is the head, then its tokens)."""
    device = exact.device
    decoders = [RangeDecoder(p) for p in payloads]
    heads = [h for _, _, h in rowplan] if rowplan is not None else [0] * len(payloads)
    seqs: list[list[int]] = [[] for _ in payloads]  # each row's head, then its tokens
    shared = {g: Counts() for g, _, _ in rowplan} if rowplan is not None else None
    active = [i for i, n in enumerate(counts) if n > 0]
    if active:
        cache = decoding_cache(exact, len(active), len(prefix) + max(counts[i] + heads[i] for i in active))
        step_ids = torch.tensor([list(prefix)] * len(active), dtype=torch.long, device=device)
    while active:
        coded = [r for r, i in enumerate(active) if len(seqs[i]) >= heads[i]]  # the rows past their head
        mix = None
        if shared is not None:
            found = [shared[rowplan[active[r]][0]].context(seqs[active[r]][-2:]) for r in coded]
            mix = lambda f: mix_rows(f, found)  # noqa: E731
        logits = forward(exact, step_ids, cache)[:, -1]
        if len(coded) < len(active):
            logits = logits[coded]
        symbols = next_symbols(exact, logits, [decoders[active[r]] for r in coded], mix)
        for r, sym in zip(coded, symbols):
            if isinstance(sym, ValueError):
                raise sym
            seqs[active[r]].append(sym)
        for i in active:
            if len(seqs[i]) < heads[i]:  # this step's token of its source, decoded above
                seqs[i].append(seqs[rowplan[i][1]][len(seqs[i])])
        if shared is not None:  # this position's tokens count from the next step on
            for r in coded:
                i = active[r]
                shared[rowplan[i][0]].add(seqs[i][-3:-1], seqs[i][-1])
        keep = []
        for row, i in enumerate(active):
            if len(seqs[i]) < heads[i] + counts[i]:
                keep.append(row)
            else:
                decoders[i].finish()
        active = _keep_rows(cache, active, keep)
        step_ids = torch.tensor([[seqs[i][-1]] for i in active], dtype=torch.long, device=device)
    for i, n in enumerate(counts):
        if n == 0:
            decoders[i].finish()
    return [seq[h:] for seq, h in zip(seqs, heads)]


def next_symbols(exact: ExactModel, logits: torch.Tensor, decoders: list[RangeDecoder],
                 mix: Callable[[torch.Tensor], object] | None = None) -> list[int | ValueError]:
    """Each row's next token, read by its range decoder under the exact frequencies of its logits
    (B, V), after `mix` changed them in place; the ValueError of a decoder that cannot follow its
    payload in its place."""
    beat()  # a decoding step: progress, for a process that watches this one
    freqs = frequencies(exact, logits)
    if mix is not None:
        mix(freqs)
    inclusive = torch.cumsum(freqs, dim=-1)                              # (B, V) int64, exact
    targets, errors = [], {}
    for row, (decoder, total) in enumerate(zip(decoders, inclusive[:, -1].tolist())):
        try:
            targets.append(decoder.target(total))
        except ValueError as e:
            targets.append(0)
            errors[row] = e
    target_t = torch.tensor(targets, dtype=torch.long, device=logits.device)[:, None]
    symbols = torch.searchsorted(inclusive, target_t, right=True)        # first cum > target
    upper = inclusive.gather(1, symbols)[:, 0].tolist()
    below = torch.where(symbols > 0, inclusive.gather(1, (symbols - 1).clamp(min=0)), 0)[:, 0].tolist()
    out: list[int | ValueError] = []
    for row, (decoder, sym, lo, hi) in enumerate(zip(decoders, symbols[:, 0].tolist(), below, upper)):
        if row not in errors:
            try:
                decoder.consume(lo, hi - lo)
            except ValueError as e:
                errors[row] = e
        out.append(errors.get(row, sym))
    return out


def _keep_rows(cache: Cache, active: list[int], keep: list[int]) -> list[int]:
    """Drop the cache rows not in `keep` (positions in `active`); the indices still active."""
    if len(keep) < len(active):
        cache.select(torch.tensor(keep, dtype=torch.long, device=cache.k[0].device))
    return [active[r] for r in keep]
