"""The exact lm arithmetic: the same frequencies bit for bit under every setting we can vary here
(threads, batch size and composition, incremental vs whole-sequence, ATen and oneDNN
instruction sets), the coder's round trip, damaged payloads, pinned tables and fingerprints."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_MODEL
from lmzip.exact import cache_kernel as CK
from lmzip.exact import forward as F
from lmzip.exact import tables
from lmzip.exact import coding
from lmzip.exact.coding import check_chunks, decode_chunks, encode_chunks
from lmzip.exact.model import MAX_POSITIONS, V1_POSITIONS, WEIGHT_LIMIT, ExactModel, quantize_weight
from lmzip.models import load_model
from lmzip.rangecoder import MAX_TOTAL

PREFIX = (256,)
# Pins: a change to the arithmetic must take a new version (model.VERSIONS), then these. The frequencies are
# those of arithmetic /1 too (/2 only adds positions 2048 to 8191).
TINY_FINGERPRINT = "7d054096993982db0a8ea96244e197e5c4f9abc405313a061d675bbcb6b1d65d"
TINY_FREQ_SHA256 = "9782e05e21f70de4e11a4e4b5f600645268615fdfb93ce891d4b501bdbd2522d"
EXP_TABLE_SHA256 = "2332e04e6d9f19cf66f31019d9ba1ab99915bcd7a645977e91e76c00319f63bc"


@pytest.fixture(scope="module")
def lm():
    return load_model(TINY_MODEL, device="cpu")


@pytest.fixture(scope="module")
def exact(lm):
    return ExactModel.from_loaded(lm)


@pytest.fixture(params=CK.CACHE_KERNELS)
def held_as(request, exact):
    """The decoding cache held and multiplied each way (cache_kernel.py), whichever this CPU picks."""
    kernel = request.param
    if kernel == CK.INT8 and not CK.exact_at_the_limits():
        assert CK.cache_kernel("cpu") == CK.FLOAT32  # never chosen where its products are not exact
        pytest.skip("torch._int_mm is not exact on this CPU")
    before = exact.cache_kernel
    exact.cache_kernel = kernel
    yield kernel
    exact.cache_kernel = before


def _ids(rows, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 257, (rows, length), generator=g)


def _logits(exact, ids):
    return F.forward(exact, ids, F.Cache(exact.shape, ids.shape[0], ids.shape[1], "cpu"))


def _freq_digest(exact, ids):
    return hashlib.sha256(F.frequencies(exact, _logits(exact, ids)).numpy().tobytes()).hexdigest()


def test_pinned_tables_fingerprint_and_frequencies(exact):
    assert hashlib.sha256(tables.exp_table().astype("<i8").tobytes()).hexdigest() == EXP_TABLE_SHA256
    assert exact.fingerprint.hex() == TINY_FINGERPRINT
    assert _freq_digest(exact, _ids(2, 30)) == TINY_FREQ_SHA256


def test_tables_agree_with_the_functions_they_stand_for():
    e = tables.exp_table()
    x = np.arange(len(e)) / 1024
    assert np.abs(e - 2.0 ** 24 * np.exp(-x)).max() <= 0.5 + 1e-6
    assert e[-1] == 0 and e[-2] > 0
    cos, sin = tables.rope_tables(10000.0, 8, 300)
    angles = np.arange(300)[:, None] * 10000.0 ** (-np.arange(0, 8, 2) / 8)
    assert np.abs(cos[:, :4] - np.cos(angles)).max() < 1e-7
    assert np.abs(sin[:, 4:] - np.sin(angles)).max() < 1e-7


def test_close_to_the_float_model(lm, exact):
    ids = _ids(2, 40)
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(ids).logits.double(), -1)
    ours = torch.log_softmax(_logits(exact, ids).double(), -1)
    kl = (ref.exp() * (ref - ours)).sum(-1).mean().item()
    assert kl < 0.1, kl


def test_incremental_equals_whole_sequence(exact, held_as):
    ids = _ids(3, 48)
    whole = _logits(exact, ids)
    assert torch.equal(F.forward(exact, ids, F.decoding_cache(exact, 3, 48)), whole)   # a pass in either form
    cache = F.decoding_cache(exact, 3, 48)
    parts = [F.forward(exact, ids[:, :1], cache)]    # a step over one key, as a decoder's first
    parts.append(F.forward(exact, ids[:, 1:5], cache))
    parts += [F.forward(exact, ids[:, i:i + 1], cache) for i in range(5, 40)]
    parts.append(F.forward(exact, ids[:, 40:], cache))
    assert torch.equal(torch.cat(parts, 1), whole)


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_batch_size_and_composition_do_not_matter(exact, batch):
    target = _ids(1, 33, seed=1)
    alone = _logits(exact, target)
    others = _ids(batch, 33, seed=batch + 10)
    for row in range(batch):
        mixed = others.clone()
        mixed[row] = target[0]
        assert torch.equal(_logits(exact, mixed)[row], alone[0])


def test_threads_do_not_matter(exact):
    ids = _ids(4, 64, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _logits(exact, ids)
        torch.set_num_threads(2)
        two = _logits(exact, ids)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


CHILD = textwrap.dedent("""
    import hashlib, json, sys, torch
    from lmzip.exact import cache_kernel as CK
    from lmzip.exact import forward as F
    from lmzip.exact import matmul as M
    from lmzip.exact.model import ExactModel, WEIGHT_LIMIT
    from lmzip.models import load_model
    torch.set_num_threads(int(sys.argv[2]))
    lm = load_model(sys.argv[1], device="cpu")
    exact = ExactModel.from_loaded(lm)
    exact2_fingerprint = exact.fingerprint.hex()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 257, (3, 50), generator=g)

    def digests():
        # frequencies of the whole-sequence pass, and token by token over the key/value cache
        # as the decoder runs (the last 10 positions)
        whole = F.forward(exact, ids, F.Cache(exact.shape, 3, 50, "cpu"))
        cache = F.decoding_cache(exact, 3, 50)
        F.forward(exact, ids[:, :40], cache)
        steps = torch.cat([F.forward(exact, ids[:, p:p + 1], cache) for p in range(40, 50)], dim=1)
        return [hashlib.sha256(F.frequencies(exact, t).numpy().tobytes()).hexdigest() for t in (whole, steps)]

    freq, steps = digests()
    # the key/value cache's int8 products: chosen only where exact at the limits, and then the
    # same frequencies (forced here, whatever the timing chose)
    chosen, int8_exact = exact.cache_kernel, CK.exact_at_the_limits()
    exact.cache_kernel = CK.INT8
    int8_steps = digests()[1] if int8_exact else None
    exact.cache_kernel = chosen
    # the worst cases for saturating or rounding kernels, through each: every product at the
    # limit, of either sign, over 2047 inputs (odd sums past 2**24 of oneDNN's shifted products)
    worst_ok = {}
    for kernel in M.kernels("cpu"):
        worst_ok[kernel] = True
        for x_sign, w_sign in ((1, 1), (-1, 1), (1, -1)):
            a = torch.full((5, 2047), 127 * x_sign, dtype=torch.int8)
            w = torch.full((2047, 24), WEIGHT_LIMIT * w_sign, dtype=torch.int8)
            worst_ok[kernel] &= bool(torch.equal(F.int_matmul(a, w, M.prepare(w, kernel)).long(),
                                                 a.long() @ w.long()))
    # and through every kernel this torch has for the weights (the same integers)
    kernels = {}
    for kernel in M.kernels("cpu"):
        exact.use_kernel(kernel)
        kernels[kernel] = digests()
    # arithmetic /3: its calibration pass runs under this setting too, and must give the same weights
    exact = ExactModel.from_loaded(lm, 3)
    smoothed = [exact.fingerprint.hex(), *digests()]
    print(json.dumps({"freq": freq, "kernels": kernels, "steps": steps, "smoothed": smoothed,
                      "fingerprint": exact2_fingerprint, "worst_ok": worst_ok,
                      "cache": [chosen, int8_exact, int8_steps],
                      "capability": torch.backends.cpu.get_cpu_capability()}))
