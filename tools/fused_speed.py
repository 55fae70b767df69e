"""Time each C function of lmzip/_fused.c against the torch code it stands for, at a decoding
step's shapes for the embedded model (B rows, one token each, over C cached positions), one
thread, one layer's call; and check that the two give the same bits.

    python tools/fused_speed.py --rows 10 --context 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmzip.exact import cache_kernel as CK  # noqa: E402
from lmzip.exact import forward as F  # noqa: E402
from lmzip.exact import fused  # noqa: E402
from lmzip.exact import tables  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 9, 3, 64  # the embedded model's shape


class Tables:
    """What the functions read of an ExactModel: the exp and rope tables, the head size."""
    exp = torch.from_numpy(tables.exp_table())
    exp_f32, exp_i32 = exp.float(), exp.int()
    cos, sin = (torch.from_numpy(t) for t in tables.rope_tables(100000.0, HEAD_DIM, 4096))
    shape = F.Shape(hidden=HIDDEN, layers=1, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                    intermediate=INTER, vocab=8, eps=1e-5, rope_theta=100000.0)


def per_call(run, calls: int) -> float:
    run()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls * 1e6


def cases(rows: int, context: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 1, HIDDEN, generator=g)
    w = torch.randn(HIDDEN, generator=g)
    gate_up = torch.randn(rows, 1, 2 * INTER, generator=g) * 3
    qkv = torch.randn(rows, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g)
    cos, sin = Tables.cos[context:context + 1].contiguous(), Tables.sin[context:context + 1].contiguous()
    group = HEADS // KV_HEADS
    cache = F.Cache(Tables.shape, rows, context + 1, "cpu", CK.INT8)
    k = torch.randint(-127, 128, (rows, context, KV_HEADS, HEAD_DIM), generator=g, dtype=torch.int8)
    steps = torch.rand(rows, context, KV_HEADS, generator=g) * 0.05
    cache.put(0, 0, k, steps, k.flip(1), steps.flip(1))
    q = torch.randint(-127, 128, (rows, KV_HEADS, group, HEAD_DIM), generator=g, dtype=torch.int8)
    q_step = torch.rand(rows, KV_HEADS, group, generator=g) * 0.5

    def silu_torch():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.quantize_rows(F.silu(Tables, gate) * up)

    def rope_torch():
        hq, hk, d = HEADS, KV_HEADS, HEAD_DIM
        roped = F.rope(qkv[..., :(hq + hk) * d].reshape(rows, 1, hq + hk, d), cos, sin)
        return F.quantize_rows(torch.cat([roped, qkv[..., (hq + hk) * d:].reshape(rows, 1, hk, d)], dim=2),
                               torch.float32)

    def attention_torch():
        out = F.cached_attention(Tables, q, q_step, cache, 0, context)
        return F.quantize_rows(out.reshape(rows, -1))

    return {
        "norm_quantize": (lambda: F.norm_quantize(x, w, 1e-5),) * 2,
        "quantize_rows": (lambda: F.quantize_rows(x),) * 2,
        "silu_quantize": (lambda: fused.silu_quantize(gate_up, Tables.exp_i32), silu_torch),
        "rope_quantize": (lambda: fused.rope_quantize(qkv, cos, sin, HEADS + KV_HEADS, HEADS + 2 * KV_HEADS),
                          rope_torch),
        "attention (products included)": (lambda: F.fused_cached_attention(Tables, q, q_step, cache, 0, context),
                                          attention_torch),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    if not fused.ACTIVE:
        sys.exit("the C extension is not built here (or LMZIP_FUSED=0)")
    torch.set_num_threads(1)
    print(f"{args.rows} rows, {args.context} cached positions, one layer; microseconds a call")
    with torch.inference_mode():
        for name, (in_c, in_torch) in cases(args.rows, args.context).items():
            c_out = in_c()
            c_time = per_call(in_c, args.calls)
            fused.ACTIVE = False
            try:
                torch_out = in_torch()
                torch_time = per_call(in_torch, args.calls)
            finally:
                fused.ACTIVE = True
            same = all(torch.equal(a.reshape(-1), b.reshape(-1)) for a, b in zip(c_out, torch_out, strict=True))
            print(f"{name:30s} C {c_time:8.1f}   torch {torch_time:8.1f}   same bits: {same}")


if __name__ == "__main__":
    main()
