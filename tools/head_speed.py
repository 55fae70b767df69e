"""Time the output head as one float32 product against column blocks (lmzip/blocked_head.py).

Multiplies random rows by the embedded model's head weight (or a random one of the same
shape with --random) as one F.linear and as blocks of each column count asked for, one
thread by default, and prints the best of --repeats in ms (after a warm-up), and whether
the blocks gave the same bits.

    python tools/head_speed.py --rows 1 4 16 32 64 128 256 1024 --columns 512 1024 2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmzip.blocked_head import blocked_linear  # noqa: E402
from lmzip.exact.matmul import best_time  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--columns", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--random", action="store_true", help="a random 49,152 x 576 weight, no model load")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.random:
        weight = torch.randn(49152, 576)
    else:
        from lmzip.models import load_model
        weight = load_model(None, device="cpu").model.get_output_embeddings().weight.detach()
    print(f"head {tuple(weight.shape)}, {args.threads} thread(s), best of {args.repeats}, ms: "
          f"one product / blocks of {', '.join(map(str, args.columns))} columns")
    for rows in args.rows:
        x = torch.randn(rows, weight.shape[1])
        plain = 1e3 * best_time(lambda: F.linear(x, weight), args.repeats)
        times = [1e3 * best_time(lambda: blocked_linear(x, weight, columns=c), args.repeats) for c in args.columns]
        same = all(torch.equal(blocked_linear(x, weight, columns=c), F.linear(x, weight)) for c in args.columns)
        print(f"rows {rows:5d}: {plain:7.1f} / " + "  ".join(f"{t:7.1f}" for t in times)
              + ("" if same else "   (other bits)"))


if __name__ == "__main__":
    main()
