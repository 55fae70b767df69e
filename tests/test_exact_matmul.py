"""Exact int8 products by every kernel of lmzip/exact/matmul.py: the same integers as
torch._int_mm, at the limits and past one block of inputs, and the same frequencies."""

import hashlib

import pytest
import torch

from conftest import TINY_MODEL
from lmzip.exact import forward as F
from lmzip.exact import matmul as M
from lmzip.exact.model import ExactModel
from lmzip.models import load_model

PREPARED_KERNELS = [k for k in M.kernels("cpu") if k in M.PREPARED_KERNELS]


def _exact_sum(x, w):
    return x.long() @ w.long()


def test_onednn_is_offered_by_this_torch():
    # the wheels pinned for CI carry oneDNN; without it these tests cover the float32 kernel only
    assert M.ONEDNN in M.kernels("cpu") and M.ONEDNN_INT8 in M.kernels("cpu")


# 2097 products of 8001 make an odd sum above 2**24, which no float32 sum can hold: it fails
# for a block of more than 2096 inputs, whatever order a BLAS adds in
# for a block; 2047 makes odd sums that no float32 holds of oneDNN's shifted products (255 * 63 each)
LIMIT_KS = [M.FLOAT_K_BLOCK, M.FLOAT_K_BLOCK - 1, (1 << 24) // (M.ACT_LIMIT * M.WEIGHT_LIMIT) + 1,
            3 * M.FLOAT_K_BLOCK + 5]


@pytest.mark.parametrize("kernel", PREPARED_KERNELS)
@pytest.mark.parametrize("k", LIMIT_KS)
@pytest.mark.parametrize("signs", [(1, 1), (-1, 1), (1, -1)])
def test_prepared_products_are_exact_at_the_limits(kernel, k, signs):
    """Every product at its largest, one sign: the partial sums that would round first, and
    (x = 127, shifted to 255 for oneDNN's int8) the pairs that would saturate 16-bit lanes."""
    x = torch.full((5, k), signs[0] * M.ACT_LIMIT, dtype=torch.int8)
    w = torch.full((k, 24), signs[1] * M.WEIGHT_LIMIT, dtype=torch.int8)
    y = M.int_matmul(x, w, M.prepare(w, kernel))
    assert y.dtype.is_floating_point  # the prepared kernel ran
    assert torch.equal(y.long(), _exact_sum(x, w))


@pytest.mark.parametrize("kernel", PREPARED_KERNELS)
def test_prepared_products_equal_int8_kernel_products(kernel):
    g = torch.Generator().manual_seed(1)
    for k in (1, 576, 1536, 2049):
        for m in (1, 2, 9, 70):  # one row takes the plain blocks; oneDNN packs for 64 rows, any count works
            x = torch.randint(-M.ACT_LIMIT, M.ACT_LIMIT + 1, (m, k), generator=g, dtype=torch.int8)
            w = torch.randint(-M.WEIGHT_LIMIT, M.WEIGHT_LIMIT + 1, (k, 40), generator=g, dtype=torch.int8)
            assert torch.equal(M.int_matmul(x, w, M.prepare(w, kernel)).long(),
                               M.int_matmul(x, w).long()), (k, m)


def test_onednn_keeps_the_plain_weights_for_one_row(monkeypatch):
    calls = []
    real = M._product
    monkeypatch.setattr(M, "_product", lambda x, block, packed: calls.append(packed) or real(x, block, packed))
    w = torch.ones(8, 4, dtype=torch.int8)
    weight = M.FloatWeight.of(w, M.ONEDNN)
    for rows in (1, 2):
        assert torch.equal(weight.times(torch.ones(rows, 8)), torch.full((rows, 4), 8.0))
    assert calls == [False, True]


def test_no_float_kernel_by_another_name():
    with pytest.raises(ValueError, match="no float32 kernel"):
        M.FloatWeight.of(torch.zeros(4, 4, dtype=torch.int8), M.INT8)


def test_the_kernel_choice_is_made_once_per_process():
    M.fastest_kernel.cache_clear()
    assert M.fastest_kernel("cpu") in M.kernels("cpu")
    M.fastest_kernel("cpu")
    assert M.fastest_kernel.cache_info().misses == 1
    assert M.fastest_kernel("cuda") == M.INT8  # GPUs run int8 at full speed