""")

SETTINGS = [
    ({}, 2),
    ({"ATEN_CPU_CAPABILITY": "avx2"}, 2),
    ({"ATEN_CPU_CAPABILITY": "default"}, 1),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, 2),
    ({"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"}, 1),
]


KERNELS = ("int8", "float32", "onednn", "onednn-int8")


def _child(env_extra, threads):
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    env.update(env_extra)
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", CHILD, TINY_MODEL, str(threads)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _smoothed_digests(lm):
    """Arithmetic /3's fingerprint, whole-sequence and last-10-steps frequency digests, as CHILD's."""
    exact = ExactModel.from_loaded(lm, 3)
    ids = _ids(3, 50)
    logits = _logits(exact, ids)
    cache = F.decoding_cache(exact, 3, 50)
    F.forward(exact, ids[:, :40], cache)
    steps = torch.cat([F.forward(exact, ids[:, p:p + 1], cache) for p in range(40, 50)], dim=1)
    return [exact.fingerprint.hex()] + [hashlib.sha256(F.frequencies(exact, t).numpy().tobytes()).hexdigest()
                                        for t in (logits, steps)]


def test_instruction_sets_do_not_matter(exact, lm):
    """ATen's SIMD level and oneDNN's ISA (no VNNI under AVX2: saturating int8 pairs) change nothing,
    through every kernel for the weights' products, nor /3's calibrated weights."""
    logits = _logits(exact, _ids(3, 50))
    here = hashlib.sha256(F.frequencies(exact, logits).numpy().tobytes()).hexdigest()
    steps_here = hashlib.sha256(F.frequencies(exact, logits[:, 40:]).numpy().tobytes()).hexdigest()
    smoothed_here = _smoothed_digests(lm)
    seen = {}
    for env_extra, threads in SETTINGS:
        result = _child(env_extra, threads)
        assert result["worst_ok"] == dict.fromkeys(KERNELS, True), f"a kernel not exact under {env_extra}"
        assert result["fingerprint"] == exact.fingerprint.hex(), env_extra
        assert result["freq"] == here, env_extra
        assert result["kernels"] == {k: [here, steps_here] for k in KERNELS}, env_extra
        assert result["steps"] == steps_here, env_extra
        assert result["smoothed"] == smoothed_here, env_extra
        chosen, int8_exact, int8_steps = result["cache"]
        assert int8_exact or chosen == CK.FLOAT32, f"int8 cache products chosen, not exact, under {env_extra}"
        assert int8_steps == (steps_here if int8_exact else None), env_extra
        seen[json.dumps(env_extra)] = result["capability"]
    assert seen[json.dumps({"ATEN_CPU_CAPABILITY": "default"})] == "DEFAULT"  # the setting took effect


def test_weights_stay_within_the_saturation_limit():
    w = torch.randn(40, 100) * torch.logspace(-3, 2, 100)
    lin = quantize_weight(w)
    assert lin.weight.dtype == torch.int8 and int(lin.weight.abs().max()) == WEIGHT_LIMIT
    approx = lin.weight.t().double() * lin.scale[:, None]
    assert (approx - w.double()).abs().max(dim=1).values.le(lin.scale * 0.5 + 1e-12).all()


def test_frequencies_are_positive_and_bounded(exact):
    logits = torch.tensor([[0.0] * 257, [1e30] + [-1e30] * 256, [float(i) for i in range(257)]])
    freqs = F.frequencies(exact, logits)
    assert int(freqs.min()) >= 1
    assert int(freqs.sum(-1).max()) <= MAX_TOTAL
    assert freqs[1, 0] == (1 << 24) + 1 and int(freqs[1, 1:].max()) == 1


def test_round_trip_over_batch_sizes(lm, exact, tmp_path):
    text = "Alice was beginning to get very tired of sitting by her sister on the bank. " * 3
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[0:90], ids[90:91], [], ids[91:150], ids[150:180], ids[180:200], ids[200:228]]
    payloads = encode_chunks(exact, chunks, PREFIX)
    assert payloads[2] == b""
    for chunk, payload in zip(chunks, payloads):  # within 2 bytes of the frequencies' ideal
        if chunk:
            freqs = F.frequencies(exact, _logits(exact, torch.tensor([list(PREFIX) + chunk]))[0, :-1]).double()
            bits = -(freqs.gather(1, torch.tensor(chunk)[:, None])[:, 0] / freqs.sum(-1)).log2().sum().item()
            assert len(payload) <= bits / 8 + 2
    counts = [len(c) for c in chunks]
    for batch_size in (1, 2, 7, 64):
        assert decode_chunks(exact, payloads, counts, PREFIX, batch_size=batch_size) == chunks
    # encoding dealt to threads, decoding to processes (forked: the spy's log is a file), each
    # shard on one torch thread: the same payloads and tokens
    log = tmp_path / "forward.log"

    def spying(real):
        def spy(*args, **kwargs):
            with open(log, "a") as f:
                f.write(f"{threading.current_thread().name.split('_')[0]} {os.getpid()} {torch.get_num_threads()}\n")
            return real(*args, **kwargs)
        return spy

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lmzip.exact.coding.forward", spying(F.forward))           # decoding steps
        patch.setattr("lmzip.exact.coding.final_states", spying(F.final_states))  # the encoder's passes
        assert encode_chunks(exact, chunks, PREFIX, threads=3) == payloads
        assert {line.split()[0] for line in log.read_text().splitlines()} == {"lmzip-shard"}
        log.unlink()
        assert decode_chunks(exact, payloads, counts, PREFIX, batch_size=2, threads=2) == chunks
    seen = {tuple(line.split()) for line in log.read_text().splitlines()}
    pids = {pid for _, pid, _ in seen}
    assert str(os.getpid()) in pids and len(pids) == 2 and {n for _, _, n in seen} == {"1"}


def _damaged(payloads: list[bytes], trial: int) -> list[bytes]:
    """Payload trial % 3 with a bit flipped in its middle (trials 0-2) or bytes after its end (3-5)."""
    damaged = list(payloads)
    p = bytearray(damaged[trial % 3])
    if trial < 3:
        p[len(p) // 2] ^= 0x10
    else:
        p += b"\x07\x00\x01"
    damaged[trial % 3] = bytes(p)
    return damaged


def test_damaged_payloads_raise_value_error_or_decode_wrongly(exact):
    chunks = [_ids(1, 40, seed=s)[0].tolist() for s in range(3)]
    payloads = encode_chunks(exact, chunks, PREFIX)
    counts = [len(c) for c in chunks]
    outcomes = []
    for trial in range(6):
        damaged = _damaged(payloads, trial)
        try:
            outcomes.append(decode_chunks(exact, damaged, counts, PREFIX, batch_size=3) == chunks)
        except ValueError:
            outcomes.append("error")
    assert True not in outcomes
    assert "error" in outcomes  # the trailing bytes


@pytest.mark.parametrize("counts", [[MAX_POSITIONS], [-1]])
def test_impossible_token_counts_are_refused(exact, counts):
    with pytest.raises(ValueError):
        decode_chunks(exact, [b""], counts, PREFIX)


def test_a_chunk_past_the_positions_asked_for_is_refused(exact):
    with pytest.raises(ValueError, match="outside 0..2047"):
        decode_chunks(exact, [b""], [V1_POSITIONS], PREFIX, positions=V1_POSITIONS)


def test_value_sums_stay_exact_past_2048_keys():
    """Sums of limb * value over 8192 keys pass 2**24: one float32 matmul would round them."""
    g = torch.Generator().manual_seed(3)
    limbs = torch.randint(32, 64, (2, 3, 8192), generator=g).float()
    v = torch.randint(64, 128, (2, 8192, 5), generator=g).float()
    want = torch.matmul(limbs.long(), v.long())
    assert want.max() > 1 << 24
    assert torch.equal(F.limb_products(limbs, v), want.double())


@pytest.mark.parametrize("rows", [3, F.FLOAT64_ROWS])
def test_attention_value_sums_are_exact_for_few_and_many_query_rows(rows):
    """Decoding steps (few rows) sum in 6-bit limbs, whole-sequence passes (many) in one float64
    matmul: both give the exact integer sums, far past 2**24, so the two passes agree."""
    g = torch.Generator().manual_seed(rows)
    ints = torch.randint(1 << 17, (1 << 18) + 1, (2, 3, rows, 4100), generator=g).float()
    v = torch.randint(100, 128, (2, 3, 4100, 5), generator=g).float()
    want = torch.matmul(ints.long(), v.long())
    assert want.max() > 1 << 36
    assert torch.equal(F.value_sums(ints, v), want.double())


@pytest.mark.parametrize("heads, group, keys", [(3, 3, 37), (2, 1, 1), (1, 4, 300)])
def test_cached_key_scores_are_the_integer_products_per_head(heads, group, keys):
    """A decoding step multiplies int8 queries by the int8 key cache one row at a time over all
    heads; each query head must get exactly its own kv head's products, at the extremes too."""
    g = torch.Generator().manual_seed(keys)
    q = torch.randint(-127, 128, (4, heads, group, 8), generator=g, dtype=torch.int8)
    k = torch.randint(-127, 128, (4, keys, heads, 8), generator=g, dtype=torch.int8)
    q[0], k[0] = 127, -127                                        # the largest sums, -127**2 * D
    want = torch.matmul(q.long(), k.permute(0, 2, 3, 1).long())
    got = CK.key_scores(q, k)
    assert got.dtype == torch.float32 and torch.equal(got, want.float())


