"""Exact int8 products by float32 GEMMs (lmzip/exact/matmul.py): the same integers as
torch._int_mm, at the limits and past one block of inputs, and the same frequencies."""

import hashlib

import pytest
import torch

from conftest import TINY_MODEL
from lmzip.exact import forward as F
from lmzip.exact import matmul as M
from lmzip.exact.model import ExactModel
from lmzip.models import load_model


def _exact_sum(x, w):
    return x.long() @ w.long()


# 2097 products of 8001 make an odd sum above 2**24, which no float32 sum can hold: it fails
# for a block of more than 2096 inputs, whatever order a BLAS adds in
LIMIT_KS = [M.FLOAT_K_BLOCK, (1 << 24) // (M.ACT_LIMIT * M.WEIGHT_LIMIT) + 1, 3 * M.FLOAT_K_BLOCK + 5]


@pytest.mark.parametrize("k", LIMIT_KS)
@pytest.mark.parametrize("sign", [1, -1])
def test_float_products_are_exact_at_the_limits(k, sign):
    """Every product at its largest, one sign: the partial sums that would round first."""
    x = torch.full((5, k), sign * M.ACT_LIMIT, dtype=torch.int8)
    w = torch.full((k, 24), M.WEIGHT_LIMIT, dtype=torch.int8)
    y = M.int_matmul(x, w, w.float())
    assert y.dtype.is_floating_point  # the float path ran
    assert torch.equal(y.long(), _exact_sum(x, w))


def test_float_products_equal_int8_kernel_products():
    g = torch.Generator().manual_seed(1)
    for k in (1, 576, 1536, 2049):
        x = torch.randint(-M.ACT_LIMIT, M.ACT_LIMIT + 1, (9, k), generator=g, dtype=torch.int8)
        w = torch.randint(-M.WEIGHT_LIMIT, M.WEIGHT_LIMIT + 1, (k, 40), generator=g, dtype=torch.int8)
        assert torch.equal(M.int_matmul(x, w, w.float()).long(), M.int_matmul(x, w).long()), k


def test_the_kernel_choice_is_made_once_per_process():
    M.float_is_faster.cache_clear()
    assert M.float_is_faster("cpu") in (True, False)
    M.float_is_faster("cpu")
    assert M.float_is_faster.cache_info().misses == 1
    assert M.float_is_faster("cuda") is False  # GPUs run int8 at full speed


@pytest.fixture(scope="module")
def exact():
    return ExactModel.from_loaded(load_model(TINY_MODEL, device="cpu"))


def _frequencies_digest(exact, float_matmuls):
    exact.use_float_matmuls(float_matmuls)
    ids = torch.randint(0, 257, (3, 40), generator=torch.Generator().manual_seed(0))
    cache = F.Cache(exact.shape, 3, 40, "cpu")
    logits = torch.cat([F.forward(exact, ids[:, :30], cache)] +
                       [F.forward(exact, ids[:, p:p + 1], cache) for p in range(30, 40)], dim=1)
    return hashlib.sha256(F.frequencies(exact, logits).numpy().tobytes()).hexdigest()


def test_both_kernels_give_the_same_frequencies(exact, monkeypatch):
    calls = []
    monkeypatch.setattr(M, "float_matmul", lambda x, w: calls.append(1) or x @ w)
    chosen = exact.head.float_weight is not None
    try:
        with_float = _frequencies_digest(exact, True)
        assert len(calls) == 11 * (4 * len(exact.layers) + 1)  # every Linear of the 11 passes
        assert _frequencies_digest(exact, False) == with_float
        assert len(calls) == 11 * (4 * len(exact.layers) + 1)  # and none in int8
    finally:
        exact.use_float_matmuls(chosen)


def test_float_weights_are_the_int8_weights(exact):
    chosen = exact.head.float_weight is not None
    try:
        exact.use_float_matmuls(True)
        for lin in exact.linears():
            assert lin.float_weight.dtype == torch.float32 and torch.equal(lin.float_weight, lin.weight.float())
        exact.use_float_matmuls(False)
        assert all(lin.float_weight is None for lin in exact.linears())
    finally:
        exact.use_float_matmuls(chosen)
