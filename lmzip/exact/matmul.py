"""Exact int8 x int8 matrix products, by whichever kernel is fast on this machine.

`torch._int_mm` sums int8 products in int32. Where the CPU has no int8 dot-product
instructions (AVX2 without VNNI), PyTorch runs it as a reference loop, about 35
times slower than a float32 GEMM. Since weights stay within ±63 and activations
within ±127, a float32 GEMM of the same integers is exact as well: no partial sum
of at most FLOAT_K_BLOCK products can reach 2**24, so no order of addition rounds.
Both kernels give the same integers, so the choice (timed once per process) is
speed only.
"""

from __future__ import annotations

import functools
import time

import torch

WEIGHT_LIMIT = 63       # |int weight| <= 63 (model.py says why 63)
ACT_LIMIT = 127         # |int activation| <= 127
FLOAT_K_BLOCK = 2048    # float32 sums of this many products stay exact
PROBE_SHAPE = (16, 576, 1536)  # rows, inputs, outputs: a decoding step's MLP, roughly

assert FLOAT_K_BLOCK * WEIGHT_LIMIT * ACT_LIMIT < 1 << 24, "float32 sums of int8 products must stay exact"


def int_matmul(x: torch.Tensor, w: torch.Tensor, w_float: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) exact integer sums.

    int32 from `torch._int_mm`; or, when `w_float` (the same weights as float32) is given,
    float32 from float32 GEMMs (float64 where K needs more than one block)."""
    if w_float is not None:
        return float_matmul(x.float(), w_float)
    if x.device.type == "cuda":  # cuBLASLt int8 wants M > 16 and K, N multiples of 8
        m, k = x.shape
        n = w.shape[1]
        pad_m, pad_k, pad_n = max(17 - m, 0), -k % 8, -n % 8
        if pad_m or pad_k or pad_n:
            x = torch.nn.functional.pad(x, (0, pad_k, 0, pad_m))
            w = torch.nn.functional.pad(w, (0, pad_n, 0, pad_k))
            return torch._int_mm(x, w)[:m, :n]
    return torch._int_mm(x, w)


def float_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Integer-valued float32 (M, K) @ (K, N) with |x| <= 127, |w| <= 63, exactly: float32 GEMMs
    over blocks of FLOAT_K_BLOCK inputs, the block sums (integers) added in float64."""
    k = x.shape[1]
    if k <= FLOAT_K_BLOCK:
        return x @ w
    acc = (x[:, :FLOAT_K_BLOCK] @ w[:FLOAT_K_BLOCK]).double()
    for first in range(FLOAT_K_BLOCK, k, FLOAT_K_BLOCK):
        acc += (x[:, first:first + FLOAT_K_BLOCK] @ w[first:first + FLOAT_K_BLOCK]).double()
    return acc


@functools.cache
def float_is_faster(device_type: str) -> bool:
    """Whether float32 GEMMs beat torch._int_mm here (timed once per process; CPU only:
    GPUs run int8 at full speed)."""
    if device_type != "cpu":
        return False
    m, k, n = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-ACT_LIMIT, ACT_LIMIT + 1, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-WEIGHT_LIMIT, WEIGHT_LIMIT + 1, (k, n), generator=g, dtype=torch.int8)
    xf, wf = x.float(), w.float()
    return _best_time(lambda: float_matmul(xf, wf)) < _best_time(lambda: torch._int_mm(x, w))


def _best_time(run, tries: int = 3) -> float:
    run()  # warm-up: the first call may pick or build kernels
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
