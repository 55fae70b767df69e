"""Exact int8 x int8 matrix products, by whichever kernel is fast on this machine.

`torch._int_mm` sums int8 products in int32. Where the CPU has no int8 dot-product
instructions (AVX2 without VNNI), PyTorch runs it as a reference loop, about 35
times slower than a float32 GEMM. Since weights stay within ±63 and activations
within ±127, a float32 GEMM of the same integers is exact as well: no partial sum
of at most FLOAT_K_BLOCK products can reach 2**24, so no order of addition rounds.
Two float32 GEMMs are on offer: torch's matmul (MKL on x86) and oneDNN's, with the
weights packed once in its own layout (two to three times faster than MKL at the
few rows of a decoding step on AVX2; it keeps MKL for a single row). All kernels
give the same integers, so the choice (timed once per process) is speed only.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

WEIGHT_LIMIT = 63       # |int weight| <= 63 (model.py says why 63)
ACT_LIMIT = 127         # |int activation| <= 127
FLOAT_K_BLOCK = 2048    # float32 sums of this many products stay exact
PROBE_SHAPE = (16, 576, 1536)  # rows, inputs, outputs: a decoding step's MLP, roughly
# float32 against oneDNN is closer, and decided at a product too large for the cache, as a
# decoding step's are (a quarter of the head); at PROBE_SHAPE the two are within the noise
FLOAT_PROBE_SHAPE = (10, 576, 12288)
PACK_ROWS = 64          # the row count oneDNN lays packed weights out for (any count works)
INT8 = "int8"           # torch._int_mm
FLOAT32 = "float32"     # torch.matmul of float32 copies
ONEDNN = "onednn"       # oneDNN's float32 linear over packed copies (torch.matmul for one row)
FLOAT_KERNELS = (FLOAT32, ONEDNN)

assert FLOAT_K_BLOCK * WEIGHT_LIMIT * ACT_LIMIT < 1 << 24, "float32 sums of int8 products must stay exact"


@dataclass(frozen=True)
class FloatWeight:
    """An int8 weight (K, N) as float32 blocks of FLOAT_K_BLOCK inputs: plain (K, N) blocks,
    and for the onednn kernel the same blocks packed in oneDNN's layout too (faster than MKL
    from 2 rows up on AVX2, but half as fast for one row, where MKL's matrix-vector product
    takes the plain blocks)."""
    blocks: tuple
    packed: tuple = ()

    @classmethod
    def of(cls, w: torch.Tensor, kernel: str) -> "FloatWeight":
        if kernel not in FLOAT_KERNELS:
            raise ValueError(f"no float32 kernel {kernel!r}")
        blocks = tuple(w[first:first + FLOAT_K_BLOCK].float() for first in range(0, w.shape[0], FLOAT_K_BLOCK))
        packed = tuple(_pack(b) for b in blocks) if kernel == ONEDNN else ()
        return cls(blocks, packed)

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """Integer-valued float32 x (M, K), |x| <= 127, times the weight, exactly: float32
        (float64 where K needs more than one block, the block sums being integers)."""
        packed = bool(self.packed) and x.shape[0] > 1
        blocks = self.packed if packed else self.blocks
        if len(blocks) == 1:
            return _product(x, blocks[0], packed)
        acc = _product(x[:, :FLOAT_K_BLOCK], blocks[0], packed).double()
        for i, block in enumerate(blocks[1:], 1):
            acc += _product(x[:, i * FLOAT_K_BLOCK:(i + 1) * FLOAT_K_BLOCK], block, packed).double()
        return acc


def _pack(w: torch.Tensor) -> torch.Tensor:
    """float32 (K, N) in oneDNN's layout for its linear (which takes the weight as (N, K))."""
    return torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), PACK_ROWS)


def _product(x: torch.Tensor, block: torch.Tensor, packed: bool) -> torch.Tensor:
    if packed:
        return torch.ops.mkldnn._linear_pointwise(x, block, None, "none", [], "")
    return x @ block


def int_matmul(x: torch.Tensor, w: torch.Tensor, w_float: FloatWeight | None = None) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) exact integer sums.

    int32 from `torch._int_mm`; or, when `w_float` (the same weights for a float32 kernel) is
    given, integer-valued float32 or float64 from float32 GEMMs."""
    if w_float is not None:
        return w_float.times(x.float())
    if x.device.type == "cuda":  # cuBLASLt int8 wants M > 16 and K, N multiples of 8
        m, k = x.shape
        n = w.shape[1]
        pad_m, pad_k, pad_n = max(17 - m, 0), -k % 8, -n % 8
        if pad_m or pad_k or pad_n:
            x = torch.nn.functional.pad(x, (0, pad_k, 0, pad_m))
            w = torch.nn.functional.pad(w, (0, pad_n, 0, pad_k))
            return torch._int_mm(x, w)[:m, :n]
    return torch._int_mm(x, w)


def kernels(device_type: str) -> list[str]:
    """The kernels that run on this device type (GPUs: int8 alone, which they run at full speed)."""
    if device_type != "cpu":
        return [INT8]
    found = [INT8, FLOAT32]
    if torch.backends.mkldnn.is_available() and all(
            hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")):
        found.append(ONEDNN)
    return found


@functools.cache
def fastest_kernel(device_type: str) -> str:
    """The fastest kernel here, timed once per process with one torch thread (as lm's shards
    run): int8 against the float32 kernels at PROBE_SHAPE, then the float32 kernels against each
    other at FLOAT_PROBE_SHAPE. A kernel that fails, or whose probe product differs from the
    exact one, is never chosen. (Exactness rests on the bounds above and the tests; the probe
    is a last check of this build and CPU.)"""
    candidates = kernels(device_type)
    if len(candidates) == 1:
        return candidates[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = _fastest(candidates, PROBE_SHAPE, default=INT8)  # on AVX2, int8 is 35 times slower
        floats = [kernel for kernel in candidates if kernel in FLOAT_KERNELS]
        if best in FLOAT_KERNELS and len(floats) > 1:
            best = _fastest(floats, FLOAT_PROBE_SHAPE, default=best)
    finally:
        torch.set_num_threads(threads)
    return best


def _fastest(candidates: list[str], shape: tuple[int, int, int], default: str, rounds: int = 4) -> str:
    """The candidate with the least time for one product of `shape` whose result is exact
    (`default` if none is). The candidates take turns, so that a busy spell of the machine
    slows all of them, not one."""
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-ACT_LIMIT, ACT_LIMIT + 1, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-WEIGHT_LIMIT, WEIGHT_LIMIT + 1, (k, n), generator=g, dtype=torch.int8)
    exact = x.double() @ w.double()  # sums below 2**53: exact, and far faster than int64
    runs = {}
    for kernel in candidates:
        try:
            run = _probe_run(x, w, kernel)
            if torch.equal(run().double(), exact):  # also the warm-up
                runs[kernel] = run
        except (RuntimeError, NotImplementedError):  # a kernel this build or CPU lacks
            continue
    times = {kernel: float("inf") for kernel in runs}
    for _ in range(rounds):
        for kernel, run in runs.items():
            times[kernel] = min(times[kernel], _seconds(run))
    return min(times, key=times.get, default=default)


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _probe_run(x, w, kernel):
    if kernel == INT8:
        return lambda: torch._int_mm(x, w)
    prepared, xf = FloatWeight.of(w, kernel), x.float()
    return lambda: prepared.times(xf)


def best_time(run, tries: int = 3) -> float:
    run()  # warm-up: the first call may pick or build kernels
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
