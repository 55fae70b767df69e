"""Arithmetic /3: /2's forward pass over weights smoothed by powers of two.

The exact arithmetic rounds every Linear's input to int8 per token vector, so a channel far
larger than the rest leaves few levels to the others; on alice29.txt those roundings cost
about 1.4 % of the bits (BENCHMARKS.md). SmoothQuant (Xiao et al., 2023) divides input
channel k by a factor s_k and multiplies the weight's column k by it: the same product, with
flatter inputs. Here s_k = 2**e_k, so the division folds exactly into the RMSNorm weight before
the Linear (or, for down_proj, into up_proj's row k) and the forward pass is /2's unchanged:
only the weights differ. e_k is about log2(sqrt(max|x_k| / max|W[:, k]|)), with max|x_k| taken
from /2's own forward pass over a calibration text shipped with lmzip, so every machine derives
the same exponents. o_proj keeps its weights (its input comes from the attention, where a
factor would have to pass through the int8 value heads).
"""

from __future__ import annotations

import dataclasses
import hashlib
from importlib import resources

import numpy as np
import torch

from ..errors import ModelError
from . import forward as F

CALIBRATION_FILE = "calibration.txt"  # prose, verse, a play, lists, code; LF and CRLF lines; tabs
CALIBRATION_SHA256 = "0b1b3fa5e5d5cbf5960f24e082ef6000150b5dec81fa7af994d06f02100a58e9"
CALIBRATION_TOKENS = 2048  # at most this many of its first tokens (the embedded model makes 1,145)
EXPONENT_LIMIT = 16        # |e_k| at most: the weights stay far from float32's range limits


