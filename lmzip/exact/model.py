"""A Llama model in exact integer form: the weights the exact forward pass reads.

Every Linear weight becomes int8 values in [-63, 63] with one float32 scale per
output row (63, not 127: without VNNI, oneDNN's int8 GEMM sums pairs of
products in saturating 16-bit lanes, and 255 * 63 * 2 is the largest pair that
cannot saturate). The token embedding stays float32 (a lookup is a copy); the
tied output head is its int8 form (under /3, of its smoothed columns). Quantizing runs once per load with
separately rounded element-wise operations, so every machine gets the same
integers; `fingerprint` pins them.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ModelError
from ..limits import LM_LONG_POSITIONS, LM_POSITIONS
from . import tables
from .cache_kernel import FLOAT32, cache_kernel
from .matmul import INT8, WEIGHT_LIMIT, fastest_kernel, prepare

# The arithmetic versions this code computes, by number (SPEC.md): /2 (which answers /1 within 2048
# positions), and /3, /2 over weights smoothed by powers of two from a calibration text (smoothing.py)
VERSIONS = {2: b"lmzip-exact-lm/2", 3: b"lmzip-exact-lm/3"}
# prefix + chunk tokens (arithmetic /2; /1 is the same restricted to 2048)
MAX_POSITIONS = LM_LONG_POSITIONS
V1_POSITIONS = LM_POSITIONS


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float          # RMSNorm epsilon, as the float32 value the config holds
    rope_theta: float


@dataclass
class IntLinear:
    weight: torch.Tensor  # (K, N) int8 in [-63, 63]: the second operand of torch._int_mm
    scale: torch.Tensor   # (N,) float64, each the float32 scale of one output row
    prepared: object = None  # the weight as another kernel reads it, where one is faster (matmul.prepare)


@dataclass
class Layer:
    attn_norm: torch.Tensor  # (H,) float32
    qkv: IntLinear           # N = (heads + 2 kv_heads) * head_dim
    o: IntLinear
    mlp_norm: torch.Tensor   # (H,) float32
    gate_up: IntLinear       # N = 2 * intermediate: gate, then up
    down: IntLinear


def quantize_weight(w: torch.Tensor) -> IntLinear:
    """(N, K) float weights -> int8 (K, N) with a float32 scale per output row: round(w / (max|w| / 63))."""
    w = w.detach().to("cpu", torch.float32)
    top = w.abs().amax(dim=1)
    scale = torch.where(top > 0, top / torch.full_like(top, WEIGHT_LIMIT), torch.ones_like(top))  # float32 division
    q = torch.round(w / scale[:, None]).clamp_(-WEIGHT_LIMIT, WEIGHT_LIMIT)
    return IntLinear(q.to(torch.int8).t().contiguous(), scale.to(torch.float64))


def _check_supported(config) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    problems = []
    if getattr(config, "model_type", None) != "llama":
        problems.append(f"model_type {getattr(config, 'model_type', None)!r}")
    if getattr(config, "hidden_act", None) != "silu":
        problems.append(f"hidden_act {config.hidden_act!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("biases")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type {rope.get('rope_type')!r}")
    if problems:
        raise ModelError("the exact lm arithmetic supports plain Llama models only, not " + ", ".join(problems))


@dataclass
class FloatLayer:
    """One layer's float32 weights as the exact model reads them, before quantizing."""
    attn_norm: torch.Tensor  # (H,)
    qkv: torch.Tensor        # (N, H): q_proj, k_proj, v_proj rows
    o: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor    # (2 I, H): gate_proj rows, then up_proj
    down: torch.Tensor       # (H, I)


@dataclass
class FloatWeights:
    embed: torch.Tensor      # (V, H) input embeddings
    layers: Iterable[FloatLayer]  # read once
    final_norm: torch.Tensor
    head: torch.Tensor       # (V, H) output head (the tied embedding; /3 scales its columns)


