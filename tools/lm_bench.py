"""Measure the exact lm coder on a text: bits per byte, the cost of the integer frequencies,
encode and decode speed (wall clock and CPU seconds: on a shared machine the CPU time
is the better guide), against zstd -19 and xz -9e.

    python tools/lm_bench.py /work/shared/corpus/alice29.txt --bytes 20000 --chunk-tokens 512

The text is tokenized whole, cut into chunks of --chunk-tokens tokens, each coded after the
model's <|endoftext|> token. Reported bits count the payload bytes only (a container adds a
few bytes per chunk for its length and token count). "ideal" is the sum of -log2 p of the
exact model's float softmax; "freq cost" is what the integer frequencies (floor of 1 per token,
exp table) add to it; "float32 model" (with --float) is the unquantized model's ideal bits.
"""

from __future__ import annotations

import argparse
import lzma
import math
import resource
import sys
import time
from pathlib import Path

import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmzip.exact.coding import chunk_logits, decode_chunks, encode_chunks  # noqa: E402
from lmzip.exact.forward import frequencies  # noqa: E402
from lmzip.exact.model import ExactModel  # noqa: E402
from lmzip.models import load_model  # noqa: E402


def ideal_bits(exact, chunks, prefix, lm=None):
    """(bits under the exact logits' softmax, bits under the integer frequencies, float32 model bits)."""
    soft = freq = flt = 0.0
    for chunk in chunks:
        logits = chunk_logits(exact, chunk, prefix)
        sym = torch.tensor(chunk)[:, None]
        soft -= torch.log_softmax(logits.double(), -1).gather(1, sym).sum().item() / math.log(2)
        f = frequencies(exact, logits).double()
        freq -= (f.gather(1, sym)[:, 0].log2() - f.sum(-1).log2()).sum().item()
        if lm is not None:
            with torch.no_grad():
                ref = lm.model(torch.tensor([list(prefix) + list(chunk)])).logits[0, len(prefix) - 1:-1]
            flt -= torch.log_softmax(ref.double(), -1).gather(1, sym).sum().item() / math.log(2)
    return soft, freq, flt


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (forked decoding shards)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed_decode(exact, payloads, chunks, prefix, batch_size: int, threads: int, n: int) -> str:
    t, cpu = time.perf_counter(), cpu_seconds()
    decoded = decode_chunks(exact, payloads, [len(c) for c in chunks], prefix, batch_size=batch_size,
                            threads=threads)
    dec_s, dec_cpu = time.perf_counter() - t, cpu_seconds() - cpu
    ok = decoded == [list(c) for c in chunks]
    return (f"decode dealt to {threads} process(es): {n / dec_s / 1000:.2f} KB/s ({dec_s:.1f} s wall, "
            f"{dec_cpu:.1f} s CPU, batch {batch_size}) {'OK' if ok else 'MISMATCH'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--model", default=None, help="model spec for lmzip.models.load_model (default: embedded)")
    ap.add_argument("--bytes", type=int, default=0, help="use the first N bytes (0: all)")
    ap.add_argument("--chunk-tokens", type=int, nargs="+", default=[512])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arithmetic", type=int, choices=(2, 3), default=3,
                    help="the exact arithmetic: 3 (smoothed weights, what lmzip writes) or 2")
    ap.add_argument("--sharded", action="store_true",
                    help="encode: deal chunks to --threads threads of one torch thread each, as lmzip does")
    ap.add_argument("--decode-threads", type=int, nargs="+", default=[2],
                    help="decode with chunks dealt to this many cores (forked processes, as lmzip does); "
                         "several values: each decoded in turn, --repeat times")
    ap.add_argument("--repeat", type=int, default=1, help="decode this many times per --decode-threads value")
    ap.add_argument("--float", action="store_true", help="also the float32 model's ideal bits (slow)")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--no-ideal", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    data = Path(args.file).read_bytes()
    if args.bytes:
        data = data[:args.bytes]
    lm = load_model(args.model, device="cpu")
    t = time.perf_counter()
    exact = ExactModel.from_loaded(lm, args.arithmetic)
    print(f"quantized in {time.perf_counter() - t:.1f} s; fingerprint {exact.fingerprint.hex()[:16]}")
    text = data.decode("utf-8")
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if lm.tokenizer.decode(ids) != text:
        print("warning: the tokenization does not round-trip; bits are of the tokens")
    prefix = (lm.tokenizer.get_vocab().get("<|endoftext|>", lm.tokenizer.eos_token_id),)
    n = len(data)
    print(f"{args.file}: {n} bytes, {len(ids)} tokens ({n / len(ids):.2f} bytes/token); threads {args.threads}")
    print(f"zstd -19: {len(zstandard.ZstdCompressor(level=19).compress(data)) * 8 / n:.3f} bpb; "
          f"xz -9e: {len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) * 8 / n:.3f} bpb")
    for length in args.chunk_tokens:
        chunks = [ids[i:i + length] for i in range(0, len(ids), length)]
        t, cpu = time.perf_counter(), time.process_time()
        shards = args.threads if args.sharded else 1
        payloads = encode_chunks(exact, chunks, prefix, threads=shards)
        enc_s, enc_cpu = time.perf_counter() - t, time.process_time() - cpu
        size = sum(map(len, payloads))
        line = (f"chunk {length:5d} tokens, {len(chunks):4d} chunks: {size * 8 / n:.4f} bpb "
                f"({size} bytes); encode {n / enc_s / 1000:.2f} KB/s ({enc_s:.1f} s wall, {enc_cpu:.1f} s CPU)")
        print(line, flush=True)
        for _ in range(0 if args.no_decode else args.repeat):
            for threads in args.decode_threads:  # in turn, so that a busy spell hits every setting
                print("    " + timed_decode(exact, payloads, chunks, prefix, args.batch_size, threads, n), flush=True)
        if not args.no_ideal:
            soft, freq, flt = ideal_bits(exact, chunks, prefix, lm if args.float else None)
            line = (f"    ideal {soft / n:.4f} bpb; integer frequencies {freq / n:.4f} bpb "
                    f"(freq cost {(freq - soft) / len(ids):.5f} bits/token); coder overhead "
                    f"{(size * 8 - freq) / len(chunks):.1f} bits/chunk")
            if args.float:
                line += f"; float32 model {flt / n:.4f} bpb"
            print(line, flush=True)


if __name__ == "__main__":
    main()
