"""The C steps of the exact arithmetic (lmzip/_fused.c) give the torch code's bits.

Each fused function is compared with the torch code it stands for (forward.py with the
extension switched off), on random inputs and on the cases that test a rounding: ties at .5,
zero rows, values past the exp table, subnormals. Where an input is not finite the C code
declines and the torch code runs. A second build of the same source, without vector clones and
unoptimized, gives the same bits as the installed one."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import pytest
import torch

from conftest import ROOT
from lmzip.exact import cache_kernel as CK
from lmzip.exact import forward as F
from lmzip.exact import fused
from lmzip.exact import tables

pytestmark = pytest.mark.skipif(not fused.built(), reason="the C extension is not built here")

TABLE = torch.from_numpy(tables.exp_table())


def test_the_extension_is_built_where_ci_requires_it():
    """CI sets LMZIP_REQUIRE_FUSED: there a missing build must fail, not skip every test below."""
    if os.environ.get("LMZIP_REQUIRE_FUSED") == "1":
        assert fused.built() and fused.ACTIVE


def _torch(monkeypatch, fn, *args):
    monkeypatch.setattr(fused, "ACTIVE", False)
    try:
        return fn(*args)
    finally:
        monkeypatch.setattr(fused, "ACTIVE", True)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


def _rows(shape, seed, scale=3.0):
    """Random float32 rows with hard cases: a zero row, ties (integers + 0.5 after the step
    scaling), a huge and a tiny row, subnormals, negative zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    flat = x.view(-1, shape[-1])
    if flat.shape[0] >= 5:
        flat[0] = 0.0
        flat[1] = (torch.arange(shape[-1]) % 255 - 127).float() + 0.5   # many exact ties once scaled
        flat[1, 0] = 127.5                                              # the row's max: factor 127/127.5
        flat[2] *= 1e30
        flat[3] = torch.randn(shape[-1], generator=g) * 1e-30         # a tiny row ...
        flat[3, 1::2] *= 1e-11                                          # ... of subnormals but its max
        flat[4, ::2] = -0.0
    return x


@pytest.mark.parametrize("shape", [(6, 576), (2, 3, 17), (5, 1), (0, 8), (7, 64)])
@pytest.mark.parametrize("step_dtype", [torch.float64, torch.float32])
def test_quantize_rows_matches(monkeypatch, shape, step_dtype):
    x = _rows(shape, seed=shape[-1])
    assert fused.quantize_rows(x, step_dtype) is not None
    _same(F.quantize_rows(x, step_dtype), _torch(monkeypatch, F.quantize_rows, x, step_dtype))


@pytest.mark.parametrize("k", [576, 17, 1, 64, 33])
def test_norm_quantize_matches(monkeypatch, k):
    x = _rows((6, 1, k), seed=k)
    w = torch.randn(k, generator=torch.Generator().manual_seed(1))
    assert fused.norm_quantize(x, w, 1e-5) is not None
    _same(F.norm_quantize(x, w, 1e-5), _torch(monkeypatch, F.norm_quantize, x, w, 1e-5))


def test_silu_quantize_matches(monkeypatch, exact_tables):
    g = torch.Generator().manual_seed(2)
    gate_up = torch.randn(5, 3, 2 * 40, generator=g) * 4
    gate_up[0, 0, :40] = torch.linspace(-30, 30, 40)        # past both ends of the exp table
    gate_up[0, 1, :40] = 0.0
    gate_up[1, 0, :40] = torch.arange(40) / 1024 + 1 / 2048  # ties on the table's grid

    def torch_path(gu):
        gate, up = gu.chunk(2, dim=-1)
        return F.quantize_rows(F.silu(exact_tables, gate) * up)
    got = fused.silu_quantize(gate_up, exact_tables.exp_i32)
    assert got is not None
    _same(got, _torch(monkeypatch, torch_path, gate_up))


