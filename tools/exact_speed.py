"""Time the exact lm arithmetic's two kinds of pass, and fingerprint their logits.

A decode step (B rows, one token each, over a key/value cache of C positions) and a
whole-sequence pass (one row of T tokens, what the encoder runs per chunk), on real text
from FILE, one torch thread by default. The SHA-256 of the logits shows that a change of
implementation left the arithmetic alone: it must not change between versions. `--arithmetic`
3 (the default, what lmzip writes) gives other digests than 2, which the earlier BENCHMARKS.md
sections list.

    python tools/exact_speed.py ../shared/corpus/alice29.txt --rows 1 10 --context 1000 --passes 1024
    python tools/exact_speed.py ../shared/corpus/alice29.txt --rows 1 11 --passes --kernel float32
    python tools/exact_speed.py --probes 30      # how often the load-time timing picks each kernel
    python tools/exact_speed.py ../shared/corpus/alice29.txt --device cuda --rows 1 10 --steps 8 --passes 1024 2047

With --device cuda the exact model runs on the GPU (lmzip itself runs it on the CPU): its
digests must be the CPU's, and its times are wall seconds with the device synchronized.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmzip.exact.forward import Cache, decoding_cache, forward, frequencies  # noqa: E402
from lmzip.exact import cache_kernel, matmul  # noqa: E402
from lmzip.exact.matmul import kernels  # noqa: E402
from lmzip.exact.model import ExactModel  # noqa: E402
from lmzip.models import load_model  # noqa: E402
from lmzip.precision import exact_float32  # noqa: E402


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def clock(device: torch.device) -> float:
    """CPU seconds on a CPU (one thread's work, whatever else runs); wall seconds on a GPU."""
    if device.type == "cpu":
        return time.process_time()
    torch.cuda.synchronize(device)
    return time.perf_counter()


def decode_steps(exact, ids, rows: int, context: int, steps: int):
    """Median seconds of a decode step (forward and frequencies) after a prefill of `context`."""
    seqs = torch.tensor([ids[r * 97:r * 97 + context + steps] for r in range(rows)], device=exact.device)
    cache = decoding_cache(exact, rows, context + steps)
    forward(exact, seqs[:, :context], cache)
    times, h = [], hashlib.sha256()
    for s in range(steps):
        started = clock(exact.device)
        freq = frequencies(exact, forward(exact, seqs[:, context + s:context + s + 1], cache)[:, -1])
        times.append(clock(exact.device) - started)
        h.update(freq.cpu().numpy().tobytes())
    return statistics.median(times[1:]), h.hexdigest()[:16]


def whole_pass(exact, ids, tokens: int):
    cache = Cache(exact.shape, 1, tokens, exact.device)
    started = clock(exact.device)
    logits = forward(exact, torch.tensor([ids[:tokens]], device=exact.device), cache)
    return clock(exact.device) - started, digest(logits)


def count_choices(probes: int) -> None:
    small, whole = collections.Counter(), collections.Counter()
    for _ in range(probes):
        small[matmul._fastest(kernels("cpu"), matmul.PROBE_SHAPE, matmul.INT8)] += 1
        matmul.fastest_kernel.cache_clear()
        whole[matmul.fastest_kernel("cpu")] += 1
    print(f"{probes} probes, {torch.get_num_threads()} threads: small product alone {dict(small)}, "
          f"the choice {dict(whole)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?")
    ap.add_argument("--model", default=None, help="model spec for lmzip.models.load_model (default: embedded)")
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 10])
    ap.add_argument("--context", type=int, nargs="*", default=[1000])
    ap.add_argument("--steps", type=int, default=6, help="decode steps timed per setting (the first is dropped)")
    ap.add_argument("--passes", type=int, nargs="*", default=[1024], help="whole-sequence pass lengths")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arithmetic", type=int, choices=(2, 3), default=3,
                    help="the exact arithmetic: 3 (smoothed weights, what lmzip writes) or 2")
    ap.add_argument("--device", default="cpu", help="run the exact model here (cpu, cuda, cuda:1, ...)")
    ap.add_argument("--kernel", choices=kernels("cpu"), default=None,
                    help="multiply the weights with this kernel (default: the one timed fastest here)")
    ap.add_argument("--cache-kernel", choices=cache_kernel.CACHE_KERNELS,
                    help="hold and multiply the decoding steps' key/value cache so (default: as timed here)")
    ap.add_argument("--probes", type=int, default=0, metavar="N",
                    help="instead: run the kernel choice N times, and count the choices of the small "
                         "product alone (timed in turns, as now) and of the whole choice")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probes:
        return count_choices(args.probes)
    if not args.file:
        ap.error("FILE is needed unless --probes is given")
    lm = load_model(args.model, device="cpu")
    exact = ExactModel.from_loaded(lm, args.arithmetic)
    if args.device != "cpu":
        exact = exact.to(args.device)
    if args.kernel:
        exact.use_kernel(args.kernel)
    if args.cache_kernel == cache_kernel.INT8 and not cache_kernel.exact_at_the_limits(exact.head_shape):
        ap.error("torch._int_mm is not exact on this CPU: --cache-kernel int8 would time wrong arithmetic")
    if args.cache_kernel:
        exact.cache_kernel = args.cache_kernel
    print(f"weights multiplied by the {exact.weight_kernel} kernel, the key/value cache by the "
          f"{exact.cache_kernel} one", flush=True)
    ids = lm.tokenizer(Path(args.file).read_text(), add_special_tokens=False)["input_ids"]
    unit = "CPU" if exact.device.type == "cpu" else "wall"
    with exact_float32(), torch.no_grad():
        for rows in args.rows:
            for context in args.context:
                sec, h = decode_steps(exact, ids, rows, context, args.steps)
                print(f"decode step, {rows:3d} rows, context {context:5d}: {sec * 1000:7.1f} ms {unit} "
                      f"({rows / sec:6.1f} tokens per {unit} s)  frequencies {h}", flush=True)
        for tokens in args.passes:
            sec, h = whole_pass(exact, ids, tokens)
            print(f"whole pass, {tokens:5d} tokens: {sec:6.2f} s {unit} ({tokens / sec:6.1f} tokens per {unit} s)  "
                  f"logits {h}", flush=True)


if __name__ == "__main__":
    main()