def _choice_with(monkeypatch, wrong, damage):
    """The kernel choice, with `wrong` timed the fastest and its products passed through `damage`
    (for onednn the packed ones: one row takes the plain float32 weights)."""
    real, real_int8 = M._product, M.OnednnInt8Weight._product
    if wrong == M.ONEDNN:
        monkeypatch.setattr(M, "_product", lambda x, block, packed: damage(real(x, block, packed))
                            if packed else real(x, block, packed))
    else:
        monkeypatch.setattr(M.OnednnInt8Weight, "_product", lambda self, x, block: damage(real_int8(self, x, block)))
    monkeypatch.setattr(M, "_seconds", lambda run: 0.0 if run.__name__ == "fast" else 1.0)
    probe = M._probe_run
    monkeypatch.setattr(M, "_probe_run", lambda x, ws, kernel: _named(probe(x, ws, kernel),
                                                                      "fast" if kernel == wrong else "slow"))
    M.fastest_kernel.cache_clear()
    try:
        return M.fastest_kernel("cpu")
    finally:
        M.fastest_kernel.cache_clear()


@pytest.mark.parametrize("wrong", [M.ONEDNN, M.ONEDNN_INT8])
def test_a_kernel_that_gives_other_integers_is_never_chosen(monkeypatch, wrong):
    assert _choice_with(monkeypatch, wrong, lambda y: y + 1) != wrong  # the fastest, but off by one


@pytest.mark.parametrize("wrong", [M.ONEDNN, M.ONEDNN_INT8])
def test_a_kernel_wrong_only_at_the_limits_is_never_chosen(monkeypatch, wrong):
    """As a kernel that saturated 16-bit pairs would be: right on the random probe, wrong when
    every product is at its largest."""
    assert _choice_with(monkeypatch, wrong, lambda y: y.clamp(-(1 << 23), 1 << 23)) != wrong
    assert not M._exact_at_the_limits(wrong) and M._exact_at_the_limits(M.FLOAT32)


@pytest.mark.parametrize("small, large, chosen", [
    ({M.INT8: 1, M.FLOAT32: 35, M.ONEDNN: 30, M.ONEDNN_INT8: 20}, None, M.INT8),  # no contender
    ({M.INT8: 35, M.FLOAT32: 2.5, M.ONEDNN: 1.2, M.ONEDNN_INT8: 1.0}, {M.ONEDNN: 2, M.ONEDNN_INT8: 3}, M.ONEDNN),
    ({M.INT8: 35, M.FLOAT32: 3, M.ONEDNN: 1.2, M.ONEDNN_INT8: 1.0}, {M.ONEDNN: 3, M.ONEDNN_INT8: 2}, M.ONEDNN_INT8),
    # both wrong at the large products (None): not the small product's fastest, but int8
    ({M.INT8: 35, M.FLOAT32: 3, M.ONEDNN: 1.2, M.ONEDNN_INT8: 1.0}, {M.ONEDNN: None, M.ONEDNN_INT8: None}, M.INT8),
    ({M.FLOAT32: 1.0}, None, M.FLOAT32),  # the others failed their probe
    ({}, None, M.INT8),  # every probe failed: int8 is still exact
])
def test_the_kernels_close_at_a_small_product_are_compared_at_large_ones(monkeypatch, small, large, chosen):
    asked = []

    def times(candidates, shape, rounds=4, weights=1):
        asked.append((sorted(candidates), shape, weights))
        return {k: v for k, v in (small if shape == M.PROBE_SHAPE else large).items()
                if k in candidates and v is not None}

    monkeypatch.setattr(M, "kernels", lambda device_type: list(M.PREPARED_KERNELS) + [M.INT8])
    monkeypatch.setattr(M, "_times", times)
    M.fastest_kernel.cache_clear()
    try:
        assert M.fastest_kernel("cpu") == chosen
    finally:
        M.fastest_kernel.cache_clear()
    assert asked[0] == (sorted(M.PREPARED_KERNELS + (M.INT8,)), M.PROBE_SHAPE, 1)
    if large is None:
        assert len(asked) == 1
    else:  # only the kernels within CONTENDER_RATIO of the fastest, over weights out of the cache
        assert asked[1:] == [(sorted(large), M.LARGE_PROBE_SHAPE, M.LARGE_PROBE_WEIGHTS)]


