"""Study the lm kind's bits per byte offline: run the exact model once over a text and keep,
per coded token, the integer frequency of the actual token, the total, and the top few tokens;
then measure second models mixed with it without running the model again.

    python tools/lm_mix_study.py collect /work/shared/corpus/alice29.txt /tmp/alice.npz --threads 1
    python tools/lm_mix_study.py study /tmp/alice.npz

Chunks are cut as the lm kind cuts them (--chunk-tokens, each after <|endoftext|>).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOP_K = 8
SHARPEN = (0.85, 0.9, 0.95, 1.05, 1.1, 1.15)


def sharpened(exact, logits, scale):
    """The lm frequencies with (max - logit) * 1024 multiplied by `scale` before the table."""
    import torch

    top = logits.amax(dim=-1, keepdim=True)
    n = torch.round(torch.clamp((top - logits) * 1024.0 * scale, max=float(exact.exp.shape[0] - 1)))
    return exact.exp[n.long()] + 1


def collect(args) -> None:
    import torch

    from lmzip.exact.coding import chunk_logits
    from lmzip.exact.forward import frequencies
    from lmzip.exact.model import ExactModel
    from lmzip.models import load_model
    from lmzip.precision import exact_float32

    torch.set_num_threads(args.threads)
    if args.max_positions:  # study only: longer chunks than the arithmetic allows today
        import lmzip.exact.coding
        import lmzip.exact.forward
        import lmzip.exact.model
        for module in (lmzip.exact.model, lmzip.exact.forward, lmzip.exact.coding):
            module.MAX_POSITIONS = args.max_positions
    data = Path(args.file).read_bytes()
    if args.bytes:
        data = data[:args.bytes]
    lm = load_model(args.model, device="cpu")
    exact = ExactModel.from_loaded(lm, args.arithmetic)
    ids = lm.tokenizer(data.decode("utf-8"), add_special_tokens=False)["input_ids"]
    prefix = (lm.tokenizer.get_vocab().get("<|endoftext|>", lm.tokenizer.eos_token_id),)
    chunks = [ids[i:i + args.chunk_tokens] for i in range(0, len(ids), args.chunk_tokens)]
    freq, total, top_ids, top_freq, chunk_of = [], [], [], [], []
    sharp = [[] for _ in SHARPEN]
    t0, cpu0 = time.perf_counter(), time.process_time()
    with exact_float32():
        for c, chunk in enumerate(chunks):
            if c < args.first_chunk:
                continue
            logits = None  # free the last chunk's before the next
            logits = chunk_logits(exact, chunk, prefix)
            sym = torch.tensor(chunk)[:, None]
            for start in range(0, len(chunk), 64):
                f = frequencies(exact, logits[start:start + 64])
                freq += f.gather(1, sym[start:start + 64])[:, 0].tolist()
                total += f.sum(-1).tolist()
                for j, scale in enumerate(SHARPEN):  # frequencies with (max - logit) scaled: a temperature
                    g = sharpened(exact, logits[start:start + 64], scale)
                    sharp[j] += (g.gather(1, sym[start:start + 64])[:, 0].double().log2()
                                 - g.sum(-1).double().log2()).tolist()
                tf, ti = f.topk(TOP_K, dim=-1)
                top_ids.append(ti.numpy())
                top_freq.append(tf.numpy())
            chunk_of += [c] * len(chunk)
            bits = -sum(math.log2(f / t) for f, t in zip(freq, total))
            print(f"chunk {c + 1}/{len(chunks)}: {len(freq)} tokens, {bits / 8:.0f} bytes so far; "
                  f"{time.perf_counter() - t0:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU", flush=True)
    ids = [t for chunk in chunks[args.first_chunk:] for t in chunk]
    np.savez_compressed(args.out, tokens=np.array(ids, dtype=np.int64), freq=np.array(freq, dtype=np.int64),
                        total=np.array(total, dtype=np.int64), chunk=np.array(chunk_of, dtype=np.int64),
                        top_ids=np.concatenate(top_ids), top_freq=np.concatenate(top_freq),
                        n_bytes=len(data), chunk_tokens=args.chunk_tokens,
                        sharpen=np.array(SHARPEN), sharp_log2p=np.array(sharp))
    print(f"{args.file}: {len(data)} bytes, {len(ids)} tokens, {len(chunks)} chunks of {args.chunk_tokens}: "
          f"{bits / len(data):.4f} bpb (ideal under the integer frequencies)")


def step_cost(args) -> None:
    """CPU seconds of one decode step (B rows, one token each) over a random cache of C positions."""
    import torch

    from lmzip.exact.forward import decoding_cache, forward, frequencies
    from lmzip.exact.model import ExactModel
    from lmzip.models import load_model
    from lmzip.precision import exact_float32

    torch.set_num_threads(args.threads)
    exact = ExactModel.from_loaded(load_model(args.model, device="cpu"))
    g = torch.Generator().manual_seed(0)
    for rows in args.rows:
        for context in args.context:
            cache = decoding_cache(exact, rows, context + 4)
            for store in (cache.k, cache.v):
                for t in store:
                    t.copy_(torch.randint(-127, 128, t.shape, generator=g))
            for store in (cache.k_scale, cache.v_scale):
                for t in store:
                    t.fill_(0.01)
            cache.length = context
            ids = torch.randint(0, exact.shape.vocab, (rows, 1), generator=g)
            times = []
            with exact_float32():
                for _ in range(3):
                    cpu = time.process_time()
                    frequencies(exact, forward(exact, ids, cache)[:, -1])
                    times.append(time.process_time() - cpu)
            best = min(times[1:])
            print(f"rows {rows:3d}, context {context:5d}: {best:.2f} CPU s a step, "
                  f"{rows / best:.1f} tokens per CPU s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("file")
    c.add_argument("out")
    c.add_argument("--model", default=None)
    c.add_argument("--bytes", type=int, default=0)
    c.add_argument("--chunk-tokens", type=int, default=2047)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--first-chunk", type=int, default=0, help="skip the chunks before this one")
    c.add_argument("--max-positions", type=int, default=0, help="raise the exact model's position limit")
    c.add_argument("--arithmetic", type=int, choices=(2, 3), default=3, help="the exact arithmetic (lmzip writes 3)")
    s = sub.add_parser("study")
    s.add_argument("npz", nargs="+")
    g = sub.add_parser("lockstep")
    g.add_argument("npz", nargs="+")
    g.add_argument("--groups", type=int, nargs="+", default=[1000, 16, 11, 6, 1])
    g.add_argument("--table-group", type=int, default=16, help="group size of the fitted weight table")
    t = sub.add_parser("step")
    t.add_argument("--model", default=None)
    t.add_argument("--rows", type=int, nargs="+", default=[4, 16])
    t.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 8000])
    t.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    {"collect": collect, "study": study, "lockstep": lockstep_study, "step": step_cost}[args.cmd](args)

def load(path):
    d = np.load(path)
    return {k: d[k] for k in d.files}


def match_model(tokens, chunk, min_len=2, cap=32):
    """Per position: the token that followed the latest earlier occurrence (in the same chunk) of the
    longest context match, or -1, and the match length (capped), lpaq style: follow the match while
    it predicts right, else look the last `min_len` tokens up again."""
    n = len(tokens)
    pred = np.full(n, -1, dtype=np.int64)
    length = np.zeros(n, dtype=np.int64)
    start = 0
    table, ptr, ln = {}, 0, 0
    for i in range(n):
        if i == 0 or chunk[i] != chunk[i - 1]:
            start, table, ptr, ln = i, {}, 0, 0
        if ln:
            pred[i], length[i] = tokens[ptr], min(ln, cap)
        tok = tokens[i]
        if ln and tokens[ptr] == tok:
            ln, ptr = ln + 1, ptr + 1
        else:
            ln = 0
        end = i + 1
        if end - start >= min_len:
            key = tuple(tokens[end - min_len:end])
            if not ln and key in table:
                ptr = table[key]
                ln = 0
                while ln < cap and end - 1 - ln >= start and tokens[end - 1 - ln] == tokens[ptr - 1 - ln]:
                    ln += 1
            table[key] = end
    return pred, length


def ngram_model(tokens, chunk, order):
    """Per position: count of the actual token after the last `order` tokens in the chunk so far,
    and the count of that context (0: unseen)."""
    n = len(tokens)
    hit = np.zeros(n, dtype=np.int64)
    seen = np.zeros(n, dtype=np.int64)
    start, counts, ctx_tot = 0, {}, {}
    for i in range(n):
        if i == 0 or chunk[i] != chunk[i - 1]:
            start, counts, ctx_tot = i, {}, {}
        if i - start >= order:
            ctx = tuple(tokens[i - order:i])
            seen[i] = ctx_tot.get(ctx, 0)
            hit[i] = counts.get((ctx, tokens[i]), 0)
            counts[(ctx, tokens[i])] = hit[i] + 1
            ctx_tot[ctx] = seen[i] + 1
    return hit, seen


def lockstep_counts(tokens, chunk, order, group):
    """Per position: the count of the actual token after its last `order` tokens (in its chunk), and
    of that context, over the tokens at earlier positions (within their chunk) of every chunk of its
    group: the statistics a batch decoding the group in lockstep has. Groups are runs of about
    `group` consecutive chunks (as even as can be)."""
    tokens, chunk = np.asarray(tokens), np.asarray(chunk)
    ids = np.unique(chunk)
    n_groups = -(-len(ids) // group)
    hit = np.zeros(len(tokens), dtype=np.int64)
    seen = np.zeros(len(tokens), dtype=np.int64)
    for members in np.array_split(ids, n_groups):
        rows = [np.flatnonzero(chunk == c) for c in members]
        counts, ctx_tot = {}, {}
        for p in range(max(len(r) for r in rows)):
            pending = []
            for r in rows:
                if p < len(r) and p >= order:
                    i = r[p]
                    ctx = tuple(tokens[i - order:i].tolist())
                    seen[i] = ctx_tot.get(ctx, 0)
                    hit[i] = counts.get((ctx, int(tokens[i])), 0)
                    pending.append((ctx, int(tokens[i])))
            for ctx, tok in pending:
                counts[(ctx, tok)] = counts.get((ctx, tok), 0) + 1
                ctx_tot[ctx] = ctx_tot.get(ctx, 0) + 1
    return hit, seen


def lockstep_models(tokens, chunk, group):
    """Per position: (count of the actual token, count of the context, order used) of the order-2
    counts shared in lockstep by the chunk's group, else order 1 where the order-2 context is unseen."""
    h2, s2 = lockstep_counts(tokens, chunk, 2, group)
    h1, s1 = lockstep_counts(tokens, chunk, 1, group)
    use2 = s2 > 0
    return np.where(use2, h2, h1), np.where(use2, s2, s1), np.where(use2, 2, 1)


