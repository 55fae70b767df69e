"""The exact forward pass: the same logits, bit for bit, on every machine.

Every sum of many terms is a sum of integers that the hardware adds exactly
in any order: int8 x int8 products summed in int32 (`torch._int_mm`) or in
float32 blocks (matmul.py), or integer-valued float32/float64 operands whose sums stay below 2**24 / 2**53.
Everything else is one separately rounded IEEE operation at a time (add, mul,
div, sqrt, round), applied element-wise, or a fixed-order tree of them; exp,
sigmoid and rope cos/sin come from the integer-built tables in tables.py.
So the result does not depend on threads, batch size or composition, SIMD
width, BLAS, CPU or GPU; and a whole-sequence pass equals the token-by-token
one. SPEC.md ("lm payloads") is the specification, step by step.
"""

from __future__ import annotations

import functools
import math

import torch

from . import cache_kernel, fused
from .cache_kernel import LIMB_BITS
from .matmul import ACT_LIMIT, int_matmul
from .model import MAX_POSITIONS, ExactModel, IntLinear, Layer, Shape
from .tables import EXP_ONE_BITS, EXP_STEP_BITS

ATTN_BITS = 18         # attention weights are integers in [0, 2**18] before P @ V
KEY_BLOCK = 2048       # P @ V sums keys in blocks, each exact in float32: 64 * 127 * 2048 < 2**24
QUERY_POSITIONS = 64  # whole-sequence passes: positions per attention call (speed and memory only)
FLOAT64_ROWS = 32      # attention calls with this many query rows (on a CPU) sum P @ V in float64
HEAD_POSITIONS = 256  # ... and per output head call (memory only)
SCALE_ELEMENTS = 1 << 16  # a Linear's integer results are scaled in blocks of about this many
EXP_SCALE = float(1 << EXP_STEP_BITS)
EXP_ONE = float(1 << EXP_ONE_BITS)

assert (1 << LIMB_BITS) * ACT_LIMIT * KEY_BLOCK < 1 << 24, "P @ V limb sums must stay exact in float32"


