"""Exact int8 x int8 matrix products, by whichever kernel is fast on this machine.

`torch._int_mm` sums int8 products in int32. Where the CPU has no int8 dot-product
instructions (AVX2 without VNNI), PyTorch runs it as a reference loop, about 35
times slower than a float32 GEMM. The other kernels take the weights prepared once:
- float32 GEMMs of float32 copies (torch's matmul, MKL on x86; or oneDNN's over copies
  packed in its layout). Since weights stay within ±63 and activations within ±127,
  no partial sum of at most FLOAT_K_BLOCK products can reach 2**24, so no order of
  addition rounds.
- oneDNN's u8 x s8 linear (the quantized kernel torch's inductor uses) over int8 weights
  packed once: activations shifted to u8 by a zero point of 128, int32 sums, written out
  as float32, exact for a block of FLOAT_K_BLOCK inputs. Without VNNI it adds pairs of
  products in saturating 16-bit lanes, which 255 * 63 * 2 cannot reach. It reads a quarter
  of the float32 copies' bytes: about twice their speed on AVX2 from a few rows up.
All kernels give the same integers, so the choice (timed once per process) is speed only.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from . import fused

WEIGHT_LIMIT = 63       # |int weight| <= 63 (model.py says why 63)
ACT_LIMIT = 127         # |int activation| <= 127
FLOAT_K_BLOCK = 2048    # float32 sums of this many products stay exact
PROBE_SHAPE = (16, 576, 1536)  # rows, inputs, outputs: a decoding step's MLP, roughly
# the kernels close at PROBE_SHAPE are compared over LARGE_PROBE_WEIGHTS weights of a decoding
# step's shape, more bytes than a core's caches hold, as a step reads all the model's weights:
# there the bytes a kernel reads weigh as they do in use (oneDNN's int8 reads a quarter of
# float32's); at PROBE_SHAPE, with its weight in the cache, float32 and oneDNN are within the noise
LARGE_PROBE_SHAPE = (10, 576, 3072)
LARGE_PROBE_WEIGHTS = 16  # 113 MB as float32
PACK_ROWS = 64          # the row count oneDNN lays packed weights out for (any count works)
INT8 = "int8"           # torch._int_mm
FLOAT32 = "float32"     # torch.matmul of float32 copies
ONEDNN = "onednn"       # oneDNN's float32 linear over packed copies (torch.matmul for one row)
ONEDNN_INT8 = "onednn-int8"  # oneDNN's u8 x s8 linear over packed int8 copies
FLOAT_KERNELS = (FLOAT32, ONEDNN)
PREPARED_KERNELS = FLOAT_KERNELS + (ONEDNN_INT8,)  # weights held in another form, made once
CONTENDER_RATIO = 2.0   # kernels within this factor of the fastest at PROBE_SHAPE are timed again larger
ZERO_POINT = 128        # int8 activation + 128 = the u8 oneDNN's int8 linear takes

assert ACT_LIMIT == fused.ACT_LIMIT, "_fused.c quantizes to the same limit"
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
        """Integer-valued x (M, K), |x| <= 127, times the weight, exactly: float32
        (float64 where K needs more than one block, the block sums being integers)."""
        packed = bool(self.packed) and x.shape[0] > 1
        blocks = self.packed if packed else self.blocks
        return _block_sums(x.float(), blocks, lambda xs, block: _product(xs, block, packed))


@dataclass(frozen=True)
class OnednnInt8Weight:
    """An int8 weight (K, N) in blocks of FLOAT_K_BLOCK inputs, each packed for oneDNN's u8 x s8
    linear, whose int32 sums it writes as float32: exact, as a block's stay below 2**24."""
    blocks: tuple
    ones: torch.Tensor   # (N,) float32: every weight scale 1, so the sums come out unscaled
    zeros: torch.Tensor  # (N,) int64 weight zero points

    @classmethod
    def of(cls, w: torch.Tensor) -> "OnednnInt8Weight":
        blocks = tuple(torch.ops.onednn.qlinear_prepack(w[first:first + FLOAT_K_BLOCK].t().contiguous(), None)
                       for first in range(0, w.shape[0], FLOAT_K_BLOCK))
        n = w.shape[1]
        return cls(blocks, torch.ones(n), torch.zeros(n, dtype=torch.int64))

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """int8 x (M, K) times the weight, exactly: float32 (float64 past one block)."""
        shifted = fused.shift_u8(x)
        if shifted is None:
            shifted = x.contiguous().view(torch.uint8) ^ ZERO_POINT  # the bits of x + 128 as u8
        return _block_sums(shifted, self.blocks, self._product)

    def _product(self, xs: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(xs.contiguous(), 1.0, ZERO_POINT, block, self.ones, self.zeros,
                                                  None, 1.0, 0, torch.float32, "none", [], "")


def prepare(w: torch.Tensor, kernel: str):
    """The weight (K, N) int8 as `kernel` reads it; None for int8, which reads it as it is."""
    if kernel == INT8:
        return None
    if kernel == ONEDNN_INT8:
        return OnednnInt8Weight.of(w)
    return FloatWeight.of(w, kernel)


def _block_sums(x: torch.Tensor, blocks: tuple, product) -> torch.Tensor:
    """The sum of product(x's inputs of block i, block i): float32 for one block, else float64
    (each block's sum an exact integer, and their sum below 2**53)."""
    if len(blocks) == 1:
        return product(x, blocks[0])
    acc = product(x[:, :FLOAT_K_BLOCK], blocks[0]).double()
    for i, block in enumerate(blocks[1:], 1):
        acc += product(x[:, i * FLOAT_K_BLOCK:(i + 1) * FLOAT_K_BLOCK], block).double()
    return acc


def _pack(w: torch.Tensor) -> torch.Tensor:
    """float32 (K, N) in oneDNN's layout for its linear (which takes the weight as (N, K))."""
    return torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), PACK_ROWS)