@pytest.mark.parametrize("heads, rows, keys", [(3, 3, 8192), (2, 1, 1), (1, 4, 300)])
def test_cached_value_sums_are_exact_past_2_to_the_31(heads, rows, keys):
    """U up to 2**18 times int8 values, summed in int32 limbs: exact however large the whole sum."""
    g = torch.Generator().manual_seed(keys)
    ints = torch.randint(0, (1 << 18) + 1, (2, heads, rows, keys), generator=g).float()
    v = torch.randint(-127, 128, (2, heads, 5, keys + 1), generator=g, dtype=torch.int8)[..., :keys]  # as a cache
    ints[0], v[0] = float(1 << 18), 127
    want = torch.matmul(ints.long(), v.transpose(2, 3).long())
    assert keys < 8192 or want.abs().max() > 1 << 31
    assert torch.equal(CK.value_sums(ints, v), want.double())


def test_a_cache_holds_the_same_state_either_way(exact):
    """Keys, values and steps read back alike from a float32 and an int8 cache: the check's state
    digests (journaled by one process, rebuilt by another) do not depend on the kernel."""
    ids = _ids(2, 12, seed=4)
    caches = [F.Cache(exact.shape, 2, 14, "cpu", kernel) for kernel in CK.CACHE_KERNELS]
    for cache in caches:
        F.forward(exact, ids, cache)
    for row in range(2):
        one, other = (list(c.row_positions(row, 3, 12)) for c in caches)
        assert len(one) == 4 * exact.shape.layers
        assert all(torch.equal(a, b) for a, b in zip(one, other, strict=True))
        assert one[0].shape == (exact.shape.kv_heads, 9, exact.shape.head_dim)


