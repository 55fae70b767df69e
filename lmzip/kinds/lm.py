"""Segment kinds 2, lm, and 3, lm-long: the segment's tokens range-coded under the model's own predictions.

The frequencies come from `lmzip.exact`, an integer form of the model that gives the
same numbers bit for bit on any machine, thread count, batch or instruction set
(SPEC.md ("lm payloads")), so an archive decodes wherever the model's files match its
fingerprints. The context of a segment is the header's prefix tokens and the segment's
own earlier tokens, so segments decode independently and in batches. Kind 2 holds chunks of at
most 2048 positions with the prefix (arithmetic /1), kind 3 (lm_long.py) longer ones, up to 8192
(arithmetic /2, which gives the same frequencies at 2048 positions or fewer); coding under /2, the
encoder writes kind 2 where it can, so those segments stay readable by a reader that knows only /1.
Under /3 (the default) it writes kind 6 (lm3_group.py), chunks that share counts within a segment,
or kind 5 (lm3.py) when asked not to mix them.
"""

from __future__ import annotations

from ..errors import SegmentError
from ..limits import LM_POSITIONS, MAX_SEGMENT_BYTES, MAX_TOKENS_PER_SEGMENT

KIND = 2
NAME = "lm"
NEEDS_MODEL = True
# A token costs at most log2(total frequency) < 40 bits, so a payload is at most 5 bytes a token
# and the coder's flush; 8 a token leaves room and bounds what a hostile entry can claim.
MAX_PAYLOAD_BYTES_PER_TOKEN = 8
PAYLOAD_SLACK = 16
# Rows decoded side by side: the key/value cache takes about 47 KB per row and position on the
# embedded model, so 16 rows of 2048 positions (or 4 of 8192, or 64 of 512) is about 1.5 GB. A
# step costs a fixed part (reading the weights, thousands of small operations) and a part per
# row, so a second batch of a few rows costs nearly as much as the first: fill batches up to
# the memory bound.
MAX_DECODE_ROWS = 64
DECODE_ROW_POSITIONS = 16 * 2048


