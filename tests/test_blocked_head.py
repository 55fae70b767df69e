"""The column-blocked output head: the same logits as one product, and only where it pays."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmzip import blocked_head
from lmzip.blocked_head import COLUMNS, ColumnBlockedLinear, block_output_head
from lmzip.models import load_model

TINY = Path(__file__).parent / "data" / "tiny-llama"
OUT = 2 * COLUMNS + 357  # more than two blocks, the last one short


def blocked_copy(plain: torch.nn.Linear) -> ColumnBlockedLinear:
    blocked = ColumnBlockedLinear(plain.in_features, plain.out_features, bias=plain.bias is not None)
    blocked.load_state_dict(plain.state_dict())
    return blocked


@pytest.fixture
def linear_calls(monkeypatch):
    """The weight row counts of every F.linear the blocked head makes."""
    rows = []

    def spy(x, weight, bias=None):
        rows.append(weight.shape[0])
        return F.linear(x, weight, bias)

    monkeypatch.setattr(blocked_head, "F", type("F", (), {"linear": staticmethod(spy)}))
    return rows


MKL = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the blocks run with MKL only")


@MKL
@pytest.mark.parametrize("shape", [(2, 96), (7, 96), (64, 96), (3, 5, 96), (1, 2, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_blocks_give_the_same_bits_as_one_product(shape, bias, linear_calls):
    torch.manual_seed(0)
    plain = torch.nn.Linear(96, OUT, bias=bias).requires_grad_(False)
    x = torch.randn(shape)
    got = blocked_copy(plain).requires_grad_(False)(x)
    assert linear_calls == [COLUMNS, COLUMNS, OUT - 2 * COLUMNS]  # the blocks did run
    assert got.shape == (*shape[:-1], OUT)
    assert torch.equal(got, plain(x))


def test_a_fit_keeps_one_product_and_its_gradient(linear_calls):
    torch.manual_seed(0)
    plain = torch.nn.Linear(96, OUT).requires_grad_(False)
    x = torch.randn(4, 96, requires_grad=True)
    blocked_copy(plain).requires_grad_(False)(x).square().sum().backward()
    assert linear_calls == [OUT]
    expected = x.detach().clone().requires_grad_(True)
    plain(expected).square().sum().backward()
    assert torch.equal(x.grad, expected.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_keep_one_product(dtype, linear_calls):
    layer = ColumnBlockedLinear(96, OUT, dtype=dtype).requires_grad_(False)
    layer(torch.randn(2, 96, dtype=dtype))
    assert linear_calls == [OUT]


def test_without_mkl_one_product(linear_calls, monkeypatch):
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    ColumnBlockedLinear(96, OUT).requires_grad_(False)(torch.randn(4, 96))
    assert linear_calls == [OUT]


def test_a_small_head_keeps_one_product(linear_calls):
    ColumnBlockedLinear(96, 2 * COLUMNS).requires_grad_(False)(torch.randn(2, 96))
    assert linear_calls == [2 * COLUMNS]


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96)])
def test_one_row_keeps_one_product(shape, linear_calls):
    ColumnBlockedLinear(96, OUT).requires_grad_(False)(torch.randn(shape))
    assert linear_calls == [OUT]


def test_loaded_models_get_the_blocked_head_still_tied():
    model = load_model(str(TINY), device="cpu").model
    head = model.get_output_embeddings()
    assert type(head) is ColumnBlockedLinear
    assert head.weight is model.get_input_embeddings().weight
    from transformers import AutoModelForCausalLM

    assert list(model.state_dict()) == list(AutoModelForCausalLM.from_pretrained(TINY).state_dict())


def model_with(head: torch.nn.Module, refusal: Exception):
    """A model whose head is `head` and whose set_output_embeddings raises `refusal`."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def get_output_embeddings(self):
            return self.head

        def set_output_embeddings(self, new):
            raise refusal

    return Model()


def test_a_head_that_is_not_a_plain_linear_stays():
    class Head(torch.nn.Linear):
        pass

    model = model_with(Head(4, 8), AssertionError("replaced a head it should have left alone"))
    block_output_head(model)
    assert type(model.head) is Head


def test_a_model_that_cannot_set_its_head_keeps_it():
    model = model_with(torch.nn.Linear(4, 8), AttributeError("no lm_head"))
    block_output_head(model)
    assert type(model.head) is torch.nn.Linear
