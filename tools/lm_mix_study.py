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


def collect(args) -> None:
    import torch

    from lmzip.exact.coding import chunk_logits
    from lmzip.exact.forward import frequencies
    from lmzip.exact.model import ExactModel
    from lmzip.models import load_model
    from lmzip.precision import exact_float32

    torch.set_num_threads(args.threads)
    data = Path(args.file).read_bytes()
    if args.bytes:
        data = data[:args.bytes]
    lm = load_model(args.model, device="cpu")
    exact = ExactModel.from_loaded(lm)
    ids = lm.tokenizer(data.decode("utf-8"), add_special_tokens=False)["input_ids"]
    prefix = (lm.tokenizer.get_vocab().get("<|endoftext|>", lm.tokenizer.eos_token_id),)
    chunks = [ids[i:i + args.chunk_tokens] for i in range(0, len(ids), args.chunk_tokens)]
    freq, total, top_ids, top_freq, chunk_of = [], [], [], [], []
    t0, cpu0 = time.perf_counter(), time.process_time()
    with exact_float32():
        for c, chunk in enumerate(chunks):
            logits = chunk_logits(exact, chunk, prefix)
            sym = torch.tensor(chunk)[:, None]
            for start in range(0, len(chunk), 64):
                f = frequencies(exact, logits[start:start + 64])
                freq += f.gather(1, sym[start:start + 64])[:, 0].tolist()
                total += f.sum(-1).tolist()
                tf, ti = f.topk(TOP_K, dim=-1)
                top_ids.append(ti.numpy())
                top_freq.append(tf.numpy())
            chunk_of += [c] * len(chunk)
            bits = -sum(math.log2(f / t) for f, t in zip(freq, total))
            print(f"chunk {c + 1}/{len(chunks)}: {len(freq)} tokens, {bits / 8:.0f} bytes so far; "
                  f"{time.perf_counter() - t0:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU", flush=True)
    np.savez_compressed(args.out, tokens=np.array(ids, dtype=np.int64), freq=np.array(freq, dtype=np.int64),
                        total=np.array(total, dtype=np.int64), chunk=np.array(chunk_of, dtype=np.int64),
                        top_ids=np.concatenate(top_ids), top_freq=np.concatenate(top_freq),
                        n_bytes=len(data), chunk_tokens=args.chunk_tokens)
    print(f"{args.file}: {len(data)} bytes, {len(ids)} tokens, {len(chunks)} chunks of {args.chunk_tokens}: "
          f"{bits / len(data):.4f} bpb (ideal under the integer frequencies)")


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
    s = sub.add_parser("study")
    s.add_argument("npz", nargs="+")
    args = ap.parse_args()
    if args.cmd == "collect":
        collect(args)
    else:
        study(args)


def study(args) -> None:
    raise SystemExit("not yet")


if __name__ == "__main__":
    main()
