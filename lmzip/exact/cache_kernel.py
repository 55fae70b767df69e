"""How a decoding step multiplies by its cached keys and values: float32 or int8, whichever is
exact and faster here (chosen once per process).

A decoding step reads every cached key and value once, and at a few query rows per head that is
most of its attention's time. The cache holds the int8 head vectors either as float32, read by
float32 batched products (sums of at most 64 products of 127 * 127, or of 2048 of 6-bit limbs
times 127, stay below 2**24: exact in any order), or as int8, read by `torch._int_mm` with
int32 sums: a quarter of the bytes, 3 to 4 times faster where the CPU has int8 dot products
(VNNI, AMX). Elsewhere `torch._int_mm` is a reference loop, or (oneDNN capped below VNNI) adds
pairs of u8 x s8 products in saturating 16-bit lanes, which a key of 127 times a query of 127
shifted to 255 overflows. So int8 is chosen only where a check with every product at its
largest gives the exact sums, and where it is timed faster. Both give the same integers.
"""

from __future__ import annotations

import functools
import itertools
import time

import torch

FLOAT32 = "float32"
INT8 = "int8"
CACHE_KERNELS = (FLOAT32, INT8)
LIMB_BITS = 6           # attention weights U in [0, 2**18] go to int8 as three 6-bit limbs
LIMIT_KEYS = 2047       # the check's key count: sums of 63 * 127 far past what 16 bits hold
# the timing probe: a decoding step's shapes (PROBE_ROWS rows over PROBE_KEYS keys, the model's
# heads) over one layer, then (unless int8 is far slower there, as a reference loop is) over
# PROBE_LAYERS layers: more bytes than a core's caches hold, as in a step over every layer; at
# 4 layers float32 and int8 were within 20 % on a Xeon with AMX, at 16 int8 took half the time
PROBE_ROWS, PROBE_KEYS = 8, 1024
EMBEDDED_HEADS = (3, 3, 64)  # kv heads, query heads per kv head, head size: the embedded model's
PROBE_LAYERS = 16
CONTENDER_RATIO = 2.0


def key_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """int8 queries q (B, Hkv, R, D) . int8 cached keys k (B, Tk, Hkv, D) -> the exact scores
    (B, Hkv, R, Tk) as float32 (each |sum| <= 127 * 127 * D < 2**24). One int8 GEMM per row over
    all its heads at once, the keys on the left: oneDNN reorders the right operand at each call,
    and the few query rows cost little to reorder where the keys would cost twice the product.
    The products of a query head with other heads' keys are computed and dropped: a step costs
    the keys' bytes, not the products."""
    b, tk, hk, _ = k.shape
    r = q.shape[2]
    mine = key_products(q, k).view(b, tk, hk, hk, r).diagonal(dim1=2, dim2=3)   # (B, Tk, R, Hkv)
    return torch.empty(b, hk, r, tk, device=q.device).copy_(mine.permute(0, 3, 2, 1))


