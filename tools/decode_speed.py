"""Decode speed of memory segments, one at a time against batched, and how far batching moves the logits.

Decodes N segments (random vectors spread like the token embeddings, fixed by a
seed, or the memory segments of an archive) with `greedy_decode_batch` at each
batch size and thread count asked for, and prints tokens per second. The
batch-1 run can be limited to the first few segments (`--single-segments`),
since it is slow. With `--compare` it also records every step's logits at
batch 1 and reports the largest |logit difference| of each batched run against
them, over all steps, segments and vocabulary entries, and the largest change
of a step's top-1 minus top-2 margin. The machine's load average is printed
with each figure: timings on a shared machine are only as good as that; with
one thread, tokens per CPU second are close to what a core of one's own gives.

    python tools/decode_speed.py --segments 64 --tokens 32 --batch-sizes 1 64 --threads 1 2
    python tools/decode_speed.py --archive doc.lmz --segments 64 --batch-sizes 1 8 64 --compare
    python tools/decode_speed.py --segments 128 --tokens 32 --batch-sizes 64 --threads 2 --sharded
    python tools/decode_speed.py --segments 96 --tokens 12 --batch-sizes 1 7 64 --single-segments 8 --threads 1 --digest
    python tools/decode_speed.py --device cuda --segments 512 --tokens 32 --batch-sizes 1 64 128 512

With --digest it also prints, per batch size, the SHA-256 of every step's logits (and of the
tokens) of one unsharded run: equal digests before and after a change mean the same arithmetic.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from contextlib import nullcontext

import numpy as np
import torch

from lmzip import container
from lmzip.batch_decode import greedy_decode_batch, greedy_decode_sharded, top2_margin
from lmzip.fit import FitConfig, sink_prefix
from lmzip.models import load_model


def random_jobs(lm, segments: int, vectors: int, tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    scale = float(lm.model.get_input_embeddings().weight.std())
    return [(scale * torch.randn(vectors, lm.hidden_size, generator=gen), tokens) for _ in range(segments)]


def archive_jobs(path: str, segments: int | None):
    archive = container.parse(open(path, "rb").read())
    jobs = []
    for i, s in enumerate(archive.segments):
        if s.kind == container.KIND_MEMORY:
            vectors = np.frombuffer(archive.payload(i), "<f2").reshape(s.vector_count, -1)
            jobs.append((torch.from_numpy(vectors.astype(np.float32)), s.token_count))
    return jobs[:segments] if segments else jobs, archive.header.prefix, archive.header.model_id


class LogitRecorder:
    """observe() hook: keeps each job's logits per step, or compares them with a kept record."""

    def __init__(self, reference=None):
        self.steps: dict[int, list[torch.Tensor]] = {}
        self.reference = reference
        self.max_logit_diff = 0.0
        self.max_margin_diff = 0.0

    def __call__(self, jobs, logits):
        for row, job in enumerate(jobs):
            seen = self.steps.setdefault(job, [])
            if self.reference is None:
                seen.append(logits[row].clone())
            else:
                ref = self.reference.steps[job][len(seen)]
                seen.append(None)
                self.max_logit_diff = max(self.max_logit_diff, float((logits[row] - ref).abs().max()))
                self.max_margin_diff = max(self.max_margin_diff,
                                           float((top2_margin(logits[row]) - top2_margin(ref)).abs()))


def run(lm, jobs, prefix, batch_size, inference_mode, observe=None, sharded=False):
    context = torch.inference_mode() if inference_mode else nullcontext()
    started, cpu_started = time.perf_counter(), time.process_time()
    with context:
        if sharded:  # as decompress runs it: a batch per thread, each on one core
            decoded = greedy_decode_sharded(lm, jobs, prefix, batch_size, torch.get_num_threads())
        else:
            decoded = greedy_decode_batch(lm, jobs, prefix, batch_size=batch_size, observe=observe)
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    return decoded, time.perf_counter() - started, time.process_time() - cpu_started