@pytest.mark.parametrize("b, t, start", [(4, 1, 0), (3, 1, 1999), (2, 9, 100)])
def test_rope_quantize_matches(monkeypatch, exact_tables, b, t, start):
    hq, hk, d = 6, 2, 16
    cos, sin = exact_tables.cos[start:start + t, :d], exact_tables.sin[start:start + t, :d]
    cos, sin = cos.contiguous(), sin.contiguous()
    qkv = _rows((b, t, (hq + 2 * hk) * d), seed=t)

    def torch_path():
        roped = F.rope(qkv[..., :(hq + hk) * d].reshape(b, t, hq + hk, d), cos, sin)
        return F.quantize_rows(torch.cat([roped, qkv[..., (hq + hk) * d:].reshape(b, t, hk, d)], dim=2),
                               torch.float32)
    got = fused.rope_quantize(qkv, cos, sin, hq + hk, hq + 2 * hk)
    assert got is not None
    _same(got, _torch(monkeypatch, torch_path))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("into", [False, True])
def test_linear_scaling_matches(monkeypatch, dtype, into):
    """A Linear's exact sums times its weight scales and row steps, from any kernel's sum type."""
    g = torch.Generator().manual_seed(6)
    y = torch.randint(-(1 << 23), 1 << 23, (7, 300), generator=g).to(dtype)
    y[0] = 0
    scale = torch.rand(300, generator=g, dtype=torch.float64) * 1e-3
    steps = torch.rand(7, 1, generator=g, dtype=torch.float64) * 1e-2
    steps[1] = 0.0

    def scaled():
        out = torch.full((7, 300), float("nan")) if into else None
        lin = F.IntLinear(weight=None, scale=scale)
        monkeypatch.setattr(F, "int_matmul", lambda q, w, prepared: y)
        got = F.linear(torch.zeros(7, 5, dtype=torch.int8), steps.reshape(7), lin, out)
        assert out is None or got is out
        return got
    assert fused.scale_rows(y, scale, steps) is not None
    _same((scaled(),), (_torch(monkeypatch, scaled),))


def test_shift_to_u8_matches():
    x = torch.arange(-128, 128, dtype=torch.int8).repeat(3, 1)
    assert torch.equal(fused.shift_u8(x), x.view(torch.uint8) ^ 128)
    assert torch.equal(fused.shift_u8(x).long(), x.long() + 128)


@pytest.mark.parametrize("rows, positions, start", [(3, 1, 0), (2, 5, 7), (1, 4, 8)])
def test_putting_heads_in_an_int8_cache_matches(rows, positions, start):
    shape = F.Shape(hidden=64, layers=1, heads=4, kv_heads=2, head_dim=8, intermediate=8, vocab=8, eps=1e-5,
                    rope_theta=10000.0)
    g = torch.Generator().manual_seed(positions)
    heads = torch.randint(-127, 128, (rows, positions, 8, 8), generator=g, dtype=torch.int8)
    steps = torch.rand(rows, positions, 8, generator=g)
    caches = [F.Cache(shape, rows, 12, "cpu", CK.INT8) for _ in range(2)]
    _, k, v = heads.split([4, 2, 2], dim=2)
    _, k_step, v_step = steps.split([4, 2, 2], dim=2)
    caches[0].put(0, start, k, k_step, v, v_step)
    c = caches[1]
    assert fused.put_heads(heads, steps, 4, 2, c.k[0], c.v[0], c.k_scale[0], c.v_scale[0], start)
    for store in ("k", "v", "k_scale", "v_scale"):
        assert torch.equal(getattr(caches[0], store)[0], getattr(c, store)[0]), store
    assert not fused.put_heads(heads, steps, 4, 2, c.k[0], c.v[0], c.k_scale[0], c.v_scale[0], 12 - positions + 1)
    assert not fused.put_heads(heads, steps, 3, 2, c.k[0], c.v[0], c.k_scale[0], c.v_scale[0], start)


