"""Chains of the exact arithmetic's element-wise steps in one C call each (lmzip/_fused.c).

A decoding step's tensors are small (a few thousand entries per layer but for the attention
scores), so its time goes to dispatching torch operations, a few hundred per layer. The C
functions compute the same IEEE operations in the same order as forward.py's torch code, so
they give the same bits (the tests compare the two on every function); they only run on
contiguous CPU tensors of the expected dtypes. Each function returns None where it does not
apply, or where an input was not finite, and forward.py then runs its torch code.

The extension is optional: without a C compiler at install time, or with LMZIP_FUSED=0 in the
environment, every step runs in torch (the same bits, slower).
"""

from __future__ import annotations

import os

import torch

from .cache_kernel import LIMB_BITS
from .tables import EXP_ONE_BITS, EXP_STEP_BITS

try:
    from .. import _fused as _c
except ImportError:  # not built: the torch code runs
    _c = None

ENV = "LMZIP_FUSED"
ACTIVE = _c is not None and os.environ.get(ENV, "1") != "0"
EXP_SCALE = float(1 << EXP_STEP_BITS)

ACT_LIMIT = 127  # as _fused.c and matmul.py hold it (matmul checks)
assert EXP_ONE_BITS == 24, "_fused.c holds this constant"


def built() -> bool:
    """Whether the C extension was built (whatever LMZIP_FUSED says)."""
    return _c is not None


def _usable(*tensors: torch.Tensor) -> bool:
    if not ACTIVE:
        return False
    for t in tensors:  # a loop, not all(...): this runs some 500 times a decoding step
        if not t.is_cpu or not t.is_contiguous():
            return False
    return True


_SUM_KINDS = {torch.int32: 0, torch.float32: 1, torch.float64: 2}