def table_bucket(seen, order):
    """Kind 6's weight bucket: the order and floor(log2 N) up to 15; -1 where nothing was seen."""
    return np.where(seen > 0, (order - 1) * 16 + np.minimum(np.log2(np.maximum(seen, 1)).astype(int), 15), -1)


def weighted_bits(p_lm, p_other, bucket, table):
    """Bits of p = (64 - w) / 64 p_lm + w / 64 p_other, w = table[bucket] (0 where bucket is -1)."""
    w = np.where(bucket >= 0, table[np.maximum(bucket, 0)], 0) / 64
    return -np.log2((1 - w) * p_lm + w * p_other).sum()


def best_table(p_lm, p_other, bucket):
    """Per bucket, the weight in 64ths (0 to 63) with the fewest bits."""
    table = np.zeros(32, dtype=np.int64)
    for b in range(32):
        rows = bucket == b
        if rows.any():
            w = np.arange(64)[None, :] / 64
            table[b] = (-np.log2((1 - w) * p_lm[rows, None] + w * p_other[rows, None])).sum(0).argmin()
    return table


def lockstep_study(args) -> None:
    """Order-k counts shared by the chunks of a group decoded in lockstep, mixed with the lm."""
    files = []
    for path in args.npz:
        d = load(path)
        tokens, chunk, n_bytes = d["tokens"], d["chunk"], int(d["n_bytes"])
        p_lm = d["freq"] / d["total"]
        print(f"{path}: lm {-np.log2(p_lm).sum() / n_bytes:.4f} bpb, {len(np.unique(chunk))} chunks")
        for group in args.groups:
            per_order = {k: lockstep_counts(tokens, chunk, k, group) for k in (1, 2, 3, 4)}
            chains = {"order 1": (1,), "order 2, else 1": (2, 1), "order 3, 2, 1": (3, 2, 1),
                      "order 4, 3, 2, 1": (4, 3, 2, 1)}
            for name, chain in chains.items():  # the longest context seen before, PPM style
                hit, seen = per_order[chain[-1]]
                order = np.full(len(tokens), chain[-1])
                for k in chain[-2::-1]:
                    hk, sk = per_order[k]
                    use = sk > 0
                    hit, seen, order = np.where(use, hk, hit), np.where(use, sk, seen), np.where(use, k, order)
                p_other = np.where(seen > 0, hit / np.maximum(seen, 1), 0.0)
                bucket = np.where(seen > 0, order * 16 + np.minimum(np.log2(np.maximum(seen, 1)).astype(int), 15), -1)
                o = mix_bits(p_lm, p_other, bucket, False)
                f = mix_bits(p_lm, p_other, bucket, True)
                print(f"  groups of {group} chunks, {name}: oracle {o / n_bytes:.4f}, online {f / n_bytes:.4f} bpb")
        hit, seen, order = lockstep_models(tokens, chunk, args.table_group)
        files.append((path, n_bytes, p_lm, np.where(seen > 0, hit / np.maximum(seen, 1), 0.0), table_bucket(seen, order)))
    tables = {path: best_table(p, q, b) for path, _, p, q, b in files}
    pooled = best_table(*(np.concatenate([f[i] for f in files]) for i in (2, 3, 4)))
    print(f"weights in 64ths, order 2 else 1, groups of {args.table_group}, fitted on every file:")
    print(f"  order 1: {pooled[:16].tolist()}\n  order 2: {pooled[16:].tolist()}")
    for path, n_bytes, p, q, b in files:
        others = [t for other, t in tables.items() if other != path]
        row = {"own": tables[path], "pooled": pooled}
        if others:
            row["the other file's"] = others[0]
        print(f"  {path}: " + ", ".join(f"{name} table {weighted_bits(p, q, b, t) / n_bytes:.4f}"
                                          for name, t in row.items()) + " bpb")