def _attention_case(b, hk, group, keys, seed):
    """A layer's int8 cache and a step's int8 queries, with the cases that test the weights: a row
    whose value steps are all zero (U's top 0), one whose query step is zero (every weight equal)."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    shape = F.Shape(hidden=hk * group * d, layers=1, heads=hk * group, kv_heads=hk, head_dim=d,
                    intermediate=8, vocab=8, eps=1e-5, rope_theta=10000.0)
    cache = F.Cache(shape, b, keys + 3, "cpu", CK.INT8)
    k = torch.randint(-127, 128, (b, keys, hk, d), generator=g, dtype=torch.int8)
    v = torch.randint(-127, 128, (b, keys, hk, d), generator=g, dtype=torch.int8)
    k_step = torch.rand(b, keys, hk, generator=g) * 0.05
    v_step = torch.rand(b, keys, hk, generator=g) * 0.05
    v_step[0] = 0.0
    cache.put(0, 0, k, k_step, v, v_step)
    q = torch.randint(-127, 128, (b, hk, group, d), generator=g, dtype=torch.int8)
    q_step = torch.rand(b, hk, group, generator=g) * 0.5
    q_step[-1, 0, 0] = 0.0
    return q, q_step, cache, keys


@pytest.mark.parametrize("b, hk, group, keys", [(4, 3, 3, 300), (2, 1, 1, 1), (3, 2, 4, 2050)])
def test_cached_attention_matches(monkeypatch, exact_tables, b, hk, group, keys):
    if not CK.exact_at_the_limits():
        pytest.skip("torch._int_mm is not exact on this CPU")
    q, q_step, cache, end = _attention_case(b, hk, group, keys, seed=keys)

    def torch_path():
        out = F.cached_attention(exact_tables, q, q_step, cache, 0, end)
        d = q.shape[-1]
        return F.quantize_rows(out.reshape(b, hk, 1, group, d).transpose(1, 2).reshape(b, 1, hk * group * d))
    want_q, want_step = _torch(monkeypatch, torch_path)
    got = F.fused_cached_attention(exact_tables, q, q_step, cache, 0, end)
    assert got is not None
    _same(got, (want_q.reshape(b, -1), want_step.reshape(b)))


@pytest.mark.parametrize("positions, first, group, keys", [(64, 0, 3, 64), (5, 70, 3, 75), (1, 0, 2, 9), (20, 100, 1, 120)])
def test_whole_sequence_attention_matches(monkeypatch, exact_tables, positions, first, group, keys):
    """attention() of a block of query positions first.. over keys up to the block's last (masked
    to each row's past), U in float64 (many rows) or float32 (few), the steps sliced from a
    cache's as float_attention slices them."""
    g = torch.Generator().manual_seed(keys)
    b, hk, d = 2, 3, 16
    rows = positions * group
    q = torch.randint(-127, 128, (b, hk, rows, d), generator=g).float()
    k = torch.randint(-127, 128, (b, hk, keys, d), generator=g).float()
    v = torch.randint(-127, 128, (b, hk, keys, d), generator=g).float()
    k_step = (torch.rand(b, hk, keys + 7, generator=g) * 0.05)[:, :, :keys]
    v_step = (torch.rand(b, hk, keys + 7, generator=g) * 0.05)[:, :, :keys]
    v_step[1, 0] = 0.0
    q_step = torch.rand(b, hk, rows, generator=g) * 0.5
    q_pos = torch.arange(first, first + positions).repeat_interleave(group) if first + positions == keys else None
    run = lambda: F.attention(exact_tables, q, q_step, k, k_step, v, v_step, q_pos, first)  # noqa: E731
    as_double = rows >= F.FLOAT64_ROWS
    assert fused.masked_weights(torch.matmul(q, k.transpose(-1, -2)), k_step, q_step, v_step, exact_tables.exp_i32,
                                q_pos, 0.25, F.ATTN_BITS, as_double) is not None
    _same((run(),), (_torch(monkeypatch, run),))


def test_inputs_not_finite_go_to_the_torch_code(monkeypatch):
    x = _rows((6, 33), seed=5)
    x[2, 7] = float("inf")
    assert fused.quantize_rows(x, torch.float64) is None
    assert fused.norm_quantize(x, torch.ones(33), 1e-5) is None
    x[2, 7] = float("nan")
    assert fused.quantize_rows(x, torch.float32) is None
    assert F.quantize_rows(x[3:]) is not None                     # the finite rows still run in C


def test_rows_too_small_to_scale_go_to_the_torch_code():
    """127 / max|t| overflows for a row below 127 / FLT_MAX: 0 * inf is not for the C code to decide."""
    x = _rows((6, 40), seed=8)
    x[1] = 1e-38
    assert fused.quantize_rows(x, torch.float64) is None
    assert fused.quantize_rows(x[2:], torch.float64) is not None