def scale_rows(y: torch.Tensor, scale: torch.Tensor, steps: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor | None:
    """forward.linear's scaling of its exact sums y (M, N), int32 or integer-valued float32 or
    float64: float32 (y * scale) * steps, the products in float64, into `out` (M, N) when given."""
    m, n = y.shape
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    if (y.dtype not in _SUM_KINDS or scale.dtype != torch.float64 or steps.dtype != torch.float64
            or scale.shape != (n,) or steps.numel() != m or out.dtype != torch.float32 or out.numel() != m * n
            or not _usable(y, scale, steps, out)):
        return None
    _c.scale_rows(y.data_ptr(), _SUM_KINDS[y.dtype], scale.data_ptr(), steps.data_ptr(), out.data_ptr(), m, n)
    return out


def shift_u8(x: torch.Tensor) -> torch.Tensor | None:
    """int8 x + 128 as uint8 (matmul's `x.view(torch.uint8) ^ 128`), in one call."""
    if x.dtype != torch.int8 or not _usable(x):
        return None
    out = torch.empty(x.shape, dtype=torch.uint8)
    _c.shift_u8(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def put_heads(heads: torch.Tensor, steps: torch.Tensor, first: int, kv_heads: int, k: torch.Tensor,
              v: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, start: int) -> bool:
    """Cache.put of an int8 cache for the key heads heads[:, :, first:first + kv_heads] and the value
    heads after them (heads (B, T, H, D) int8, steps (B, T, H) float32), at positions start on of
    k (B, capacity, Hkv, D), v (B, Hkv, D, capacity) and the steps (B, Hkv, capacity). False (and
    nothing written) where it does not apply."""
    b, t, width, d = heads.shape
    capacity = k.shape[1]
    if (heads.dtype != torch.int8 or steps.dtype != torch.float32 or steps.shape != heads.shape[:3]
            or first < 0 or first + 2 * kv_heads != width or k.dtype != torch.int8 or v.dtype != torch.int8
            or k.shape != (b, capacity, kv_heads, d) or v.shape != (b, kv_heads, d, capacity)
            or k_scale.shape != (b, kv_heads, capacity) or v_scale.shape != k_scale.shape
            or k_scale.dtype != torch.float32 or v_scale.dtype != torch.float32 or not 0 <= start <= capacity - t
            or not _usable(heads, steps, k, v, k_scale, v_scale)):
        return False
    _c.put_heads(heads.data_ptr(), steps.data_ptr(), k.data_ptr(), v.data_ptr(), k_scale.data_ptr(),
                 v_scale.data_ptr(), b, t, start, capacity, first, kv_heads, d)
    return True


def quantize_rows(t: torch.Tensor, step_dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """forward.quantize_rows of float32 t (..., K)."""
    if (t.dtype != torch.float32 or step_dtype not in (torch.float32, torch.float64) or not t.shape[-1]
            or not _usable(t)):
        return None
    q = torch.empty(t.shape, dtype=torch.int8)
    step = torch.empty(t.shape[:-1], dtype=step_dtype)
    k = t.shape[-1]
    rows = t.numel() // k
    if _c.quantize_rows(t.data_ptr(), q.data_ptr(), step.data_ptr(), rows, k, step_dtype == torch.float64):
        return None
    return q, step


def norm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """forward.norm_quantize of float32 x (..., K) with weight (K,)."""
    k = x.shape[-1]
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape != (k,)
            or not k or not _usable(x, weight)):
        return None
    q = torch.empty(x.shape, dtype=torch.int8)
    step = torch.empty(x.shape[:-1], dtype=torch.float64)
    if _c.norm_quantize(x.data_ptr(), weight.data_ptr(), q.data_ptr(), step.data_ptr(), x.numel() // k, k,
                        float(eps)):
        return None
    return q, step


def silu_quantize(gate_up: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """quantize_rows(silu(gate) * up) for gate, up = gate_up.chunk(2, -1), float32 (..., 2 * I),
    with the exp table `table` as int32."""
    inter = gate_up.shape[-1] // 2
    if (gate_up.dtype != torch.float32 or table.dtype != torch.int32 or not inter or gate_up.shape[-1] != 2 * inter
            or not _usable(gate_up, table)):
        return None
    q = torch.empty(*gate_up.shape[:-1], inter, dtype=torch.int8)
    step = torch.empty(gate_up.shape[:-1], dtype=torch.float64)
    if _c.silu_quantize(gate_up.data_ptr(), q.data_ptr(), step.data_ptr(), gate_up.numel() // (2 * inter), inter,
                        table.data_ptr(), table.shape[0], EXP_SCALE):
        return None
    return q, step


def rope_quantize(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, roped: int,
                  heads: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """qkv (B, T, heads * D) float32 -> its heads (B, T, heads, D) int8 and their float32 steps
    (B, T, heads): the first `roped` heads rotated by rope() with tables cos, sin (T, D) first,
    each head quantized on its own (quantize_rows with float32 steps)."""
    b, t, width = qkv.shape
    d = width // heads
    if (qkv.dtype != torch.float32 or cos.dtype != torch.float32 or sin.dtype != torch.float32
            or width != heads * d or d % 2 or not 0 <= roped <= heads or cos.shape != (t, d) or sin.shape != (t, d) or not t or not _usable(qkv, cos, sin)):
        return None
    q = torch.empty(b, t, heads, d, dtype=torch.int8)
    step = torch.empty(b, t, heads, dtype=torch.float32)
    if _c.rope_quantize(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), step.data_ptr(), b * t, t,
                        roped, heads, d):
        return None
    return q, step


def attention_limbs(scores: torch.Tensor, k_scale: torch.Tensor, q_step: torch.Tensor, v_scale: torch.Tensor,
                    table: torch.Tensor, inv_sqrt_d: float, attn_bits: int,
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A decoding step's attention weights as attention_weights() makes them with no mask, from
    key_products' int32 scores (B, Tk * Hkv, Hkv * R), the cache's steps k_scale and v_scale
    (B, Hkv, capacity), q_step (B, Hkv, R) and the exp table as int32: U's limbs int8 (B, Hkv, 3 R, Tk) as value_products
    takes them, and the float64 factor (B, Hkv, R)."""
    b, hk, r = q_step.shape
    tk = scores.shape[1] // hk
    if (scores.dtype != torch.int32 or scores.shape != (b, tk * hk, hk * r) or not tk
            or k_scale.shape[:2] != (b, hk) or v_scale.shape != k_scale.shape or k_scale.shape[2] < tk
            or q_step.dtype != torch.float32 or k_scale.dtype != torch.float32 or v_scale.dtype != torch.float32
            or table.dtype != torch.int32 or not _usable(scores, k_scale, q_step, v_scale, table)):
        return None
    limbs = torch.empty(b, hk, 3 * r, tk, dtype=torch.int8)
    factor = torch.empty(b, hk, r, dtype=torch.float64)
    if _c.attention_limbs(scores.data_ptr(), k_scale.data_ptr(), q_step.data_ptr(), v_scale.data_ptr(),
                          table.data_ptr(), table.shape[0], limbs.data_ptr(), factor.data_ptr(), b, hk, r, tk,
                          k_scale.shape[2], float(inv_sqrt_d), EXP_SCALE, attn_bits, LIMB_BITS):
        return None
    return limbs, factor


def _step_rows(t: torch.Tensor, heads: int, keys: int) -> int | None:
    """The stride between heads of a cache's steps (B, Hkv, >= keys), a slice of its positions;
    None where the heads do not lie at one stride or the positions are not contiguous."""
    if t.dim() != 3 or t.shape[0] * t.shape[1] != heads or t.shape[2] < keys or t.stride(2) != 1:
        return None
    if t.shape[0] > 1 and t.stride(0) != t.shape[1] * t.stride(1):
        return None
    return t.stride(1)


def masked_weights(scores: torch.Tensor, k_step: torch.Tensor, q_step: torch.Tensor, v_step: torch.Tensor,
                   table: torch.Tensor, q_pos: torch.Tensor | None, inv_sqrt_d: float, attn_bits: int,
                   as_double: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """attention()'s `scores.mul_(k_step)` and attention_weights() for the integer products Q.K
    scores (B, Hkv, R, Tk) float32, the steps k_step, v_step (B, Hkv, >= Tk) and q_step
    (B, Hkv, R); row r sees keys [0, q_pos[r]] (all where q_pos is None). -> U (B, Hkv, R, Tk)
    as float32 or float64 (as_double) and the float64 factor (B, Hkv, R, 1)."""
    b, hk, r, tk = scores.shape
    heads = b * hk
    stride = _step_rows(k_step, heads, tk)
    if (stride is None or _step_rows(v_step, heads, tk) != stride or not tk
            or scores.dtype != torch.float32 or k_step.dtype != torch.float32 or v_step.dtype != torch.float32
            or q_step.dtype != torch.float32 or q_step.shape != (b, hk, r) or table.dtype != torch.int32
            or (q_pos is not None and (q_pos.dtype != torch.int64 or q_pos.shape != (r,)))
            or not _usable(scores, q_step, table, *(() if q_pos is None else (q_pos,)))
            or not k_step.is_cpu or not v_step.is_cpu):
        return None
    out = torch.empty(scores.shape, dtype=torch.float64 if as_double else torch.float32)
    factor = torch.empty(b, hk, r, 1, dtype=torch.float64)
    if _c.masked_weights(scores.data_ptr(), k_step.data_ptr(), q_step.data_ptr(), v_step.data_ptr(), table.data_ptr(),
                         table.shape[0], 0 if q_pos is None else q_pos.data_ptr(), out.data_ptr(), factor.data_ptr(),
                         heads, r, tk, stride, float(inv_sqrt_d), EXP_SCALE, attn_bits, as_double):
        return None
    return out, factor


def attention_output(sums: torch.Tensor, factor: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """value_products' int32 sums (B, Hkv * D, Hkv * 3 R) of the limbs, joined and times the
    factor (B, Hkv, R) as value_sums and attention do, then quantize_rows of each row's output
    (Hkv * R * D entries, head by head): int8 (B, Hkv * R * D) and float64 steps (B,)."""
    b, hk, r = factor.shape
    if (sums.dtype != torch.int32 or sums.shape != (b, hk * d, hk * 3 * r) or factor.dtype != torch.float64
            or not _usable(sums, factor)):
        return None
    q = torch.empty(b, hk * r * d, dtype=torch.int8)
    step = torch.empty(b, dtype=torch.float64)
    if _c.attention_output(sums.data_ptr(), factor.data_ptr(), q.data_ptr(), step.data_ptr(), b, hk, r, d,
                           LIMB_BITS):
        return None
    return q, step
