"""The fit's decisions and its batch tensors, each on its own (no model), and the host work of a step."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmzip.fit_batch import FitBatch, layout, learning_rates
from lmzip.fit_decisions import (escalated_vectors, first_length, grown_length, salvaged_length, shrunk_length,
                                 step_decisions, tail_vectors)


class FakeStream:
    """A stream offering `offered` tokens, of which only the lengths in `valid` end a valid piece."""

    def __init__(self, valid, offered, growing=True, start=0, tokens_left=None):
        self.valid, self.ids, self.growing, self.start = set(valid), tuple(range(offered)), growing, start
        self.tokens_left = offered if tokens_left is None else tokens_left

    def length_at_least(self, n):
        return min((m for m in self.valid if max(n, 1) <= m <= len(self.ids)), default=None)

    def length_at_most(self, n):
        return max((m for m in self.valid if m <= min(n, len(self.ids))), default=None)


def test_first_length_is_the_shortest_valid_one_from_the_start_length():
    assert first_length(FakeStream({20, 33, 40}, 64), 32) == 33
    assert first_length(FakeStream({20, 30}, 64), 32) == 30  # none that long: the longest below
    assert first_length(FakeStream({10}, 8), 32) is None
    assert first_length(FakeStream({5}, 12, growing=False), 32) == 12  # a fixed stream is fitted whole


def test_grown_length_aims_past_what_already_holds():
    stream = FakeStream({32, 41, 50, 57}, 64)
    assert grown_length(stream, holding=40, best_n=32, grow_tokens=8) == 50
    assert grown_length(stream, holding=52, best_n=32, grow_tokens=8) == 57  # none past 60: the longest
    assert grown_length(stream, holding=60, best_n=57, grow_tokens=8) is None  # nothing longer: close


def test_salvaged_length_takes_the_longest_that_holds_and_beats_the_verified_one():
    stream = FakeStream({10, 20, 30}, 64)
    assert salvaged_length(stream, [25, 31], best_n=10) == (1, 30)
    assert salvaged_length(stream, [31, 35], best_n=10) == (0, 30)  # a tie: the first candidate
    assert salvaged_length(stream, [12, 19], best_n=10) is None     # both round down to 10
    assert salvaged_length(stream, [5], best_n=0) is None


def test_shrunk_length_halves_and_escalation_doubles_up_to_the_limit():
    stream = FakeStream({10, 15}, 64)
    assert shrunk_length(stream, 32) == 15
    assert shrunk_length(stream, 18) is None
    assert escalated_vectors(2, 8) == 4 and escalated_vectors(6, 8) == 8
    assert escalated_vectors(8, 8) is None and escalated_vectors(2, 2) is None


def test_tail_vectors_follow_the_density_so_far():
    first = FakeStream({32}, 64, start=0)
    assert tail_vectors(first, 2, 0, 0, 32) == 2  # the first segment: K
    later = FakeStream({32}, 64, start=500, tokens_left=30)
    assert tail_vectors(later, 2, 100, 2, 32) == 1  # 30 tokens at 50 per vector: ceil(0.6 - 0.25)
    assert tail_vectors(FakeStream({32}, 64, start=500, tokens_left=120), 2, 100, 2, 32) == 2
    assert tail_vectors(FakeStream({32}, 64, start=500, tokens_left=20), 4, 0, 0, 32) == 2  # at most half
    fixed = FakeStream({32}, 64, growing=False, start=500, tokens_left=5)
    assert tail_vectors(fixed, 2, 100, 2, 32) == 2


def test_step_decisions_count_leading_tokens_that_hold():
    gap = torch.tensor([[2.0, 2.0, 0.5, 2.0], [2.0, 2.0, 2.0, 2.0], [0.1, 2.0, 2.0, 2.0]])
    valid = torch.tensor([[True] * 4, [True, True, True, False], [True] * 4])
    holds, candidate, over = step_decisions(gap, valid, torch.tensor([2, 4, 1]), torch.tensor([0, 300, 5]),
                                            max_steps=300, margin=1.0)
    assert holds.tolist() == [2, 3, 0]
    assert candidate.tolist() == [True, False, False] and over.tolist() == [False, True, False]


def test_layout_gives_each_row_the_decoders_positions():
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]])
    lay = layout(ids, k=torch.tensor([1, 2]), n=torch.tensor([3, 2]), span=torch.tensor([4, 3]), prefix_len=1,
                 k_max=2)
    # row 0: [prefix | v0 | (masked slot) | 4 tokens]; its tokens sit at positions 2, 3, 4, 5
    assert lay.mask.tolist() == [[1, 1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]]
    assert lay.positions.tolist() == [[0, 1, 2, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6]]
    assert lay.predictor.tolist() == [[1, 3, 4, 5], [2, 3, 4, 5]]  # v0 (or v1) predicts the first token
    assert lay.target.tolist() == [[5, 6, 7, 8], [1, 2, 3, 0]]
    assert lay.scored.tolist() == [[True, True, True, False], [True, True, False, False]]


def reference_adam(params, m, v, grad, step, lr, betas=(0.9, 0.9), warmup=10, max_steps=300):
    """Adam for one row as a plain loop would run it."""
    b1, b2 = betas
    if step < warmup:
        rate = lr * step / warmup
    else:
        progress = min(max((step - warmup) / (max_steps - warmup), 0.0), 1.0)
        rate = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    m = m * b1 + grad * (1 - b1)
    v = v * b2 + grad * grad * (1 - b2)
    return params - rate * ((m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + 1e-8)), m, v


def test_masked_adam_steps_active_rows_as_alone_and_leaves_the_others():
    gen = torch.Generator().manual_seed(0)
    batch = FitBatch(4, torch.device("cpu"))
    batch.add([(torch.randn(k, 4, generator=gen), torch.arange(6), 3, True) for k in (2, 1, 2)])
    batch.step[1], batch.step[2] = 5, 40  # rows keep their own schedules (row 1's rate is not 0)
    start = batch.params.clone()
    grad = torch.randn(3, 2, 4, generator=gen)
    grad[1, 1] = 0  # a masked slot gets no gradient
    batch.adam(grad, torch.tensor([True, False, True]), 0.2, 10, 300, (0.9, 0.9), 0.0)
    for i, step in ((0, 1), (2, 41)):
        params, m, v = reference_adam(start[i], torch.zeros(2, 4), torch.zeros(2, 4), grad[i], step, 0.2)
        assert torch.allclose(batch.params[i], params, atol=1e-6) and torch.allclose(batch.m[i], m)
    assert torch.equal(batch.params[1], start[1]) and not batch.m[1].any()
    assert batch.step.tolist() == [1, 5, 41] and batch.total.tolist() == [1, 0, 1]


def test_learning_rates_warm_up_then_decay_to_a_tenth():
    rates = learning_rates(torch.tensor([0, 5, 10, 300, 900]), 0.2, 10, 300).tolist()
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.02, 0.02])


def test_new_vectors_go_in_front_and_rows_leave_in_one_step():
    batch = FitBatch(3, torch.device("cpu"))
    old = [torch.full((2, 3), 1.0), torch.full((1, 3), 2.0), torch.full((2, 3), 3.0)]
    batch.add([(v, torch.arange(4), 2, False) for v in old])
    batch.m += 0.5
    batch.add_vectors_in_front(1, 1, torch.full((3, 3), 9.0))  # one vector -> four: slots widen for all
    assert batch.k_max == 4 and batch.k.tolist() == [2, 4, 2]
    assert batch.params[1, :, 0].tolist() == [9.0, 9.0, 9.0, 2.0]
    assert batch.m[1, :, 0].tolist() == [0.0, 0.0, 0.0, 0.5]
    assert batch.params[0, :, 0].tolist() == [1.0, 1.0, 0.0, 0.0]  # others keep theirs; new slots masked
    batch.keep([2, 0])
    assert batch.k_max == 2 and batch.params[:, 0, 0].tolist() == [3.0, 1.0] and batch.k.tolist() == [2, 2]


class OpCounter(TorchDispatchMode):
    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(tiny, rows: int, monkeypatch) -> list[int]:
    """Tensor operations between consecutive steps of the real fit loop over `rows` fixed segments
    that never verify (an unreachable margin), so every step is a plain one."""
    from lmzip import fit
    from lmzip.segmenting import Piece, Stream

    counter, marks = OpCounter(), []
    real = fit.step_decisions
    monkeypatch.setattr(fit, "step_decisions", lambda *a, **k: marks.append(counter.count) or real(*a, **k))
    ids = tiny.tokenizer("Alice was beginning to get very tired of sitting", add_special_tokens=False)["input_ids"]
    streams = [(r, Stream.whole(tiny.tokenizer, Piece(tiny.tokenizer.decode(ids[r:r + 12]).encode(),
                                                      tuple(ids[r:r + 12])))) for r in range(rows)]
    cfg = fit.FitConfig(vectors=2, max_vectors=None, max_steps=6, batch_size=rows, margin=1e9, bf16=False)
    with counter:
        next(fit.fit_streams(tiny, streams, cfg))
    return [b - a for a, b in zip(marks, marks[1:])]


def test_a_fit_step_dispatches_as_many_tensor_operations_for_16_rows_as_for_1(tiny, monkeypatch):
    one, many = ops_per_step(tiny, 1, monkeypatch), ops_per_step(tiny, 16, monkeypatch)
    assert len(one) >= 4 and len(many) == len(one)
    # after the first step (which builds the layout), at most an op or two apart (one expand is a
    # no-op for one row); the per-row loop this replaced dispatched 49 more per row
    assert all(abs(m - o) <= 2 for o, m in zip(one[1:], many[1:]))
