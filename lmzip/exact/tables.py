"""Constant tables of the exact arithmetic, built with Python integer arithmetic only.

No host libm touches a value that must match across machines: exp and the
rotary cos/sin come from fixed-point series evaluated with Python integers
(every machine computes the same integers), then rounded once. SPEC.md ("lm payloads")
defines each table; `table_digest` pins them in the model fingerprint.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal, localcontext
from functools import lru_cache

import numpy as np

EXP_STEP_BITS = 10   # exp is tabulated on the grid x = n / 2**10
EXP_ONE_BITS = 24    # E[n] = round(2**24 * exp(-n / 2**10))
_FIX = 160           # fixed-point bits of the reference computations


def _exp_neg_fixed(num: int, den: int) -> int:
    """floor-ish fixed-point 2**_FIX * exp(-num/den) for 0 <= num/den <= 1, by its Taylor series."""
    one = 1 << _FIX
    term = one
    total = one
    k = 1
    while term:
        term = term * num // (den * k)
        total += -term if k % 2 else term
        k += 1
    return total


@lru_cache(maxsize=None)
def exp_table() -> np.ndarray:
    """E[n] = nearest integer to 2**24 * exp(-n/1024), for n = 0 .. N where E[N] is the first 0.

    Built as powers of exp(-1/1024) in 160-bit fixed point (error far below the final rounding).
    """
    step = _exp_neg_fixed(1, 1 << EXP_STEP_BITS)
    value = 1 << _FIX
    shift = _FIX - EXP_ONE_BITS
    out = []
    while True:
        e = (value + (1 << (shift - 1))) >> shift
        out.append(e)
        if e == 0:
            break
        value = value * step >> _FIX
    return np.array(out, dtype=np.int64)


def _cos_sin_fixed(angle: int) -> tuple[int, int]:
    """Fixed-point cos and sin of a fixed-point angle in [0, 2): Taylor series."""
    one = 1 << _FIX
    c, s = one, angle
    term_c, term_s = one, angle
    k = 1
    while term_c or term_s:
        term_c = -term_c * angle // one * angle // one // ((2 * k - 1) * (2 * k))
        term_s = -term_s * angle // one * angle // one // ((2 * k) * (2 * k + 1))
        c += term_c
        s += term_s
        k += 1
    return c, s


def _inv_freqs_fixed(theta: float, head_dim: int) -> list[int]:
    """2**_FIX * theta**(-2i/d) for i < d/2, via correctly rounded decimal ln and exp (60 digits)."""
    out = []
    with localcontext() as ctx:
        ctx.prec = 60
        log_theta = Decimal(theta).ln()  # Decimal(float) is exact
        for i in range(head_dim // 2):
            value = (-(Decimal(2 * i) / Decimal(head_dim)) * log_theta).exp()
            out.append(int((value * (1 << _FIX)).to_integral_value()))
    return out


@lru_cache(maxsize=8)
def rope_tables(theta: float, head_dim: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (positions, head_dim) float32, in the rotate-half layout of Llama.

    Entry [p, i] (and [p, i + d/2]) is cos/sin(p * theta**(-2i/d)) rounded to float64, then float32;
    successive positions come from exact fixed-point rotation by the angle of one position.
    """
    one = 1 << _FIX
    half = head_dim // 2
    cos = np.empty((positions, half), dtype=np.float64)
    sin = np.empty((positions, half), dtype=np.float64)
    for i, inv_freq in enumerate(_inv_freqs_fixed(theta, head_dim)):
        c1, s1 = _cos_sin_fixed(inv_freq)  # inv_freq <= 1 rad
        c, s = one, 0
        for p in range(positions):
            cos[p, i] = c / one  # int / int is correctly rounded to float64
            sin[p, i] = s / one
            c, s = (c * c1 - s * s1) >> _FIX, (s * c1 + c * s1) >> _FIX
    cos32 = np.concatenate([cos, cos], axis=1).astype(np.float32)
    sin32 = np.concatenate([sin, sin], axis=1).astype(np.float32)
    return cos32, sin32


def table_digest(theta: float, head_dim: int, positions: int) -> bytes:
    """SHA-256 of the exp table and the rope tables (little-endian bytes), for the fingerprint."""
    h = hashlib.sha256()
    h.update(exp_table().astype("<i8").tobytes())
    for table in rope_tables(theta, head_dim, positions):
        h.update(table.astype("<f4").tobytes())
    return h.digest()