GRID = np.array([0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 15 / 16, 31 / 32])


def mix_bits(p_lm, p_other, bucket, online):
    """Bits of p = (1 - w) p_lm + w p_other with w per bucket: the best fixed w of the grid (oracle),
    or online the grid w with the least past cost in that bucket (follow the leader)."""
    cost = -np.log2((1 - GRID[None, :]) * p_lm[:, None] + GRID[None, :] * p_other[:, None])  # (n, G)
    total = 0.0
    for b in np.unique(bucket):
        rows = bucket == b
        c = cost[rows]
        if not online:
            total += c.sum(0).min()
        else:
            past = np.vstack([np.zeros(len(GRID)), np.cumsum(c, 0)[:-1]])
            total += c[np.arange(len(c)), past.argmin(1)].sum()
    return total


def study(args) -> None:
    for path in args.npz:
        d = load(path)
        tokens, chunk = d["tokens"].tolist(), d["chunk"]
        n_bytes = int(d["n_bytes"])
        p_lm = d["freq"] / d["total"]
        base = -np.log2(p_lm).sum()
        print(f"{path}: {n_bytes} bytes, {len(tokens)} tokens, chunks of {int(d['chunk_tokens'])}: "
              f"lm {base / n_bytes:.4f} bpb")
        if "sharp_log2p" in d:
            scales = [1.0] + d["sharpen"].tolist()
            costs = np.vstack([np.log2(p_lm)[None], d["sharp_log2p"]]) * -1  # (S, n) bits
            fixed = ", ".join(f"{sc:g}: {c.sum() / n_bytes:.4f}" for sc, c in zip(scales, costs))
            online = 0.0
            for c in np.unique(chunk):  # the scale with the least cost so far in the chunk
                cc = costs[:, chunk == c]
                past = np.hstack([np.zeros((len(scales), 1)), np.cumsum(cc, 1)[:, :-1]])
                online += cc[past.argmin(0), np.arange(cc.shape[1])].sum()
            print(f"  (max - logit) scaled by {fixed} bpb; per chunk, best so far: {online / n_bytes:.4f}")
        top1 = d["top_ids"][:, 0]
        toks = np.array(tokens)
        for min_len in (1, 2, 3, 4):
            pred, length = match_model(tokens, chunk, min_len)
            has = pred >= 0
            right = (pred == toks) & has
            agree = (pred == top1)
            in_top = d["top_ids"] == pred[:, None]
            rank = np.where(in_top.any(1), in_top.argmax(1), d["top_ids"].shape[1])
            p_other = right.astype(float)
            lenb = np.minimum(length, 16)
            for name, bucket in (("by length", lenb), ("by length, lm top agrees", lenb * 2 + agree),
                                 ("by length, lm rank", lenb * 16 + rank),
                                 ("by log2 length, lm rank", np.log2(np.maximum(length, 1)).astype(int) * 16 + rank)):
                bucket = np.where(has, bucket, -1)
                o = mix_bits(p_lm, p_other, bucket, False)
                f = mix_bits(p_lm, p_other, bucket, True)
                print(f"  match min {min_len} ({has.mean():.2f} of tokens predicted, {right.sum() / max(has.sum(), 1):.2f} right) "
                      f"{name}: oracle {o / n_bytes:.4f}, online {f / n_bytes:.4f} bpb")
        for order in (1, 2, 3, 4):
            hit, seen = ngram_model(tokens, chunk, order)
            p_other = np.where(seen > 0, hit / np.maximum(seen, 1), 0.0)
            bucket = np.where(seen > 0, np.minimum(np.log2(np.maximum(seen, 1)).astype(int), 8), -1)
            o = mix_bits(p_lm, p_other, bucket, False)
            f = mix_bits(p_lm, p_other, bucket, True)
            print(f"  order-{order} counts by log2 context count: oracle {o / n_bytes:.4f}, online {f / n_bytes:.4f} bpb")


if __name__ == "__main__":
    main()