class Cache:
    """Keys and values of every layer for B rows that advance in lockstep.

    The int8 head vectors, held as `kernel` (cache_kernel.py) multiplies them in a decoding step:
    float32 (B, Hkv, capacity, D); or int8, keys position-major (B, capacity, Hkv, D) and values
    transposed (B, Hkv, D, capacity), so that one row's first T positions are the left operand
    of `torch._int_mm` as it is, (T * Hkv, D) and (Hkv * D, T). Their float32 steps are
    (B, Hkv, capacity) either way."""

    def __init__(self, shape: Shape, rows: int, capacity: int, device, kernel: str = cache_kernel.FLOAT32):
        if capacity > MAX_POSITIONS:
            raise ValueError(f"context of {capacity} positions exceeds the limit {MAX_POSITIONS}")
        if kernel not in cache_kernel.CACHE_KERNELS:
            raise ValueError(f"no cache kernel {kernel!r}")
        if kernel == cache_kernel.INT8 and torch.device(device).type != "cpu":
            raise ValueError("the int8 key/value cache is for CPUs")
        self.int8 = kernel == cache_kernel.INT8
        hk, d = shape.kv_heads, shape.head_dim
        if self.int8:
            k, v, held = (rows, capacity, hk, d), (rows, hk, d, capacity), dict(dtype=torch.int8, device=device)
        else:
            k = v = (rows, hk, capacity, d)
            held = dict(dtype=torch.float32, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.k = [torch.zeros(k, **held) for _ in range(shape.layers)]   # integer-valued
        self.v = [torch.zeros(v, **held) for _ in range(shape.layers)]
        self.k_scale = [torch.zeros(rows, hk, capacity, **f32) for _ in range(shape.layers)]
        self.v_scale = [torch.zeros(rows, hk, capacity, **f32) for _ in range(shape.layers)]
        self.length = 0
        self.capacity = capacity

    def put(self, index: int, start: int, k, k_step, v, v_step) -> None:
        """Layer `index`'s int8 keys and values (B, T, Hkv, D) and their steps (B, T, Hkv) at positions
        start to start + T."""
        end = start + k.shape[1]
        if self.int8:
            self.k[index][:, start:end] = k
            self.v[index][..., start:end] = v.permute(0, 2, 3, 1)
        else:
            self.k[index][:, :, start:end] = k.transpose(1, 2).float()
            self.v[index][:, :, start:end] = v.transpose(1, 2).float()
        self.k_scale[index][:, :, start:end] = k_step.transpose(1, 2)
        self.v_scale[index][:, :, start:end] = v_step.transpose(1, 2)

    def heads(self, index: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s keys and values at positions [0, end) as float32 (B, Hkv, end, D)."""
        if self.int8:
            return (self.k[index][:, :end].permute(0, 2, 1, 3).float(),
                    self.v[index][..., :end].transpose(2, 3).float())
        return self.k[index][:, :, :end], self.v[index][:, :, :end]

    def row_positions(self, row: int, first: int, end: int):
        """Row `row`'s keys, values and steps of every layer at positions [first, end), each
        (Hkv, T, D) or (Hkv, T), float32: the same tensors however the cache holds them."""
        for t in self.k:
            held = t[row, first:end].transpose(0, 1) if self.int8 else t[row, :, first:end]
            yield held.float().contiguous()
        for t in self.v:
            held = t[row, ..., first:end].transpose(1, 2) if self.int8 else t[row, :, first:end]
            yield held.float().contiguous()
        for store in (self.k_scale, self.v_scale):
            for t in store:
                yield t[row, :, first:end].contiguous()

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given rows (decoding drops rows that are done)."""
        for store in (self.k, self.v, self.k_scale, self.v_scale):
            for i, t in enumerate(store):
                store[i] = t[rows]


def decoding_cache(exact: ExactModel, rows: int, capacity: int) -> Cache:
    """A cache for decoding steps, held as the kernel chosen for this device multiplies it."""
    return Cache(exact.shape, rows, capacity, exact.device, exact.cache_kernel)


def divide(a, b) -> torch.Tensor:
    """a / b correctly rounded, where one side may be a Python number.

    Not `tensor / number`: CUDA computes that as a times the rounded reciprocal of b, and
    `number / tensor` is a reciprocal then a product; a full tensor divisor takes the one
    correctly rounded division on every device.
    """
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return a / b


def quantize_rows(t: torch.Tensor, step_dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (..., K) -> int8 round(t * (127 / max|t|)) and the step max|t| / 127 per row,
    divided in `step_dtype` (float64 before a Linear, float32 for attention heads)."""
    fast = fused.quantize_rows(t, step_dtype)
    if fast is not None:
        return fast
    top = t.abs().amax(dim=-1)
    factor = divide(ACT_LIMIT, torch.where(top > 0, top, 1.0))     # float32 division
    q = (t * factor[..., None]).round_().clamp_(-ACT_LIMIT, ACT_LIMIT).to(torch.int8)
    return q, divide(top.to(step_dtype), ACT_LIMIT)                # 0 where top is 0


def linear(q: torch.Tensor, step: torch.Tensor, lin: IntLinear, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 (..., K) with float64 steps (...) -> float32 (..., N) = (Y * w_scale) * step, Y exact
    (int32 or integer-valued float: the same value, so the same float64 product), written into
    `out` (..., N) when given."""
    y = int_matmul(q.reshape(-1, q.shape[-1]), lin.weight, lin.prepared)  # exact integers
    steps = step.reshape(-1, 1)
    shape = (*q.shape[:-1], y.shape[1])
    if out is not None and (out.dtype != torch.float32 or out.shape != shape):
        raise ValueError("a Linear's output must be float32 of its rows by its outputs")
    rows = max(1, SCALE_ELEMENTS // y.shape[1])
    if y.shape[0] <= rows:  # one block (a decoding step's Linears): no scratch, fewer calls
        into = None if out is None or not out.is_contiguous() else out.view(y.shape)
        fast = fused.scale_rows(y, lin.scale, steps, into) if out is None or into is not None else None
        if fast is not None:
            return fast.view(shape) if out is None else out
        scaled = torch.mul(y, lin.scale).mul_(steps).view(shape)        # integer * float64: one rounding
        return scaled.float() if out is None else out.copy_(scaled)
    into = out if out is not None and out.is_contiguous() else torch.empty(shape, dtype=torch.float32,
                                                                           device=y.device)
    flat = into.view(-1, y.shape[1])
    # the float64 products by blocks of rows, in one scratch block: small enough to stay in a
    # cache, and allocated once (an output head's row is 400 KB, which a fresh allocation per
    # block would map and fault in anew each time)
    scratch = torch.empty(rows, y.shape[1], dtype=torch.float64, device=y.device)
    for first in range(0, y.shape[0], rows):
        block = slice(first, first + rows)
        part = scratch[:flat[block].shape[0]]
        torch.mul(y[block], lin.scale, out=part).mul_(steps[block])       # integer * float64: one rounding
        flat[block] = part
    if out is None:
        return into
    if into is not out:
        out.copy_(into)
    return out


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of the last dim in one fixed order: pad with zeros to a power of two, add neighbours.

    The padding is put off until a level is odd: before it, every pair is of real entries (so
    the padded zeros only meet zeros), which keeps a whole-sequence pass from padding its
    (T, 576) squares to (T, 1024); the sums are those of padding first."""
    if x.shape[-1] == 0:
        x = torch.nn.functional.pad(x, (0, 1))
    while x.shape[-1] > 1:
        n = x.shape[-1]
        if n % 2:
            x = torch.nn.functional.pad(x, (0, (1 << (n - 1).bit_length()) - n))
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def rms_factor(x: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 1 / sqrt(mean(x**2) + eps) per row of float32 x, each square exact in float64."""
    xd = x.double()
    return divide(1.0, torch.sqrt(divide(tree_sum(xd * xd), x.shape[-1]) + eps))


def norm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """RMSNorm then int8: the per-row factor 1/rms only scales the step."""
    fast = fused.norm_quantize(x, weight, eps)
    if fast is not None:
        return fast
    q, step = quantize_rows(x * weight)
    return q, step * rms_factor(x, eps)


def exp_lookup(exact: ExactModel, scaled: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """E[round(d)] for d = x * 1024 >= 0, clamped to the table's last entry (0); float32 integers
    (or entries of `table`). Overwrites `scaled`, a temporary of the caller's."""
    n = scaled.clamp_(max=float(exact.exp.shape[0] - 1)).round_().to(torch.int32)
    table = exact.exp_f32 if table is None else table
    return table.index_select(0, n.reshape(-1)).reshape(n.shape)  # int32 indices: the fast gather


def silu(exact: ExactModel, g: torch.Tensor) -> torch.Tensor:
    """g * sigmoid(g), float32, with e = exp(-|g|) from the table: sigmoid is 1 / (1 + e) where
    g >= 0, else e / (1 + e), one correctly rounded division either way. The numerator is
    max(e, 1 where g >= 0 else 0): 1 or e exactly, as 0 <= e <= 1 (a vectorized max, several times
    faster than a select over a mask)."""
    e = exp_lookup(exact, g.abs().mul_(EXP_SCALE)).mul_(1.0 / EXP_ONE)  # exact: powers of two
    denom = e + 1.0
    numerator = torch.maximum(e, (g >= 0).to(e.dtype))
    return g * numerator.div_(denom)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, D) float32 at positions with tables (T, D): x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


def attention(exact: ExactModel, q, q_step, k, k_step, v, v_step, q_pos: torch.Tensor | None,
              q_first: int = 0) -> torch.Tensor:
    """Exact causal attention of query rows over cached keys, in float32 but for the sums.

    q (B, Hkv, R, D) int-valued float32, q_step (B, Hkv, R) float32; k, v (B, Hkv, Tk, D) likewise,
    their steps (B, Hkv, Tk); q_pos (R,) the ascending position of each query row, or None when
    every row sees every key; q_first = q_pos[0] (given, so the device is not asked): only keys
    from q_first on can lie in a row's future, so the masks cover those alone.
    -> (B, Hkv, R, D) float32. The (B, Hkv, R, Tk) scores are transformed in place, one pass per
    operation: these passes are most of a whole-sequence pass's time.
    """
    scores = torch.matmul(q, k.transpose(-1, -2))                         # exact: 127**2 * D < 2**24
    as_double = q.shape[-2] >= FLOAT64_ROWS and q.device.type == "cpu"    # what value_sums multiplies
    fast = fused.masked_weights(scores, k_step, q_step.contiguous(), v_step, exact.exp_i32, q_pos,
                                _inv_sqrt(exact.shape.head_dim), ATTN_BITS, as_double)
    if fast is None:
        scores.mul_(k_step[:, :, None, :])                                 # one rounding
        fast = attention_weights(exact, scores, q_step, v_step, q_pos, q_first)
    ints, factor = fast
    return (value_sums(ints, v) * factor).float()


def cached_attention(exact: ExactModel, q: torch.Tensor, q_step: torch.Tensor, cache: Cache, index: int,
                     end: int) -> torch.Tensor:
    """attention() of int8 query rows q (B, Hkv, R, D) over layer `index`'s first `end` positions of
    an int8 cache, every row seeing every key (a decoding step): the same sums, in int32."""
    k, v = cache.k[index][:, :end], cache.v[index][..., :end]
    scores = cache_kernel.key_scores(q, k).mul_(cache.k_scale[index][:, :, None, :end])   # one rounding
    ints, factor = attention_weights(exact, scores, q_step, cache.v_scale[index][:, :, :end], None)
    return (cache_kernel.value_sums(ints, v) * factor).float()


def fused_cached_attention(exact: ExactModel, q: torch.Tensor, q_step: torch.Tensor, cache: Cache, index: int,
                           end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cached_attention() followed by quantize_rows of each row's output (B, Hkv * R * D), with
    everything between the int8 products in C (fused.py); None where that does not apply."""
    if not fused.ACTIVE:
        return None
    scores = cache_kernel.key_products(q, cache.k[index][:, :end])
    inv_sqrt_d = _inv_sqrt(exact.shape.head_dim)
    weights = fused.attention_limbs(scores, cache.k_scale[index], q_step.contiguous(), cache.v_scale[index],
                                    exact.exp_i32, inv_sqrt_d, ATTN_BITS)
    if weights is None:
        return None
    limbs, factor = weights
    sums = cache_kernel.value_products(limbs, cache.v[index][..., :end])
    return fused.attention_output(sums, factor, q.shape[-1])


@functools.cache
def _inv_sqrt(d: int) -> float:
    """1 / sqrt(d) rounded to float32, as a Python float (which holds it exactly): a float32 tensor
    times it rounds once, as times the float32 value itself."""
    return float(torch.tensor(1.0 / math.sqrt(d), dtype=torch.float32))


def attention_weights(exact: ExactModel, scores: torch.Tensor, q_step, v_step,
                      q_pos: torch.Tensor | None, q_first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """From the scores Q.K times the keys' steps (B, Hkv, R, Tk) float32 (overwritten) to the attention
    weights U (integers in [0, 2**18], float32) and the float64 factor (B, Hkv, R, 1) that turns
    U @ V into the output."""
    future = None
    if q_pos is not None:
        future = torch.arange(q_first, scores.shape[-1], device=scores.device)[None, :] > q_pos[:, None]
        scores[..., q_first:].masked_fill_(future, float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    coef = (q_step * _inv_sqrt(exact.shape.head_dim)) * EXP_SCALE          # (B, Hkv, R), float32
    scaled = torch.sub(top, scores, out=scores).mul_(coef[..., None])
    if future is not None:
        scaled[..., q_first:].masked_fill_(future, float(exact.exp.shape[0] - 1))  # inf or nan -> the table's 0
    weights = exp_lookup(exact, scaled)                                   # integers <= 2**24
    weight_sum = weights.sum(dim=-1, keepdim=True, dtype=torch.float64)  # integers: exact
    u = weights.mul_(v_step[:, :, None, :])
    u_top = u.amax(dim=-1, keepdim=True)
    u_safe = torch.where(u_top > 0, u_top, 1.0)
    ints = u.div_(u_safe * (1.0 / (1 << ATTN_BITS))).round_()           # U in [0, 2**18]
    return ints, u_top.double() / (weight_sum * float(1 << ATTN_BITS))


def value_sums(ints: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ints (..., R, Tk) @ v (..., Tk, D), integers, exactly, as float64 (each sum < 2**18 * 127 * 8192
    < 2**53). Many query rows on a CPU (a whole-sequence pass): one float64 matmul, no faster than
    the three float32 ones of the limbs but without their passes. Otherwise (a decoding step, bound
    by reading v; or a GPU, many of which are slow at float64): 6-bit limbs in float32."""
    if ints.shape[-2] >= FLOAT64_ROWS and ints.device.type == "cpu":
        return torch.matmul(ints.double(), v.double())
    rows = ints.shape[-2]
    v = v.float()  # float32 limb products (a no-op but for float_attention's float64 values)
    base = float(1 << LIMB_BITS)
    limbs = torch.empty(*ints.shape[:-2], 3 * rows, ints.shape[-1], dtype=ints.dtype, device=ints.device)
    hi, mid, lo = limbs[..., :rows, :], limbs[..., rows:2 * rows, :], limbs[..., 2 * rows:, :]
    torch.mul(ints, 1.0 / (base * base), out=hi).floor_()
    torch.add(ints, hi, alpha=-base * base, out=lo)
    torch.mul(lo, 1.0 / base, out=mid).floor_()
    lo.add_(mid, alpha=-base)
    acc = limb_products(limbs, v)
    return (acc[..., :rows, :] * (base * base) + acc[..., rows:2 * rows, :] * base) + acc[..., 2 * rows:, :]


def limb_products(limbs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """limbs (..., R, Tk) @ v (..., Tk, D) as float64, exact: float32 matmuls over blocks of
    KEY_BLOCK keys (each sum < 64 * 127 * 2048 < 2**24), the block results added in float64."""
    acc = torch.matmul(limbs[..., :KEY_BLOCK], v[..., :KEY_BLOCK, :]).double()
    for first in range(KEY_BLOCK, v.shape[-2], KEY_BLOCK):
        acc = acc + torch.matmul(limbs[..., first:first + KEY_BLOCK], v[..., first:first + KEY_BLOCK, :]).double()
    return acc


def attention_block(exact: ExactModel, layer: Layer, index: int, x: torch.Tensor, cache: Cache,
                    start: int) -> torch.Tensor:
    s = exact.shape
    b, t, _ = x.shape
    hq, hk, d = s.heads, s.kv_heads, s.head_dim
    g = hq // hk
    q_int, step = norm_quantize(x, layer.attn_norm, s.eps)
    qkv = linear(q_int, step, layer.qkv)                                   # (B, T, (hq + 2 hk) * D)
    cos, sin = exact.cos[start:start + t], exact.sin[start:start + t]
    quantized = fused.rope_quantize(qkv, cos, sin, hq + hk, hq + 2 * hk)
    if quantized is None:
        roped = rope(qkv[..., :(hq + hk) * d].reshape(b, t, hq + hk, d), cos, sin)   # queries and keys
        quantized = quantize_rows(torch.cat([roped, qkv[..., (hq + hk) * d:].reshape(b, t, hk, d)], dim=2),
                                  torch.float32)                                # each head on its own
    heads, steps = quantized
    q, k, v = heads.split([hq, hk, hk], dim=2)
    q_step, k_step, v_step = steps.split([hq, hk, hk], dim=2)
    end = start + t
    if not (cache.int8 and fused.put_heads(heads, steps, hq, hk, cache.k[index], cache.v[index],
                                           cache.k_scale[index], cache.v_scale[index], start)):
        cache.put(index, start, k, k_step, v, v_step)
    # query rows by kv head, position-major: (B, Hkv, T * G, D), row t * G + g is head kv * G + g
    q = q.reshape(b, t, hk, g, d).transpose(1, 2).reshape(b, hk, t * g, d)
    q_step = q_step.reshape(b, t, hk, g).transpose(1, 2).reshape(b, hk, t * g)
    quantized = fused_cached_attention(exact, q, q_step, cache, index, end) if t == 1 and cache.int8 else None
    if quantized is None:
        if t == 1 and cache.int8:
            out = cached_attention(exact, q, q_step, cache, index, end)
        else:
            out = float_attention(exact, q.float(), q_step, cache, index, start, end)
        quantized = quantize_rows(out.reshape(b, hk, t, g, d).transpose(1, 2).reshape(b, t, hq * d))
    o_int, o_step = quantized
    o_int, o_step = o_int.reshape(b, t, hq * d), o_step.reshape(b, t)
    return linear(o_int, o_step, layer.o)


def float_attention(exact: ExactModel, q: torch.Tensor, q_step: torch.Tensor, cache: Cache, index: int,
                    start: int, end: int) -> torch.Tensor:
    """attention() of the query rows (B, Hkv, T * G, D) of positions start to end over layer
    `index`'s cached keys and values as float32. Rows are independent: a whole-sequence pass takes
    blocks of positions, each over the keys up to its last one."""
    keys, values = cache.heads(index, end)
    k_step, v_step = cache.k_scale[index], cache.v_scale[index]
    if end - start == 1:
        return attention(exact, q, q_step, keys, k_step[:, :, :end], values, v_step[:, :, :end], None)
    g = q.shape[2] // (end - start)
    if values.device.type == "cpu" and g * min(QUERY_POSITIONS, end - start) >= FLOAT64_ROWS:
        values = values.double()  # value_sums' float64 product: the values converted once, not per block
    blocks = []
    for first in range(start, end, QUERY_POSITIONS):
        last = min(first + QUERY_POSITIONS, end)
        rows = slice((first - start) * g, (last - start) * g)
        q_pos = torch.arange(first, last, device=q.device).repeat_interleave(g)
        blocks.append(attention(exact, q[:, :, rows], q_step[:, :, rows], keys[:, :, :last],
                                k_step[:, :, :last], values[:, :, :last], v_step[:, :, :last], q_pos, first))
    return torch.cat(blocks, dim=2)


def mlp_block(exact: ExactModel, layer: Layer, x: torch.Tensor) -> torch.Tensor:
    q, step = norm_quantize(x, layer.mlp_norm, exact.shape.eps)
    gate_up = linear(q, step, layer.gate_up)
    quantized = fused.silu_quantize(gate_up, exact.exp_i32)
    if quantized is None:
        gate, up = gate_up.chunk(2, dim=-1)
        quantized = quantize_rows(silu(exact, gate) * up)
    h_int, h_step = quantized
    return linear(h_int, h_step, layer.down)


def _check_float_matmuls(device: torch.device) -> None:
    """Refuse reduced-precision float32 matmuls (TF32, bfloat16 passes), in torch's and in oneDNN's.

    The operands (integers up to 127) survive any of those formats; a partial sum kept in less
    than float32 would not, and nothing promises which a backend rounds. Defence in depth: the
    load-time probe also rejects a kernel whose product is not exact."""
    if _legacy_precision() not in ("highest", None) or (
            device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32) or (
            getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "ieee") not in ("ieee", "none")):
        raise ValueError("the exact lm arithmetic needs full float32 matmuls: "
                         "torch.set_float32_matmul_precision('highest'), TF32 off, oneDNN's fp32_precision 'ieee'")


def _legacy_precision() -> str | None:
    """torch.get_float32_matmul_precision(), or None where torch refuses it because the
    per-backend settings (checked on their own) were set."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


@torch.inference_mode()
def forward(exact: ExactModel, ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Logits (B, T, V) float32 for tokens ids (B, T) at the cache's next T positions; fills the cache."""
    q, step = final_states(exact, ids, cache)
    # the head by blocks of positions (each row's arithmetic is its own): its integer sums for
    # 8192 positions would take 1.6 GB at once
    logits = torch.empty(*ids.shape, exact.shape.vocab, dtype=torch.float32, device=ids.device)
    for first in range(0, ids.shape[1], HEAD_POSITIONS):
        rows = slice(first, first + HEAD_POSITIONS)
        head(exact, q[:, rows], step[:, rows], out=logits[:, rows])
    return logits


@torch.inference_mode()
def final_states(exact: ExactModel, ids: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The last norm's int8 rows (B, T, H) and float64 steps (B, T) for tokens ids (B, T) at the
    cache's next T positions, which `head` turns into logits; fills the cache."""
    _check_float_matmuls(ids.device)
    with torch.autocast(ids.device.type, enabled=False):
        start = cache.length
        if start + ids.shape[1] > cache.capacity:
            raise ValueError("the cache is full")
        x = exact.embed[ids]                                                    # (B, T, H) float32
        for index, layer in enumerate(exact.layers):
            x = x + attention_block(exact, layer, index, x, cache, start)
            x = x + mlp_block(exact, layer, x)
        cache.length = start + ids.shape[1]
        return norm_quantize(x, exact.final_norm, exact.shape.eps)


@torch.inference_mode()
def head(exact: ExactModel, q: torch.Tensor, step: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (..., V) float32 of final_states' rows q (..., H) and steps (...), written into `out`
    when given."""
    with torch.autocast(q.device.type, enabled=False):
        return linear(q, step, exact.head, out)


def frequencies(exact: ExactModel, logits: torch.Tensor) -> torch.Tensor:
    """int64 frequencies (..., V): 1 + E[round((max - logit) * 1024)], every token at least 1.

    max - logit is one float32 subtraction; times 1024 is exact."""
    top = logits.amax(dim=-1, keepdim=True)
    return exp_lookup(exact, (top - logits).mul_(EXP_SCALE), exact.exp).add_(1)
