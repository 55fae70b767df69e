"""The output head multiplied in blocks of its columns on a CPU: the same products, faster.

MKL's float32 GEMM of a decoding step's few dozen rows by a large vocabulary head runs far
below the core's speed: on one AVX2 core, 64 rows by SmolLM2's 576 x 49,152 head took 104 to
137 ms inside a decoding batch, and the same product as 48 blocks of 1,024 columns 79 to 91 ms
(BENCHMARKS.md, "The output head in column blocks"; `tools/head_speed.py`). Each logit is the
same 576-term dot product either way, and MKL gives the same bits (tests check it); where a
BLAS rounded a block otherwise, the margin guard would cover it, as it covers the batch's
composition (SPEC.md, "Batched decoding"). Only inference on a CPU with MKL in float32 takes
the blocks: a fit's head (it needs gradients), other BLAS libraries and GPUs keep the one product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLUMNS = 1024  # output columns per block: 512 to 2,048 do about as well at 4 to 128 rows
MIN_ROWS = 2     # one row is a matrix-vector product, a little slower in blocks


class ColumnBlockedLinear(torch.nn.Linear):
    """A Linear whose inference on a CPU computes its output in blocks of COLUMNS columns."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _blocked(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        return blocked_linear(x, self.weight, self.bias)


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   columns: int = COLUMNS) -> torch.Tensor:
    """F.linear(x, weight, bias) computed `columns` output columns at a time, into one tensor."""
    out = x.new_empty(*x.shape[:-1], weight.shape[0])  # (..., out_features), filled block by block
    for first in range(0, weight.shape[0], columns):
        block = slice(first, first + columns)
        out[..., block] = F.linear(x, weight[block], None if bias is None else bias[block])
    return out


def _blocked(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and torch.backends.mkl.is_available()
            and not (x.requires_grad or weight.requires_grad) and weight.shape[0] > 2 * COLUMNS
            and x.numel() >= MIN_ROWS * weight.shape[1])


def block_output_head(model: torch.nn.Module) -> None:
    """Give `model` (a transformers causal LM) a column-blocked output head sharing the same
    weight and bias (a tied embedding stays tied); heads other than a plain Linear stay."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return
    blocked = ColumnBlockedLinear(head.in_features, head.out_features, bias=head.bias is not None,
                                  device="meta")
    blocked.weight = head.weight
    blocked.bias = head.bias
    try:
        model.set_output_embeddings(blocked)
    except (AttributeError, NotImplementedError):  # a model that names its head but cannot set it
        return
    if model.get_output_embeddings() is not blocked:  # set somewhere else than it is read from
        model.set_output_embeddings(head)