def test_a_cache_refuses_an_unknown_form_and_int8_off_the_cpu(exact):
    """int8 products run where they were checked (the CPU); GPUs hold the cache as float32."""
    with pytest.raises(ValueError, match="no cache kernel"):
        F.Cache(exact.shape, 1, 4, "cpu", "int4")
    with pytest.raises(ValueError, match="for CPUs"):
        F.Cache(exact.shape, 1, 4, "meta", CK.INT8)
    assert F.Cache(exact.shape, 1, 4, "meta", CK.FLOAT32).k[0].dtype == torch.float32


def _clamped_int_mm(a, b, out=None):
    """torch._int_mm wrong only past a million, as a kernel that saturates: right on random
    operands, wrong with every product at its largest."""
    y = REAL_INT_MM(a, b).clamp(-10 ** 6, 10 ** 6)
    return y if out is None else out.copy_(y)


REAL_INT_MM = torch._int_mm


def test_int8_cache_products_wrong_at_the_limits_are_never_chosen(monkeypatch):
    monkeypatch.setattr(CK, "probe_times", lambda layers, heads: {CK.INT8: 1.0, CK.FLOAT32: 2.0})
    monkeypatch.setattr(CK.torch, "_int_mm", _clamped_int_mm)
    assert CK.exact_at_the_limits() is False
    assert CK.cache_kernel.__wrapped__("cpu") == CK.FLOAT32