def test_value_steps_too_small_for_the_limbs_go_to_the_torch_code(exact_tables):
    """U's scale u_top / 2**18 subnormal: the C rounding's bound would not hold."""
    if not CK.exact_at_the_limits():
        pytest.skip("torch._int_mm is not exact on this CPU")
    q, q_step, cache, end = _attention_case(2, 1, 1, 5, seed=3)
    cache.v_scale[0][1] = 1e-43
    assert F.fused_cached_attention(exact_tables, q, q_step, cache, 0, end) is None
    cache.v_scale[0][1] = 1e-3
    assert F.fused_cached_attention(exact_tables, q, q_step, cache, 0, end) is not None


def test_an_unusable_layout_goes_to_the_torch_code():
    x = torch.randn(8, 6)
    assert fused.quantize_rows(x.t(), torch.float64) is None     # not contiguous
    assert fused.quantize_rows(x.double(), torch.float64) is None


@pytest.fixture(scope="module")
def exact_tables():
    """What the functions above read of an ExactModel: its exp and rope tables."""
    class Tables:
        exp = TABLE
        exp_f32 = TABLE.float()
        exp_i32 = TABLE.int()
        cos, sin = (torch.from_numpy(t) for t in tables.rope_tables(10000.0, 16, 2048))
        shape = F.Shape(hidden=16, layers=1, heads=1, kv_heads=1, head_dim=16, intermediate=8, vocab=8,
                        eps=1e-5, rope_theta=10000.0)
    return Tables


PLAIN_BUILD = """
import sys
from setuptools import Extension, setup
setup(name="plain", script_args=["build_ext", "--build-lib", sys.argv[1], "--build-temp", sys.argv[2]],
      ext_modules=[Extension("lmzip._fused", [sys.argv[3]],
                             extra_compile_args=["-O0", "-ffp-contract=off", "-DLMZIP_NO_CLONES"])])
"""


def test_a_plain_unoptimized_build_gives_the_same_bits(tmp_path, monkeypatch, exact_tables):
    """The installed build's vector clones (AVX2, AVX-512) against one scalar build at -O0."""
    if not sysconfig.get_config_var("CC"):
        pytest.skip("no C compiler")
    out = subprocess.run([sys.executable, "-c", PLAIN_BUILD, str(tmp_path / "lib"), str(tmp_path / "tmp"),
                          str(ROOT / "lmzip" / "_fused.c")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    import importlib.util
    path = next((tmp_path / "lib" / "lmzip").glob("_fused*"))
    spec = importlib.util.spec_from_file_location("lmzip._fused", path)  # PyInit__fused
    plain = importlib.util.module_from_spec(spec)
    assert plain is not fused._c and spec.origin != fused._c.__file__
    spec.loader.exec_module(plain)
    cases = []
    for seed, k in ((1, 576), (2, 33), (3, 1536)):
        x = _rows((6, 1, k), seed=seed)
        w = torch.randn(k, generator=torch.Generator().manual_seed(seed))
        gate_up = torch.randn(4, 2 * k, generator=torch.Generator().manual_seed(seed)) * 5
        cases += [(fused.quantize_rows, (x, torch.float64)), (fused.norm_quantize, (x, w, 1e-5)),
                  (fused.silu_quantize, (gate_up, exact_tables.exp_i32))]
    if CK.exact_at_the_limits():
        q, q_step, cache, end = _attention_case(3, 3, 3, 700, seed=9)
        cases.append((F.fused_cached_attention, (exact_tables, q, q_step, cache, 0, end)))
    built = fused._c
    for fn, args in cases:
        installed = fn(*args)
        assert installed is not None
        monkeypatch.setattr(fused, "_c", plain)
        try:
            _same(fn(*args), installed)
        finally:
            monkeypatch.setattr(fused, "_c", built)


def test_the_speed_tool_finds_the_same_bits_in_every_function(capsys, monkeypatch):
    if not CK.exact_at_the_limits():
        pytest.skip("torch._int_mm is not exact on this CPU")
    sys.path.insert(0, str(ROOT / "tools"))
    import fused_speed
    monkeypatch.setattr(sys, "argv", ["fused_speed.py", "--rows", "2", "--context", "30", "--calls", "2"])
    threads = torch.get_num_threads()
    try:
        fused_speed.main()
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 5 and all(line.endswith("same bits: True") for line in lines), lines