def digests(lm, jobs, prefix, batch_size, inference_mode) -> str:
    logits = hashlib.sha256()
    decoded, *_ = run(lm, jobs, prefix, batch_size, inference_mode,
                      observe=lambda rows, step: logits.update(repr(rows).encode() + step.cpu().numpy().tobytes()))
    tokens = hashlib.sha256(repr([d.ids for d in decoded]).encode())
    return f"logits sha256 {logits.hexdigest()[:16]}, tokens sha256 {tokens.hexdigest()[:16]}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--archive", help="decode this archive's memory segments instead of random vectors")
    parser.add_argument("--segments", type=int, default=None,
                        help="random segments to decode (default 64), or the first N of --archive (default or 0: all)")
    parser.add_argument("--single-segments", type=int, default=8,
                        help="segments the batch-1 run decodes (0: all)")
    parser.add_argument("--vectors", type=int, default=2, help="K of each random segment")
    parser.add_argument("--tokens", type=int, default=32, help="tokens of each random segment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (--sharded is for CPUs)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--attention", choices=["sdpa", "eager"], default=None)
    parser.add_argument("--inference-mode", action="store_true", help="run under torch.inference_mode()")
    parser.add_argument("--sharded", action="store_true",
                        help="decode as decompress does: with T threads, up to T batches side by side, "
                             "each on one thread")
    parser.add_argument("--digest", action="store_true",
                        help="SHA-256 of every step's logits and of the tokens at each batch size")
    parser.add_argument("--compare", action="store_true",
                        help="max |logit difference| of each batched run against batch 1 "
                             "(all segments, one at a time: slow for a large archive)")
    args = parser.parse_args(argv)
    if args.sharded and args.device != "cpu":
        parser.error("--sharded deals batches to CPU threads; on a GPU, give larger --batch-sizes")

    if args.archive:
        jobs, prefix, model_id = archive_jobs(args.archive, args.segments)
        lm = load_model(args.model or model_id, device=args.device)
    else:
        lm = load_model(args.model, device=args.device)
        jobs = random_jobs(lm, 64 if args.segments is None else args.segments, args.vectors, args.tokens, args.seed)
        prefix = sink_prefix(lm, FitConfig())
    if args.attention:
        lm.model.set_attn_implementation(args.attention)
    print(f"{len(jobs)} segments, {sum(n for _, n in jobs)} tokens, K {sorted({len(v) for v, _ in jobs})}, "
          f"prefix {list(prefix)}, attention {lm.model.config._attn_implementation}, "
          f"inference_mode {args.inference_mode}", flush=True)

    reference = None
    if args.compare:
        reference = LogitRecorder()
        single, *_ = run(lm, jobs, prefix, 1, args.inference_mode, observe=reference)
    for threads in args.threads:
        torch.set_num_threads(threads)
        run(lm, jobs[:2], prefix, 2, args.inference_mode)  # warm-up
        for batch_size in args.batch_sizes:
            some = jobs[: args.single_segments] if batch_size == 1 and args.single_segments else jobs
            load_before = os.getloadavg()[0]
            decoded, seconds, cpu_seconds = run(lm, some, prefix, batch_size, args.inference_mode,
                                                sharded=args.sharded)
            tokens = sum(len(d.ids) for d in decoded)
            print(f"batch {batch_size:3d}{' sharded' if args.sharded else ''}, {threads} threads: {len(some)} segments, {tokens} tokens in "
                  f"{seconds:.1f} s = {tokens / seconds:.1f} tokens/s; {cpu_seconds:.1f} CPU s = "
                  f"{tokens / cpu_seconds:.1f} tokens per CPU second "
                  f"(load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)", flush=True)
            if args.digest:
                print("  " + digests(lm, some, prefix, batch_size, args.inference_mode), flush=True)
            if reference is not None and batch_size > 1:
                recorder = LogitRecorder(reference)
                batched, *_ = run(lm, jobs, prefix, batch_size, args.inference_mode, observe=recorder)
                same = sum(a.ids == b.ids for a, b in zip(single, batched))
                print(f"  against batch 1: {same}/{len(jobs)} segments with the same tokens, "
                      f"max |Δlogit| {recorder.max_logit_diff:.3g}, "
                      f"max |Δmargin| {recorder.max_margin_diff:.3g}, "
                      f"smallest margin {min(d.min_margin for d in single):.3g}", flush=True)


if __name__ == "__main__":
    main()