def calibration_text() -> str:
    """The text, byte for byte (its CRLF lines kept), checked against its pinned digest."""
    data = resources.files(__package__).joinpath(CALIBRATION_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != CALIBRATION_SHA256:
        raise ModelError(f"lmzip's {CALIBRATION_FILE} is not the text arithmetic /3 was defined on "
                         "(a damaged installation): reinstall lmzip")
    return data.decode("utf-8")


def calibration_ids(tokenizer) -> list[int]:
    ids = tokenizer(calibration_text(), add_special_tokens=False)["input_ids"][:CALIBRATION_TOKENS]
    if not ids:
        raise ModelError("the model's tokenizer makes no tokens of arithmetic /3's calibration text")
    return list(ids)


def _normed_maxima(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """max over positions of |x_k * w_k| * c (float64), c = 1 / rms(x): what norm_quantize rounds."""
    scaled = (x * weight).abs_().double().mul_(F.rms_factor(x, eps)[..., None])
    return scaled.reshape(-1, x.shape[-1]).amax(0)


@dataclasses.dataclass
class Maxima:
    """Per layer, the largest magnitude of each input channel of qkv, gate_up and down, and of the
    head after the last layer (float64)."""
    attn: list[torch.Tensor]
    mlp: list[torch.Tensor]
    down: list[torch.Tensor]
    head: torch.Tensor | None = None


@torch.inference_mode()
def channel_maxima(exact, ids: list[int]) -> Maxima:
    """The inputs' channel maxima over one whole-sequence pass of `exact` (/2) over `ids`."""
    from ..precision import exact_float32

    s = exact.shape
    maxima = Maxima([], [], [])
    with exact_float32(), torch.autocast("cpu", enabled=False):
        cache = F.Cache(s, 1, len(ids), exact.device)
        x = exact.embed[torch.tensor([ids], device=exact.device)]
        for index, layer in enumerate(exact.layers):
            maxima.attn.append(_normed_maxima(x, layer.attn_norm, s.eps))
            x = x + F.attention_block(exact, layer, index, x, cache, 0)
            maxima.mlp.append(_normed_maxima(x, layer.mlp_norm, s.eps))
            q, step = F.norm_quantize(x, layer.mlp_norm, s.eps)
            gate, up = F.linear(q, step, layer.gate_up).chunk(2, dim=-1)
            h = F.silu(exact, gate) * up                            # as mlp_block's, before rounding
            maxima.down.append(h.abs().double().reshape(-1, h.shape[-1]).amax(0))
            x = x + F.linear(*F.quantize_rows(h), layer.down)
        maxima.head = _normed_maxima(x, exact.final_norm, s.eps)
    return maxima


def exponents(x_max: torch.Tensor, w_max: torch.Tensor) -> torch.Tensor:
    """e_k = floor((E_k + 1) / 2), E_k = floor(log2(x_max_k / w_max_k)) (the ratio a float64
    division; E_k read from its binary exponent, no libm), so 2**e_k is the square root of the ratio
    to within a factor of sqrt(2); 0 where either maximum is 0; clamped to +-EXPONENT_LIMIT."""
    x, w = x_max.double().numpy(), w_max.double().numpy()
    live = (x > 0) & (w > 0)
    ratio = np.where(live, x / np.where(live, w, 1.0), 1.0)
    _, exp = np.frexp(ratio)                           # ratio = m * 2**exp, 0.5 <= m < 1
    e = np.floor_divide(exp.astype(np.int64), 2)       # (E + 1) // 2 with E = exp - 1
    e = np.clip(np.where(live, e, 0), -EXPONENT_LIMIT, EXPONENT_LIMIT)
    return torch.from_numpy(e)


def _powers(e: torch.Tensor) -> torch.Tensor:
    """2**e as float32, exactly (numpy's ldexp sets the exponent; torch's is a pow)."""
    return torch.from_numpy(np.ldexp(np.ones(e.shape, dtype=np.float32), e.numpy().astype(np.int32)))


def _scaled(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """t * factor, checked to be exact and normal: a result below float32's normal range may round,
    and a host that flushes subnormals to zero would compute with another value."""
    out = t * factor
    subnormal = (out != 0) & (out.abs() < torch.finfo(torch.float32).tiny)
    if not torch.equal(out * (1 / factor), t) or bool(subnormal.any()):
        raise ModelError("the model's weights are too small for arithmetic /3's smoothing "
                         "(a scaled weight leaves float32's normal range)")
    return out


def _column_maxima(w: torch.Tensor) -> torch.Tensor:
    return w.abs().amax(0)


def smoothed_layer(w, maxima_attn, maxima_mlp, maxima_down):
    """One layer's float weights (model.FloatLayer) smoothed by the exponents of its channel maxima:
    each input channel k divided by 2**e_k before the Linear and its weight column multiplied by it
    (exact in float32: powers of two); for down_proj, up_proj's row k divided instead."""
    from .model import FloatLayer

    sa = _powers(exponents(maxima_attn, _column_maxima(w.qkv)))
    sm = _powers(exponents(maxima_mlp, _column_maxima(w.gate_up)))
    sd = _powers(exponents(maxima_down, _column_maxima(w.down)))
    rows = torch.cat([torch.ones(w.down.shape[1]), 1 / sd])      # gate rows unchanged, up row n / 2**e_n
    return FloatLayer(attn_norm=_scaled(w.attn_norm, 1 / sa), qkv=_scaled(w.qkv, sa), o=w.o,
                      mlp_norm=_scaled(w.mlp_norm, 1 / sm), gate_up=_scaled(_scaled(w.gate_up, sm), rows[:, None]),
                      down=_scaled(w.down, sd))


def calibration_maxima(exact, tokenizer) -> Maxima:
    """The channel maxima of `exact`'s (/2) pass over the calibration text."""
    return channel_maxima(exact, calibration_ids(tokenizer))


def smoothed_weights(maxima: Maxima, weights):
    """/3's float weights: `weights` (model.FloatWeights, /2's) smoothed with the exponents of the
    calibration `maxima`; layers made as read."""
    from .model import FloatWeights

    sh = _powers(exponents(maxima.head, _column_maxima(weights.head)))
    layers = (smoothed_layer(w, a, m, d) for w, a, m, d in zip(weights.layers, maxima.attn, maxima.mlp, maxima.down))
    return FloatWeights(embed=weights.embed, layers=layers, final_norm=_scaled(weights.final_norm, 1 / sh),
                        head=_scaled(weights.head, sh))