def test_kernels_take_turns_in_the_timing(monkeypatch):
    order = []
    probe = M._probe_run
    monkeypatch.setattr(M, "_probe_run", lambda x, ws, kernel: _named(probe(x, ws, kernel), kernel))
    monkeypatch.setattr(M, "_seconds", lambda run: order.append(run.__name__) or 1.0)
    assert M._fastest([M.FLOAT32, M.ONEDNN], (2, 8, 4), M.INT8, rounds=3) == M.FLOAT32  # a tie: the first
    assert order == [M.FLOAT32, M.ONEDNN] * 3


def _named(run, name):
    run.__name__ = name
    return run


@pytest.fixture(scope="module")
def exact():
    return ExactModel.from_loaded(load_model(TINY_MODEL, device="cpu"))


def _frequencies_digest(exact, kernel):
    exact.use_kernel(kernel)
    ids = torch.randint(0, 257, (3, 40), generator=torch.Generator().manual_seed(0))
    cache = F.Cache(exact.shape, 3, 40, "cpu")
    logits = torch.cat([F.forward(exact, ids[:, :30], cache)] +
                       [F.forward(exact, ids[:, p:p + 1], cache) for p in range(30, 40)], dim=1)
    return hashlib.sha256(F.frequencies(exact, logits).numpy().tobytes()).hexdigest()


def test_every_kernel_gives_the_same_frequencies(exact, monkeypatch):
    calls = []
    real, real_int8 = M._product, M.OnednnInt8Weight._product
    monkeypatch.setattr(M, "_product", lambda x, block, packed: calls.append(packed) or real(x, block, packed))
    monkeypatch.setattr(M.OnednnInt8Weight, "_product",
                        lambda self, x, block: calls.append("u8") or real_int8(self, x, block))
    chosen = exact.weight_kernel
    linears = 11 * (4 * len(exact.layers) + 1)  # every Linear of the 11 passes
    expected = {M.FLOAT32: False, M.ONEDNN: True, M.ONEDNN_INT8: "u8"}
    try:
        reference = _frequencies_digest(exact, M.INT8)
        assert not calls
        for kernel in PREPARED_KERNELS:
            calls.clear()
            assert _frequencies_digest(exact, kernel) == reference, kernel
            # the 3 rows of each pass take oneDNN's packed weights, where the kernel is onednn
            assert calls == [expected[kernel]] * linears
    finally:
        exact.use_kernel(chosen)


def test_float_weights_are_the_int8_weights(exact):
    chosen = exact.weight_kernel
    try:
        exact.use_kernel(M.FLOAT32)
        for lin in exact.linears():
            (block,) = lin.prepared.blocks
            assert block.dtype == torch.float32 and torch.equal(block, lin.weight.float())
            assert lin.prepared.packed == ()
        exact.use_kernel(M.INT8)
        assert all(lin.prepared is None for lin in exact.linears())
        assert exact.weight_kernel == M.INT8
    finally:
        exact.use_kernel(chosen)


def test_exact_arithmetic_refuses_reduced_precision_in_onednn():
    """Through torch's own setting: in torch 2.13 it also makes the legacy getter raise."""
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        with pytest.raises(ValueError, match="oneDNN's fp32_precision"):
            F._check_float_matmuls(torch.device("cpu"))
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "none"
    assert torch.get_float32_matmul_precision() == "highest"
    F._check_float_matmuls(torch.device("cpu"))


def test_exact_arithmetic_refuses_tf32_by_the_legacy_setting():
    torch.set_float32_matmul_precision("high")
    try:
        with pytest.raises(ValueError, match="full float32"):
            F._check_float_matmuls(torch.device("cpu"))
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize("failing", [M.ONEDNN, M.ONEDNN_INT8])
def test_a_kernel_that_fails_is_skipped(monkeypatch, failing):
    probe = M._probe_run

    def run(x, ws, kernel):
        if kernel == failing:
            raise RuntimeError("no such kernel here")
        return probe(x, ws, kernel)

    monkeypatch.setattr(M, "_probe_run", run)
    M.fastest_kernel.cache_clear()
    try:
        assert M.fastest_kernel("cpu") != failing
    finally:
        M.fastest_kernel.cache_clear()