def key_products(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """key_scores' int32 products (B, Tk * Hkv, Hkv * R): query j of kv head h with key t of kv
    head h' at [t * Hkv + h', h * R + j]; key_scores keeps those of h' = h."""
    b, tk, hk, d = k.shape
    r = q.shape[2]
    queries = q.reshape(b, hk * r, d).transpose(1, 2).contiguous()        # (B, D, Hkv * R)
    out = torch.empty(b, tk * hk, hk * r, dtype=torch.int32, device=q.device)
    for keys, query, into in zip(k.reshape(b, tk * hk, d).unbind(), queries.unbind(), out.unbind()):
        torch._int_mm(keys, query, out=into)
    return out


def value_sums(ints: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U (B, Hkv, R, Tk), integers in [0, 2**18] as float32, @ int8 cached values v, held
    transposed (B, Hkv, D, Tk) -> the exact sums (B, Hkv, R, D) as float64: U in three 6-bit limbs
    (int8), one int8 GEMM per row over all heads with the values on the left (as in key_scores),
    each int32 sum <= 64 * 127 * 8192 < 2**31, the limbs joined in float64."""
    b, hk, d, tk = v.shape
    r = ints.shape[2]
    n = ints.to(torch.int32)
    limbs = torch.empty(b, hk, 3 * r, tk, dtype=torch.int8, device=ints.device)
    limbs[:, :, :r] = n >> 2 * LIMB_BITS
    limbs[:, :, r:2 * r] = (n >> LIMB_BITS) & (1 << LIMB_BITS) - 1
    limbs[:, :, 2 * r:] = n & (1 << LIMB_BITS) - 1
    out = value_products(limbs, v)
    acc = out.view(b, hk, d, hk, 3 * r).diagonal(dim1=1, dim2=3).permute(0, 3, 2, 1).double()
    base = float(1 << LIMB_BITS)
    return (acc[..., :r, :] * (base * base) + acc[..., r:2 * r, :] * base) + acc[..., 2 * r:, :]


def value_products(limbs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """int8 limbs (B, Hkv, 3 R, Tk) times the cached values v (B, Hkv, D, Tk): the int32 sums
    (B, Hkv * D, Hkv * 3 R), output i of kv head h' with limb row c of kv head h at
    [h' * D + i, h * 3 R + c]; value_sums keeps those of h' = h."""
    b, hk, d, tk = v.shape
    rows = limbs.shape[2]
    out = torch.empty(b, hk * d, hk * rows, dtype=torch.int32, device=v.device)
    for values, parts, into in zip(v.reshape(b, hk * d, tk).unbind(), limbs.reshape(b, hk * rows, tk).unbind(),
                                   out.unbind()):
        torch._int_mm(values, _transposed(parts), out=into)
    return out


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """x (M, N) contiguous as the right operand (N, M) of `torch._int_mm`, a view. Not `x.t()` for
    N = 1: that view's strides are (1, 1), which _int_mm reads wrong (torch 2.13, oneDNN)."""
    return x.t() if x.shape[1] > 1 else x.view(1, x.shape[0])


@functools.cache
def cache_kernel(device_type: str, heads: tuple[int, int, int] = EMBEDDED_HEADS) -> str:
    """INT8 where it is exact at the limits and faster than float32 here for a model's `heads`
    (kv heads, query heads per kv head, head size), timed once per process and shape with one
    torch thread, as lm's shards run (key_scores computes kv heads times the products it keeps,
    which the timing weighs); FLOAT32 otherwise, and on GPUs."""
    if device_type != "cpu" or not exact_at_the_limits(heads):
        return FLOAT32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = probe_times(layers=1, heads=heads)
        if times[INT8] <= CONTENDER_RATIO * times[FLOAT32]:
            times = probe_times(layers=PROBE_LAYERS, heads=heads)
    finally:
        torch.set_num_threads(threads)
    return INT8 if times[INT8] < times[FLOAT32] else FLOAT32


def exact_at_the_limits(heads: tuple[int, int, int] = EMBEDDED_HEADS) -> bool:
    """Whether the int8 products give the exact sums with every product at its largest, of either
    sign, where a saturating or rounding kernel fails first: over LIMIT_KEYS keys, at the model's
    `heads` and at one query head (one product row, for which a kernel may take another path),
    and over one key (a decoder's first step, whose operands have degenerate strides), the
    operands laid out as a cache holds them. False where they fail to run."""
    kv_heads, group, size = heads
    shapes = [(hk, r, keys) for (hk, r), keys in itertools.product(((kv_heads, group), (1, 1)), (LIMIT_KEYS, 1))]
    try:
        return all(_exact_at(hk, r, keys, size) for hk, r, keys in shapes)
    except (RuntimeError, NotImplementedError):  # int8 products this build or CPU lacks
        return False


def _exact_at(hk: int, r: int, keys: int, size: int) -> bool:
    """key_scores and value_sums exact for 2 rows of `hk` kv heads, `r` query rows each and
    `keys` keys of `size`, every product at its largest: all of one sign, of either, and of
    random signs. The keys and values are slices of a tensor a position wider, as a cache's are,
    so a kernel that misread their stride would get other sums in the random round."""
    g = torch.Generator().manual_seed(keys)
    for signs in ((1, 1), (-1, 1), (1, -1), None):
        q, k, v = (torch.full(shape, 127, dtype=torch.int8) for shape in
                   ((2, hk, r, size), (2, keys + 1, hk, size), (2, hk, size, keys + 1)))
        if signs is None:
            for t in (q, k, v):
                t[torch.rand(t.shape, generator=g) < 0.5] = -127
        else:
            q *= signs[0]
            k *= signs[1]
            v *= signs[1]
        k, v = k[:, :keys], v[..., :keys]
        want = torch.matmul(q.double(), k.permute(0, 2, 3, 1).double())
        if not torch.equal(key_scores(q, k).double(), want):
            return False
        for top in (1 << 18, (1 << 18) - 1):  # limbs 64, 0, 0 and 63, 63, 63
            ints = torch.full((2, hk, r, keys), float(top))
            want = torch.matmul(ints.double(), v.transpose(2, 3).double())
            if not torch.equal(value_sums(ints, v), want):
                return False
    return True


def probe_times(layers: int, heads: tuple[int, int, int] = EMBEDDED_HEADS, rounds: int = 3) -> dict[str, float]:
    """The least time of each kernel for a decoding step's products over `layers` layers,
    taking turns (a busy spell of the machine slows both)."""
    (hk, r, d), b, tk = heads, PROBE_ROWS, PROBE_KEYS
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (b, hk, r, d), generator=g, dtype=torch.int8)
    ints = torch.randint(0, (1 << 18) + 1, (b, hk, r, tk), generator=g).float()
    int8 = [torch.randint(-127, 128, (b, tk, hk, d), generator=g, dtype=torch.int8) for _ in range(layers)]
    as_values = [t.permute(0, 2, 3, 1).contiguous() for t in int8]      # as the cache holds values
    as_float = [t.permute(0, 2, 1, 3).float().contiguous() for t in int8]
    qf = q.float()
    limbs = torch.cat([torch.floor(ints / (1 << 2 * LIMB_BITS))] * 3, dim=2)  # three limb blocks' worth

    def run_int8():
        for keys, values in zip(int8, as_values):
            key_scores(q, keys)
            value_sums(ints, values)

    def run_float32():
        for t in as_float:
            torch.matmul(qf, t.transpose(-1, -2))
            torch.matmul(limbs, t)

    runs = {INT8: run_int8, FLOAT32: run_float32}
    times = dict.fromkeys(runs, float("inf"))
    for run in runs.values():
        run()  # warm-up
    for _ in range(rounds):
        for kernel, run in runs.items():
            start = time.perf_counter()
            run()
            times[kernel] = min(times[kernel], time.perf_counter() - start)
    return times