def decode_rows(positions: int) -> int:
    return max(1, min(MAX_DECODE_ROWS, DECODE_ROW_POSITIONS // positions))


def check_entry(entry, header) -> str | None:
    return entry_problem(entry, header, LM_POSITIONS)


def entry_problem(entry, header, positions: int) -> str | None:
    """What is wrong with an lm entry whose kind codes at most `positions` with the prefix."""
    if not header.has_model or not header.prefix:
        return "an lm segment in an archive that names no model or prefix token"
    if entry.vector_count:
        return "an lm segment has a vector count"
    room = min(MAX_TOKENS_PER_SEGMENT, positions - len(header.prefix))
    if not 1 <= entry.token_count <= min(room, entry.original_length):
        return (f"token count {entry.token_count} is outside [1, {room}] (the kind's {positions} positions "
                "less the prefix) or more than the segment's bytes")
    if entry.payload_length > MAX_PAYLOAD_BYTES_PER_TOKEN * entry.token_count + PAYLOAD_SLACK:
        return f"payload of {entry.payload_length} bytes is too long for {entry.token_count} tokens"
    return None


def work(entry) -> int:
    return entry.token_count


# The embedded model's exact form under each arithmetic, as SPEC.md defines it. A build that differs
# (a torch that rounds, or a tokenizers that tokenizes /3's calibration text, otherwise) would code
# archives that other machines cannot decode, and fail to decode theirs with checksum errors.
EMBEDDED_FINGERPRINTS = {2: "5da9b9fc712a952841b5d33652f8091b4c329fe6dadd28243b43d9e01a66dc4e",
                         3: "ad4eb8df5f08770c94b83c17ad85f23f8d31dc78bc63627041b3fe546e76b01b"}


def exact_model(lm, arithmetic: int = 2):
    """The model's exact form for arithmetic /2 (which answers /1 too) or /3, made once per loaded
    model (/3's calibration maxima kept in lmzip's cache); the embedded model's is checked against
    its pinned fingerprint."""
    from ..exact import ExactModel

    key = f"_exact{arithmetic}"
    if key not in lm.__dict__:
        exact = ExactModel.from_loaded(lm, arithmetic, cache="use")
        if arithmetic == 3 and pinned_differs(lm, exact):  # a cache file with other maxima (edited, or lmzip's bug): made anew
            exact = ExactModel.from_loaded(lm, arithmetic, cache="refresh")
        check_pinned(lm, exact)
        lm.__dict__[key] = exact
    return lm.__dict__[key]


def pinned(lm, arithmetic: int) -> str | None:
    return EMBEDDED_FINGERPRINTS.get(arithmetic) if lm.source == "embedded" else None


def pinned_differs(lm, exact) -> bool:
    expected = pinned(lm, exact.arithmetic)
    return expected is not None and exact.fingerprint.hex() != expected


def check_pinned(lm, exact) -> None:
    from ..errors import ModelError

    if pinned_differs(lm, exact):
        expected = pinned(lm, exact.arithmetic)
        raise ModelError(f"this installation makes another exact form of the embedded model under arithmetic "
                         f"/{exact.arithmetic} (fingerprint {exact.fingerprint.hex()[:16]}, lmzip defines "
                         f"{expected[:16]}): its torch or tokenizers rounds or tokenizes otherwise; install the "
                         "versions in lmzip's constraints.txt")


def max_chunk_tokens(prefix) -> int:
    from ..exact import MAX_POSITIONS

    return min(MAX_TOKENS_PER_SEGMENT, MAX_POSITIONS - len(prefix))


def kind_of(tokens: int, prefix, arithmetic: int = 2) -> int:
    """Under /2, kind 2 for a chunk that fits arithmetic /1's 2048 positions, else kind 3; under /3,
    kind 5 (lm3)."""
    from ..exact import V1_POSITIONS
    from . import lm3, lm_long

    if arithmetic == lm3.ARITHMETIC:
        return lm3.KIND
    return KIND if len(prefix) + tokens <= V1_POSITIONS else lm_long.KIND


CHECK_EVERY = 16  # the encoder decodes every 16th chunk (and the first) as the decoder will:
# codec._encode_lm codes that sample first, checks it with `start_check` while it codes the rest
# on the other cores, then makes `segments`


def code(lm, pieces, prefix, done=None, threads: int | None = None, arithmetic: int = 2,
         contexts=None, heads=None) -> list[bytes]:
    """The range-coded payload of each piece's `ids` under `arithmetic`, from one whole-chunk pass
    each, on `threads` cores (default: all); `done(i, payload)` as the i-th piece's is ready (from a
    shard thread); `contexts` (one per piece, `shared_contexts`'): kind 6's counts mixed in; `heads`
    (one per piece, `head_tokens`'): kind 7's."""
    from ..exact import encode_chunks
    from ..precision import exact_float32
    from ..sharding import fewer_threads

    exact = exact_model(lm, arithmetic)
    threads = cores(lm) if threads is None else threads
    # exact_float32: the exact forward refuses reduced-precision matmuls. Chunks dealt to one-thread
    # threads code 1.3x faster than one two-thread pass at a time (BENCHMARKS.md)
    with exact_float32(), fewer_threads(threads if threads < cores(lm) else None):
        return encode_chunks(exact, [p.ids for p in pieces], prefix, threads=threads, done=done, contexts=contexts,
                             heads=heads)


def check(lm, pieces, payloads, prefix, sample, threads: int | None = None, resume=None, progress=None,
          arithmetic: int = 2, contexts=None, heads=None) -> set[int]:
    """The indices in `sample` whose payload does not decode back to its piece's ids, all decoded in
    batches (a lone chunk decodes several times slower per token). `resume` and `progress` are
    check_chunks's, by piece index: where a rerun may start a row, and a callback to report it;
    `contexts` (by piece index, `shared_contexts`'): kind 6's counts were mixed in; `heads` (by piece
    index, `head_tokens`'): kind 7's."""
    from ..exact import check_chunks
    from ..precision import exact_float32

    sample = list(sample)
    if not sample:
        return set()
    exact = exact_model(lm, arithmetic)
    chunks = [pieces[i].ids for i in sample]
    starts = {j: resume[i] for j, i in enumerate(sample) if resume and i in resume}
    report = (lambda j, tokens, digest: progress(sample[j], tokens, digest)) if progress else None
    with exact_float32():
        failed = check_chunks(exact, chunks, [payloads[i] for i in sample], prefix,
                              batch_size=decode_rows(len(prefix) + max(len(heads[i]) if heads else 0 for i in sample)
                                                     + max(map(len, chunks))),
                              threads=cores(lm) if threads is None else threads,
                              resume=starts, progress=report,
                              contexts=[contexts[i] for i in sample] if contexts else None,
                              heads=[heads[i] for i in sample] if heads else None)
    return {sample[j] for j in failed}


def cores(lm) -> int:
    """Chunks coded or decoded side by side: one per CPU thread torch uses (the exact model is made
    on the CPU wherever the loaded model is)."""
    import torch

    from ..sharding import cpu_threads

    return cpu_threads(torch.device("cpu"))


def check_shards(lm, pieces, prefix, sample) -> list[list[int]]:
    """The sample's chunks as `start_check` deals them to processes beside the coding: one batch
    of decoding rows each, on at most all cores but one; none where it cannot fork."""
    from ..sharding import can_fork, deal

    if not sample or not can_fork() or cores(lm) < 2:
        return []
    counts = [len(pieces[i].ids) for i in sample]
    batches = -(-len(sample) // decode_rows(len(prefix) + max(counts)))
    return [[sample[j] for j in shard] for shard in deal(counts, min(cores(lm) - 1, batches))]


def start_check(lm, pieces, payloads, prefix, sample, aside: bool = True, resume=None, progress=None,
                arithmetic: int = 2, contexts=None, heads=None):
    """`check` of the sample while the caller codes other chunks on the other cores: in forked
    processes of one core (`check_shards`; a decoding step of a few rows costs little more than one
    of one row, and a core of its own keeps it from waiting on the coding). Here and now, on all
    cores, where it cannot fork (one core, not Linux) or nothing would run beside it (not
    `aside`). Returns `.ready()`, `.result()` (the failed indices) and `.cancel()` (sharding)."""
    from ..sharding import AllOf, Done, Forked

    exact_model(lm, arithmetic)  # made before the fork, so the children share it
    shards = check_shards(lm, pieces, prefix, list(sample)) if aside else []
    if not shards:
        return Done(check(lm, pieces, payloads, prefix, sample, resume=resume, progress=progress,
                          arithmetic=arithmetic, contexts=contexts, heads=heads))
    started = []
    try:
        for shard in shards:
            started.append(Forked(lambda shard=shard: check(lm, pieces, payloads, prefix, shard, threads=1,
                                                            resume=resume, progress=progress,
                                                            arithmetic=arithmetic, contexts=contexts,
                                                            heads=heads)))
    except BaseException:  # a fork that failed: the others' work is not wanted
        AllOf(started).cancel()
        raise
    return AllOf(started)


def segments(pieces, payloads: dict, prefix, failed, pack: bool = True,
             arithmetic: int = 2, groups=None, heads=None, lines: int = 0) -> list[tuple[object, list[int]]]:
    """(coded segment, the indices of the pieces it holds) for all `pieces` in order: raw bytes for
    a piece with no ids or one in `failed`; the chunks between them, with their `payloads` (by
    piece index, coded under `arithmetic`), in segments of at most MAX_SEGMENT_BYTES. Under /3,
    lm3 segments (each chunk one of its own unless `pack`); under /2, lm-packed ones or, a lone
    chunk (or every chunk unless `pack`), an lm or lm-long segment. With `groups` (`group_pieces`'),
    one lm3-group segment per group (lm3-head with `heads`, one per group), or raw bytes for each
    of its pieces if one failed; with `lines` (linebreaks' flags the pieces' ids were made under),
    lm3-text where they change a group's text."""
    from . import CodedSegment, lm3, lm_packed, raw

    if groups is not None:
        return _group_segments(pieces, payloads, prefix, failed, groups, heads, lines)

    out, run = [], []

    def close_run():
        if arithmetic == lm3.ARITHMETIC:
            groups = [list(run)] if pack else [[i] for i in run]
            out.extend((lm3.encode([pieces[i].data for i in g], [len(pieces[i].ids) for i in g],
                                   [payloads[i] for i in g], prefix), g) for g in groups if g)
        elif len(run) == 1 or (run and not pack):
            out.extend((CodedSegment(kind_of(len(pieces[i].ids), prefix), pieces[i].data, payloads[i],
                                     token_count=len(pieces[i].ids), stats={"tokens": len(pieces[i].ids)}), [i])
                       for i in run)
        elif run:
            out.append((lm_packed.encode([pieces[i].data for i in run], [len(pieces[i].ids) for i in run],
                                         [payloads[i] for i in run], prefix), list(run)))
        run.clear()

    size = 0  # bytes in the run
    for i, piece in enumerate(pieces):
        if piece.ids is None or i in failed:
            close_run()
            out.append((raw(piece.data), [i]))
            continue
        if run and size + len(piece.data) > MAX_SEGMENT_BYTES:
            close_run()
        if not run:
            size = 0
        run.append(i)
        size += len(piece.data)
    close_run()
    return out


def _group_segments(pieces, payloads, prefix, failed, groups, heads=None, lines: int = 0
                    ) -> list[tuple[object, list[int]]]:
    from . import lm3_group, lm3_head, lm3_text, raw

    first = {g[0]: g for g in groups}
    head_of = {g[0]: h for g, h in zip(groups, heads)} if heads is not None else None
    out, i = [], 0
    while i < len(pieces):
        g = first.get(i)
        if g is None or failed & set(g):  # the others' payloads counted the failed chunk's tokens
            for j in g or [i]:
                out.append((raw(pieces[j].data), [j]))
        else:
            args = ([pieces[j].data for j in g], [len(pieces[j].ids) for j in g], [payloads[j] for j in g], prefix)
            head = head_of[i] if head_of is not None else 0
            segment = lm3_text.encode(*args, head, lines) if lines else None
            if segment is None:
                segment = lm3_head.encode(*args, head) if head_of is not None else lm3_group.encode(*args)
            out.append((segment, list(g)))
        i += len(g) if g else 1
    return out


def group_pieces(pieces, prefix, head: int = 0) -> list[list[int]]:
    """Kind 6's groups of piece indices: runs of consecutive pieces with ids, cut where a segment
    would pass MAX_SEGMENT_BYTES, each run cut into ceil(n / m) groups as even as can be (the first
    ones a chunk longer), m the most a group of the run's longest chunk may hold (16 at 2048
    positions, 4 at 8192: mixing.group_limit), after a `head` of at most that many tokens (kind 7)."""
    from ..exact.mixing import group_limit
    from ..limits import LM_LONG_POSITIONS

    runs, run, size = [], [], 0
    for i, piece in enumerate(pieces):
        if piece.ids is None or (run and size + len(piece.data) > MAX_SEGMENT_BYTES):
            runs.append(run)
            run, size = [], 0
        if piece.ids is not None:
            run.append(i)
            size += len(piece.data)
    runs.append(run)
    groups = []
    for run in filter(None, runs):
        longest = max(len(pieces[i].ids) for i in run)
        n = -(-len(run) // group_limit(min(LM_LONG_POSITIONS, len(prefix) + head + longest)))
        small, extra = divmod(len(run), n)
        at = 0
        for k in range(n):
            size = small + (k < extra)
            groups.append(run[at:at + size])
            at += size
    return groups


def shared_contexts(pieces, groups, heads=None) -> dict:
    """Per piece index in `groups`: a callable giving, per position of its chunk, the counts of its
    group's tokens at earlier positions (mixing.group_contexts; `heads`, one per group: kind 7's)."""
    import functools

    from ..exact.mixing import group_contexts

    out = {}
    for n, g in enumerate(groups):
        ids = [pieces[j].ids for j in g]
        for row, i in enumerate(g):
            out[i] = functools.partial(group_contexts, ids, row, heads[n] if heads else 0)
    return out


def group_heads(pieces, groups, prefix, most: int) -> list[int]:
    """Kind 7's head of each group: lm3_head.head_length of its chunks, at most `most` tokens."""
    from .lm3_head import head_length

    return [head_length(prefix, [len(pieces[i].ids) for i in g], most) for g in groups]


def head_tokens(pieces, groups, heads) -> dict:
    """Per piece index in `groups`: the head its chunk is coded after (empty for a group's first)."""
    out = {}
    for g, h in zip(groups, heads):
        out.update((i, tuple(pieces[g[0]].ids[:h]) if i != g[0] else ()) for i in g)
    return out


def job_chunk_tokens(jobs, ctx, positions: int, chunks_of, arithmetic: int = 2,
                     grouped: bool = False, heads=None) -> list[list[list[int]]]:
    """The tokens of each job's chunks, all decoded in one batched call; `chunks_of(job)` gives a
    job's (payloads, token counts), each chunk coded under `arithmetic` in at most `positions` with
    the prefix; `grouped`: each job's chunks a group, coded with its shared counts mixed in;
    `heads` (kind 7), one per job: its other chunks were coded after that many of its first's tokens."""
    from ..exact import decode_chunks

    exact, prefix = exact_model(ctx.model, arithmetic), ctx.header.prefix
    per_job = [chunks_of(job) for job in jobs]
    payloads = [p for payloads, _ in per_job for p in payloads]
    counts = [n for _, counts in per_job for n in counts]
    rows = min(ctx.batch_size, decode_rows(min(positions, len(prefix) + max(heads or [0]) + max(counts))))
    groups, at = [], 0
    for job_payloads, _ in per_job:
        groups.append(list(range(at, at + len(job_payloads))))
        at += len(job_payloads)
    try:  # the exact arithmetic runs on the CPU wherever the model is: all its threads, also on a GPU host
        flat = decode_chunks(exact, payloads, counts, prefix, batch_size=rows, positions=positions,
                             threads=cores(ctx.model), groups=groups if grouped else None, heads=heads)
    except ValueError as e:
        if len(jobs) == 1:
            raise SegmentError(jobs[0].index, f"the range coder cannot follow the payload ({e})") from None
        return [job_chunk_tokens([job], ctx, positions, chunks_of, arithmetic, grouped,
                                 [heads[k]] if heads else None)[0]
                for k, job in enumerate(jobs)]  # find the damaged one
    out, at = [], 0
    for payloads, _ in per_job:
        out.append(flat[at:at + len(payloads)])
        at += len(payloads)
    return out


def token_lists(jobs, ctx, positions: int) -> list[list[int]]:
    """The tokens of each job's payload, one chunk of at most `positions` with the prefix."""
    chunks = job_chunk_tokens(jobs, ctx, positions, lambda job: ([job.payload], [job.entry.token_count]))
    return [tokens for (tokens,) in chunks]


def decode(jobs, ctx) -> list[bytes]:
    from ..exact import V1_POSITIONS
    from .memory import to_bytes

    return to_bytes(jobs, token_lists(jobs, ctx, V1_POSITIONS), ctx.model)