def float_weights(model) -> tuple[Shape, FloatWeights]:
    """The shape and the float32 CPU weights of a transformers Llama model; `layers` is a generator
    (each layer's concatenated matrices made as it is read, so that quantizing takes one layer's
    copies at a time)."""
    config = model.config
    _check_supported(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    shape = Shape(hidden=config.hidden_size, layers=config.num_hidden_layers,
                  heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                  head_dim=head_dim, intermediate=config.intermediate_size,
                  vocab=model.get_input_embeddings().num_embeddings,
                  eps=float(np.float32(config.rms_norm_eps)), rope_theta=theta)
    return shape, FloatWeights(embed=_f32(model.get_input_embeddings().weight), layers=_float_layers(model),
                               final_norm=_f32(model.model.norm.weight),
                               head=_f32(model.get_output_embeddings().weight))


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def _float_layers(model) -> Iterator[FloatLayer]:
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        yield FloatLayer(attn_norm=_f32(block.input_layernorm.weight),
                         qkv=_f32(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                         o=_f32(a.o_proj.weight), mlp_norm=_f32(block.post_attention_layernorm.weight),
                         gate_up=_f32(torch.cat([m.gate_proj.weight, m.up_proj.weight])),
                         down=_f32(m.down_proj.weight))


@dataclass
class ExactModel:
    shape: Shape
    embed: torch.Tensor      # (V, H) float32 input embeddings
    layers: list[Layer]
    final_norm: torch.Tensor  # (H,) float32
    head: IntLinear          # (H, V)
    cos: torch.Tensor        # (MAX_POSITIONS, head_dim) float32 rope tables
    sin: torch.Tensor
    exp: torch.Tensor        # (N + 1,) int64 exp table, see tables.exp_table
    fingerprint: bytes       # 32 bytes
    arithmetic: int = 2      # the version (VERSIONS) whose weights these are
    weight_kernel: str = INT8  # what multiplies the weights (use_kernel)
    cache_kernel: str = FLOAT32  # how decoding steps hold and multiply the key/value cache

    def __post_init__(self):
        self.exp_f32 = self.exp.float()  # the same integers (<= 2**24), exact in float32
        self.exp_i32 = self.exp.int()    # ... and as int32, which the C attention sums (fused.py)

    @classmethod
    def from_loaded(cls, lm, arithmetic: int = 2, cache: str | None = None) -> "ExactModel":
        """Quantize a LoadedModel (lmzip.models) once, for arithmetic /2 or, smoothed, /3. /3's
        calibration maxima are computed (cache None), or with cache "use" read from lmzip's cache
        where it holds them for this model (calibration_cache.py; that saves building /2 and its
        calibration pass), with "refresh" computed and written there."""
        if arithmetic not in VERSIONS:
            raise ValueError(f"unknown exact arithmetic /{arithmetic}")
        shape, weights = float_weights(lm.model)
        if arithmetic == 2:
            return cls.from_weights(shape, weights)
        from .calibration_cache import cached_maxima
        from .smoothing import calibration_maxima, smoothed_weights

        def calibrate():  # /2's model lives only for its pass over the calibration text
            return calibration_maxima(cls.from_weights(shape, float_weights(lm.model)[1]), lm.tokenizer)

        maxima = cached_maxima(lm, shape, calibrate, refresh=cache == "refresh") if cache else calibrate()
        return cls.from_weights(shape, smoothed_weights(maxima, weights), arithmetic=3)

    @classmethod
    def from_weights(cls, shape: Shape, weights: "FloatWeights", arithmetic: int = 2) -> "ExactModel":
        """Quantize float32 weights (float_weights' form)."""
        layers = [Layer(attn_norm=w.attn_norm, qkv=quantize_weight(w.qkv), o=quantize_weight(w.o),
                        mlp_norm=w.mlp_norm, gate_up=quantize_weight(w.gate_up), down=quantize_weight(w.down))
                  for w in weights.layers]
        cos, sin = tables.rope_tables(shape.rope_theta, shape.head_dim, MAX_POSITIONS)
        exact = cls(shape=shape, embed=weights.embed, layers=layers, final_norm=weights.final_norm,
                    head=quantize_weight(weights.head), cos=torch.from_numpy(cos), sin=torch.from_numpy(sin),
                    exp=torch.from_numpy(tables.exp_table()), fingerprint=b"", arithmetic=arithmetic)
        exact.fingerprint = exact._digest()
        exact.choose_kernels()
        return exact

    def linears(self):
        for layer in self.layers:
            yield from (layer.qkv, layer.o, layer.gate_up, layer.down)
        yield self.head

    def use_kernel(self, kernel: str) -> None:
        """Multiply the weights with `kernel` (matmul.py: int8, float32, onednn or onednn-int8): the
        same integers."""
        for lin in self.linears():
            lin.prepared = prepare(lin.weight, kernel)
        self.weight_kernel = kernel

    def tensors(self):
        """(name, tensor) of everything the arithmetic reads, in fingerprint order."""
        yield "embed", self.embed
        for i, layer in enumerate(self.layers):
            yield f"{i}.attn_norm", layer.attn_norm
            for name in ("qkv", "o", "gate_up", "down"):
                lin = getattr(layer, name)
                yield f"{i}.{name}.weight", lin.weight
                yield f"{i}.{name}.scale", lin.scale
            yield f"{i}.mlp_norm", layer.mlp_norm
        yield "final_norm", self.final_norm
        yield "head.weight", self.head.weight
        yield "head.scale", self.head.scale

    def _digest(self) -> bytes:
        h = hashlib.sha256(VERSIONS[self.arithmetic] + b"\0")
        s = self.shape
        h.update(struct.pack("<7I2d", s.hidden, s.layers, s.heads, s.kv_heads, s.head_dim,
                             s.intermediate, s.vocab, s.eps, s.rope_theta))
        for name, t in self.tensors():
            arr = t.contiguous().numpy()
            h.update(f"{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
            h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        h.update(tables.table_digest(s.rope_theta, s.head_dim, MAX_POSITIONS))
        return h.digest()

    def to(self, device) -> "ExactModel":
        """The same model with its tensors on `device` (the fingerprint is of the values, unchanged)."""
        mv = lambda t: t.to(device)  # noqa: E731
        lin = lambda x: IntLinear(mv(x.weight), mv(x.scale))  # noqa: E731
        moved = ExactModel(
            shape=self.shape, embed=mv(self.embed),
            layers=[Layer(mv(l.attn_norm), lin(l.qkv), lin(l.o), mv(l.mlp_norm), lin(l.gate_up), lin(l.down))
                    for l in self.layers],
            final_norm=mv(self.final_norm), head=lin(self.head), cos=mv(self.cos), sin=mv(self.sin),
            exp=mv(self.exp), fingerprint=self.fingerprint, arithmetic=self.arithmetic)
        moved.choose_kernels()
        return moved

    def choose_kernels(self) -> None:
        """The fastest exact kernels on this device for the weights and the key/value cache (each
        timed once per process)."""
        self.use_kernel(fastest_kernel(self.device.type))
        self.cache_kernel = cache_kernel(self.device.type, self.head_shape)

    @property
    def head_shape(self) -> tuple[int, int, int]:
        """(kv heads, query heads per kv head, head size): what the cache kernel is chosen for."""
        s = self.shape
        return s.kv_heads, s.heads // s.kv_heads, s.head_dim

    @property
    def device(self) -> torch.device:
        return self.embed.device