def _packed_int_mm(a, b, out=None):
    """torch._int_mm that ignores its left operand's row stride, as a kernel that misread a
    cache's slice would: right on contiguous operands, wrong on a slice of a wider tensor."""
    return REAL_INT_MM(torch.as_strided(a, a.shape, (a.shape[1], 1)), b, out=out)


def test_int8_cache_products_that_misread_a_stride_are_never_chosen(monkeypatch):
    """The limits check's operands are slices of a wider tensor, as a cache's are, and one round
    has random signs: a kernel that read the slice as if packed gives other sums."""
    monkeypatch.setattr(CK.torch, "_int_mm", _packed_int_mm)
    a = torch.randint(-127, 128, (5, 3), dtype=torch.int8)
    assert torch.equal(CK.torch._int_mm(a, a.t().contiguous()), REAL_INT_MM(a, a.t().contiguous()))
    assert CK.exact_at_the_limits() is False


@pytest.mark.parametrize("small, large, chosen", [
    ((1.0, 2.0), (1.0, 2.0), CK.INT8),
    ((1.9, 1.0), (1.0, 2.0), CK.INT8),      # close at one layer: compared over many
    ((1.9, 1.0), (2.0, 1.0), CK.FLOAT32),
    ((2.1, 1.0), (1.0, 2.0), CK.FLOAT32),   # far slower at one layer (a reference loop): not timed again
])
def test_int8_cache_products_are_chosen_where_faster(monkeypatch, small, large, chosen):
    if not CK.exact_at_the_limits():
        pytest.skip("torch._int_mm is not exact on this CPU")
    monkeypatch.setattr(CK, "probe_times", lambda layers, heads: dict(zip(
        (CK.INT8, CK.FLOAT32), small if layers == 1 else large)))
    assert CK.cache_kernel.__wrapped__("cpu") == chosen
    assert CK.cache_kernel.__wrapped__("cuda") == CK.FLOAT32


def test_linear_scales_in_blocks_as_in_one_piece(exact, monkeypatch):
    """A Linear's integer results are scaled a block of rows at a time; each row keeps its own step."""
    layer = exact.layers[0].gate_up
    g = torch.Generator().manual_seed(6)
    q = torch.randint(-127, 128, (2, 7, layer.weight.shape[0]), generator=g).to(torch.int8)
    step = torch.rand(2, 7, generator=g, dtype=torch.float64) + 0.5
    y = torch.matmul(q.reshape(14, -1).long(), layer.weight.long()).double()
    want = ((y * layer.scale) * step.reshape(14, 1)).float().reshape(2, 7, -1)
    monkeypatch.setattr(F, "SCALE_ELEMENTS", 3 * layer.weight.shape[1])  # blocks of 3 rows: 3, 3, ... 2
    assert torch.equal(F.linear(q, step, layer), want)