def _product(x: torch.Tensor, block: torch.Tensor, packed: bool) -> torch.Tensor:
    if packed:
        return torch.ops.mkldnn._linear_pointwise(x, block, None, "none", [], "")
    return x @ block


def int_matmul(x: torch.Tensor, w: torch.Tensor, prepared=None) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) exact integer sums.

    int32 from `torch._int_mm`; or, when `prepared` (the same weights for another kernel,
    `prepare`) is given, integer-valued float32 or float64."""
    if prepared is not None:
        return prepared.times(x)
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
    if torch.backends.mkldnn.is_available():
        if all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")):
            found.append(ONEDNN)
        if all(hasattr(torch.ops.onednn, op) for op in ("qlinear_prepack", "qlinear_pointwise")):
            found.append(ONEDNN_INT8)
    return found


@functools.cache
def fastest_kernel(device_type: str) -> str:
    """The fastest kernel here, timed once per process with one torch thread (as lm's shards
    run): those exact at the limits (checked once each) at PROBE_SHAPE, then those within
    CONTENDER_RATIO of the fastest there at LARGE_PROBE_SHAPE (not the others: on AVX2, int8 is
    35 times slower). A kernel that fails,
    or whose product differs from the exact one, in the probe or with every product at its
    largest, is never chosen. (Exactness rests on the bounds above and the tests; the probe is
    a last check of this build and CPU.)"""
    candidates = kernels(device_type)
    if len(candidates) == 1:
        return candidates[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        small = _times([k for k in candidates if _exact_at_the_limits(k)], PROBE_SHAPE)
        contenders = [k for k, t in small.items() if t <= CONTENDER_RATIO * min(small.values())]
        if len(contenders) < 2:
            return contenders[0] if contenders else INT8
        # int8 where none passes again: a kernel exact at one product but not another is not trusted
        return _fastest(contenders, LARGE_PROBE_SHAPE, default=INT8, weights=LARGE_PROBE_WEIGHTS)
    finally:
        torch.set_num_threads(threads)


def _fastest(candidates: list[str], shape: tuple[int, int, int], default: str, rounds: int = 4,
             weights: int = 1) -> str:
    """The candidate with the least time for products of `shape` whose results are exact
    (`default` if none is)."""
    times = _times(candidates, shape, rounds, weights)
    return min(times, key=times.get, default=default)


def _times(candidates: list[str], shape: tuple[int, int, int], rounds: int = 4,
           weights: int = 1) -> dict[str, float]:
    """The least time of each candidate for one product of `shape` by each of `weights` weights,
    for those whose results are exact. The candidates take turns, so that a busy spell of the
    machine slows all of them, not one."""
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-ACT_LIMIT, ACT_LIMIT + 1, (m, k), generator=g, dtype=torch.int8)
    ws = [torch.randint(-WEIGHT_LIMIT, WEIGHT_LIMIT + 1, (k, n), generator=g, dtype=torch.int8)
          for _ in range(weights)]
    exact = [x.double() @ w.double() for w in ws]  # sums below 2**53: exact, and far faster than int64
    runs = {}
    for kernel in candidates:
        try:
            run = _probe_run(x, ws, kernel)
            if _equal(run(), exact):  # also the warm-up
                runs[kernel] = run
        except (RuntimeError, NotImplementedError):  # a kernel this build or CPU lacks
            continue
    times = {kernel: float("inf") for kernel in runs}
    for _ in range(rounds):
        for kernel, run in runs.items():
            times[kernel] = min(times[kernel], _seconds(run))
    return times


def _equal(products, exact) -> bool:
    return all(torch.equal(y.double(), e) for y, e in zip(products, exact, strict=True))


LIMIT_K = FLOAT_K_BLOCK - 1  # an odd count: its sums of 127 * 63, and of oneDNN's 255 * 63 before
                             # the zero point is taken off (above 2**24), are odd, so no float holds them


def _exact_at_the_limits(kernel: str) -> bool:
    """Whether `kernel` is exact with every product at its largest, of either sign, over a block:
    the sums that would round, and the pairs that would saturate, first (one row and four, as
    kernels may take another path for one). False where it fails to run."""
    try:
        for rows in (1, 4):
            for x_sign, w_sign in ((1, 1), (-1, 1), (1, -1)):
                x = torch.full((rows, LIMIT_K), x_sign * ACT_LIMIT, dtype=torch.int8)
                w = torch.full((LIMIT_K, 64), w_sign * WEIGHT_LIMIT, dtype=torch.int8)
                if not _equal(_probe_run(x, [w], kernel)(), [x.double() @ w.double()]):
                    return False
    except (RuntimeError, NotImplementedError):  # a kernel this build or CPU lacks
        return False
    return True


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _probe_run(x, ws, kernel):
    """A run of x times each of the weights `ws` by `kernel`: the list of products."""
    if kernel == INT8:
        return lambda: [torch._int_mm(x, w) for w in ws]
    prepared = [prepare(w, kernel) for w in ws]
    return lambda: [p.times(x) for p in prepared]


def best_time(run, tries: int = 3) -> float:
    run()  # warm-up: the first call may pick or build kernels
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