def test_long_chunks_round_trip_and_match_the_step_by_step_pass(exact, held_as):
    """Past 2048 positions the whole-sequence pass (encoder) and the cached steps (decoder) agree."""
    chunk = _ids(1, 2100, seed=5)[0].tolist()
    payloads = encode_chunks(exact, [chunk, chunk[:40]], PREFIX)
    assert decode_chunks(exact, payloads, [2100, 40], PREFIX, batch_size=2) == [chunk, chunk[:40]]


def test_fingerprint_follows_the_weights(lm):
    exact = ExactModel.from_loaded(lm)
    with torch.no_grad():
        w = lm.model.model.layers[0].mlp.down_proj.weight
        saved = w[3, 5].item()
        w[3, 5] = saved + 0.5
        try:
            changed = ExactModel.from_loaded(lm)
        finally:
            w[3, 5] = saved
    assert changed.fingerprint != exact.fingerprint
    assert ExactModel.from_loaded(lm).fingerprint == exact.fingerprint


def test_tree_sum_has_one_fixed_order():
    """Neighbours first, zero-padded to a power of two: rounding makes any other order differ."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 37)) * 10.0 ** rng.integers(-8, 9, (4, 37))

    def reference(row):
        values = list(row) + [0.0] * (64 - len(row))
        while len(values) > 1:
            values = [values[i] + values[i + 1] for i in range(0, len(values), 2)]
        return values[0]

    got = F.tree_sum(torch.from_numpy(x))
    assert got.tolist() == [reference(row) for row in x]
    assert got.tolist() != x.sum(-1).tolist()  # the data is one where the order shows


def test_reduced_float32_matmul_precision_is_refused(exact):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with pytest.raises(ValueError, match="highest"):
            _logits(exact, _ids(1, 4))
    finally:
        torch.set_float32_matmul_precision(before)


def test_autocast_does_not_reach_the_arithmetic(exact):
    ids = _ids(2, 20)
    plain = _logits(exact, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(_logits(exact, ids), plain)


def test_query_blocks_do_not_matter(exact, monkeypatch):
    ids = _ids(2, 45, seed=4)
    whole = _logits(exact, ids)
    monkeypatch.setattr(F, "QUERY_POSITIONS", 4)
    assert torch.equal(_logits(exact, ids), whole)


def test_divisions_by_and_of_numbers_are_correctly_rounded():
    """`127 / tensor` is a reciprocal then a product in torch (and CUDA's `tensor / 127` too)."""
    x = torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 100 + 1e-3
    assert torch.equal(F.divide(127, x), (127.0 / x.double()).float())
    assert torch.equal(F.divide(x, 127), (x.double() / 127.0).float())
    assert not torch.equal(127 / x, (127.0 / x.double()).float())  # what divide avoids


def test_lm_bench_runs_and_checks_its_round_trip(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Down the rabbit hole. " * 12)
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "lm_bench.py"), str(text), "--model", TINY_MODEL,
                          "--chunk-tokens", "100", "--threads", "1", "--batch-size", "2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK" in out.stdout and "MISMATCH" not in out.stdout
    assert "freq cost" in out.stdout and "zstd -19" in out.stdout


def test_the_check_fails_each_damaged_payload_alone(exact):
    """The encoder's check decodes as the decoder does; a row that decodes wrong or stops in an
    error fails alone, and the rows beside it go on."""
    chunks = [_ids(1, 40, seed=s)[0].tolist() for s in range(3)]
    payloads = encode_chunks(exact, chunks, PREFIX)
    assert check_chunks(exact, chunks, payloads, PREFIX, batch_size=3) == set()
    for trial in range(6):
        assert check_chunks(exact, chunks, _damaged(payloads, trial), PREFIX, batch_size=3) == {trial % 3}
    other = [list(c) for c in chunks]
    other[1][-1] = (other[1][-1] + 1) % 256
    assert check_chunks(exact, other, payloads, PREFIX, batch_size=2, threads=2) == {1}


def _steps_spy(monkeypatch):
    """Count the decoding steps (next_symbols calls) and whole-sequence passes of rebuilt states."""
    from lmzip.exact import coding

    seen = {"steps": 0, "restored": []}
    real_next, real_restore = coding.next_symbols, coding._restore

    def step(*args):
        seen["steps"] += 1
        return real_next(*args)

    def restore(exact, cache, states, seqs, heads, prefix, start, *rest):
        lost = real_restore(exact, cache, states, seqs, heads, prefix, start, *rest)
        seen["restored"].append((start, len(seqs), len(lost)))
        return lost

    monkeypatch.setattr(coding, "next_symbols", step)
    monkeypatch.setattr(coding, "_restore", restore)
    return seen


def test_a_check_goes_on_from_a_reported_state(exact, monkeypatch):
    """Resumed from the states a check reported, it rebuilds each row's cache and decoder by
    whole-sequence passes to the same digest, decodes only the rest, and comes to the same verdict;
    rows at different points resume apart."""
    chunks = [_ids(1, n, seed=s)[0].tolist() for s, n in enumerate((40, 33, 9, 25))]
    payloads = encode_chunks(exact, chunks, PREFIX)
    reports = []
    assert check_chunks(exact, chunks, payloads, PREFIX, batch_size=3, every=4,
                        progress=lambda *a: reports.append(a)) == set()
    assert {(i, k) for i, k, _ in reports} == {(i, k) for i, n in enumerate((40, 33, 9, 25)) for k in range(4, n, 4)}
    at = {(i, k): d for i, k, d in reports}
    resume = {0: (20, at[0, 20]), 1: (20, at[1, 20]), 3: (8, at[3, 8])}  # chunk 2 from its start
    seen = _steps_spy(monkeypatch)
    assert check_chunks(exact, chunks, payloads, PREFIX, batch_size=3, every=4, resume=resume) == set()
    assert sorted(seen["restored"]) == [(8, 1, 0), (20, 2, 0)]  # every digest matched
    assert seen["steps"] == (40 - 20) + (25 - 8) + 9  # one batch each: rows at 20, at 8, from the start

    wrong_after = [list(c) for c in chunks]
    wrong_after[0][30] = (wrong_after[0][30] + 1) % 256
    assert check_chunks(exact, wrong_after, payloads, PREFIX, batch_size=3, every=4, resume=resume) == {0}


def test_a_state_that_cannot_be_rebuilt_is_checked_from_its_start(exact, monkeypatch):
    """A digest that does not match (another machine's state, a damaged note) or tokens before the
    point that the payload does not hold: that row is checked from its first token, never taken
    on trust."""
    chunks = [_ids(1, n, seed=s)[0].tolist() for s, n in enumerate((40, 33))]
    payloads = encode_chunks(exact, chunks, PREFIX)
    reports = []
    check_chunks(exact, chunks, payloads, PREFIX, batch_size=2, every=4, progress=lambda *a: reports.append(a))
    at = {(i, k): d for i, k, d in reports}
    seen = _steps_spy(monkeypatch)
    assert check_chunks(exact, chunks, payloads, PREFIX, batch_size=2, every=4,
                        resume={0: (20, "0" * 64), 1: (20, at[1, 20])}) == set()
    assert seen["restored"] == [(20, 2, 1)] and seen["steps"] == (33 - 20) + 40

    wrong_before = [list(c) for c in chunks]  # the replay and the digest each catch this one
    wrong_before[1][5] = (wrong_before[1][5] + 1) % 256
    seen["restored"].clear()
    assert check_chunks(exact, wrong_before, payloads, PREFIX, batch_size=2, every=4,
                        resume={0: (20, at[0, 20]), 1: (20, at[1, 20])}) == {1}
    assert seen["restored"] == [(20, 2, 1)]


def test_a_state_rebuilt_in_many_passes_after_a_longer_prefix_has_its_digest(exact, monkeypatch):
    """The rebuilding passes cut anywhere (here 2 positions each, the first within the prefix) give
    the reported state; a resume point at or past a chunk's end is no point: from its start."""
    from lmzip.exact import coding

    prefix = (256, 5, 7)
    chunks = [_ids(1, n, seed=s)[0].tolist() for s, n in enumerate((30, 21))]
    payloads = encode_chunks(exact, chunks, prefix)
    reports = []
    check_chunks(exact, chunks, payloads, prefix, batch_size=2, every=4, progress=lambda *a: reports.append(a))
    at = {(i, k): d for i, k, d in reports}
    monkeypatch.setattr(coding, "RESTORE_POSITIONS", 2)  # 2 rows: 1 position a pass
    seen = _steps_spy(monkeypatch)
    assert check_chunks(exact, chunks, payloads, prefix, batch_size=2, every=4,
                        resume={0: (12, at[0, 12]), 1: (12, at[1, 12])}) == set()
    assert seen["restored"] == [(12, 2, 0)] and seen["steps"] == 30 - 12
    seen["restored"].clear()
    seen["steps"] = 0
    assert check_chunks(exact, chunks, payloads, prefix, batch_size=2,
                        resume={0: (30, at[0, 28]), 1: (25, at[1, 20])}) == set()
    assert seen["restored"] == [] and seen["steps"] == 30


def test_a_check_reported_with_one_cache_form_resumes_with_the_other(exact, monkeypatch):
    """A check journaled by a process that held its cache as float32 goes on in one that holds it as
    int8, and the other way round: the rebuilt states have the reported digests."""
    if not CK.exact_at_the_limits():
        pytest.skip("torch._int_mm is not exact on this CPU")
    chunks = [_ids(1, n, seed=s)[0].tolist() for s, n in enumerate((30, 21))]
    payloads = encode_chunks(exact, chunks, PREFIX)
    before = exact.cache_kernel
    try:
        for reported_as, resumed_as in ((CK.FLOAT32, CK.INT8), (CK.INT8, CK.FLOAT32)):
            exact.cache_kernel = reported_as
            reports = []
            check_chunks(exact, chunks, payloads, PREFIX, batch_size=2, every=4,
                         progress=lambda *a: reports.append(a))
            at = {(i, k): d for i, k, d in reports}
            exact.cache_kernel = resumed_as
            seen = _steps_spy(monkeypatch)
            assert check_chunks(exact, chunks, payloads, PREFIX, batch_size=2, every=4,
                                resume={0: (12, at[0, 12]), 1: (12, at[1, 12])}) == set()
            assert seen["restored"] == [(12, 2, 0)] and seen["steps"] == 30 - 12
    finally:
        exact.cache_kernel = before


@pytest.mark.parametrize("width", [0, 1, 7, 9, 576, 1000])
def test_tree_sum_pads_late_to_the_same_sums(width):
    """tree_sum pads only at its first odd level: the sums are those of padding to a power of two
    first (the specification), to the bit, signed zeros included."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(5, width, generator=g, dtype=torch.float64) * torch.logspace(-20, 20, width, dtype=torch.float64)
    if width:
        x[0] = -0.0
    size = 1 << max(width - 1, 0).bit_length()
    padded = torch.nn.functional.pad(x, (0, size - width))
    while padded.shape[-1] > 1:
        padded = padded[..., 0::2] + padded[..., 1::2]
    got = F.tree_sum(x)
    assert torch.equal(got, padded[..., 0]) and torch.equal(got.signbit(), padded[..., 0].signbit())


def test_silu_takes_the_specified_branch_each_side_of_zero(exact):
    """sigma = 1 / (1 + e) for g >= 0 and e / (1 + e) below, e = exp(-|g|) from the table (SPEC.md)."""
    g = torch.tensor([-30.0, -2.5, -1e-6, -0.0, 0.0, 1e-6, 2.5, 30.0, float("inf")])
    e = F.exp_lookup(exact, g.abs().mul(F.EXP_SCALE)).mul_(1.0 / F.EXP_ONE)
    den = e + 1.0
    sigma = torch.tensor([(1.0 if gi >= 0 else ei) for gi, ei in zip(g.tolist(), e.tolist())]) / den
    assert torch.equal(F.silu(exact, g), g * sigma)


@pytest.mark.parametrize("length", [1, coding.FREQ_ROWS, 2 * coding.FREQ_ROWS + 5])
def test_the_encoder_codes_under_the_logits_of_a_whole_pass(exact, length):
    """The encoder makes its logits a block of positions at a time from the final states: the same
    frequencies as the whole pass's logits, for every token."""
    chunk = _ids(1, length, seed=length)[0].tolist()
    prefix = [1, 2]
    want = coding._symbol_frequencies(exact, coding.chunk_logits(exact, chunk, prefix), torch.tensor(chunk))
    assert coding.chunk_symbols(exact, chunk, prefix) == want
    assert len(want[0]) == length


def test_a_batch_of_long_rows_gets_each_row_s_own_logits(exact):
    """Past HEAD_POSITIONS positions a batch's logits are written block by block through a
    strided view: each row's must be those of its pass alone."""
    ids = _ids(2, F.HEAD_POSITIONS + 20, seed=9)
    both = _logits(exact, ids)
    for row in range(2):
        assert torch.equal(both[row], _logits(exact, ids[row:row + 1])[0])


def test_a_linear_refuses_an_output_of_another_type_or_shape(exact):
    q, step = torch.zeros(2, exact.shape.hidden, dtype=torch.int8), torch.ones(2, dtype=torch.float64)
    for out in (torch.empty(2, exact.shape.vocab, dtype=torch.float64), torch.empty(3, exact.shape.vocab)):
        with pytest.raises(ValueError, match="float32"):
            F.head(exact, q, step, out=out)
