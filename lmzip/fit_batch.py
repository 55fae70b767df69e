"""The numeric state of the segments being fitted, held as batch tensors.

Every row's vectors, Adam moments, step counts and lengths live in (B, ...)
tensors, so a fit step costs the same host work for 1 row as for 256: one
layout (rebuilt only when a row joins, leaves or changes length), one forward
and backward, one masked Adam update. Per-row Python runs only for a row that
has an event, and then costs O(1) tensor operations, not O(B).

A row is laid out as [prefix | K_max vector slots | T_max token slots]: a row
with fewer vectors leaves its last slots masked and its position ids skip
them, so it sees exactly the positions the decoder gives it (prefix, vectors,
tokens). A growing row's forward pass looks `lookahead` tokens past its
target, to see how far its vectors already hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """What one fit step needs besides the vectors: which slots count, where each input sits."""

    target: torch.Tensor     # (B, T) token ids (0 past a row's span)
    valid: torch.Tensor      # (B, T) bool: in the forward pass
    scored: torch.Tensor     # (B, T) bool: in the loss (the first n tokens)
    mask: torch.Tensor       # (B, P + K + T) long attention mask
    positions: torch.Tensor  # (B, P + K + T) position ids
    predictor: torch.Tensor  # (B, T) index of the input whose output predicts token j


def layout(ids: torch.Tensor, k: torch.Tensor, n: torch.Tensor, span: torch.Tensor, prefix_len: int,
           k_max: int) -> Layout:
    """Vectorized layout of rows with k vectors, n scored tokens and span tokens in the pass."""
    device, b = ids.device, ids.shape[0]
    t_max = max(int(span.max()), 1) if b else 1
    ar_t = torch.arange(t_max, device=device)
    valid = ar_t < span[:, None]
    scored = ar_t < n[:, None]
    target = torch.where(valid, ids[:, :t_max], 0)  # a span never passes the row's own ids
    slots = torch.arange(k_max, device=device) < k[:, None]
    head = torch.arange(prefix_len + k_max, device=device).expand(b, -1)
    positions = torch.cat([head, prefix_len + k[:, None] + ar_t], dim=1)
    predictor = torch.cat([(prefix_len + k - 1)[:, None], (prefix_len + k_max + ar_t[:-1]).expand(b, -1)], dim=1)
    mask = torch.cat([torch.ones(b, prefix_len, dtype=torch.bool, device=device), slots, valid], dim=1)
    return Layout(target, valid, scored, mask.long(), positions, predictor)


def learning_rates(step: torch.Tensor, lr: float, warmup: int, max_steps: int) -> torch.Tensor:
    """Per row: linear warm-up, then cosine decay to a tenth of the peak at the step budget."""
    s = step.double()
    progress = ((s - warmup) / max(max_steps - warmup, 1)).clamp(0.0, 1.0)
    decayed = lr * (0.1 + 0.45 * (1 + torch.cos(math.pi * progress)))
    return torch.where(s < warmup, lr * s / max(warmup, 1), decayed)


class FitBatch:
    """Batch tensors of the rows being fitted; row i of every tensor is the i-th row."""

    LONG = ("k", "n", "t_len", "step", "since", "total", "best_n", "peak")
    VECTORS = ("params", "m", "v", "peak_vectors")  # (B, K_max, H)

    def __init__(self, hidden: int, device: torch.device):
        self.hidden, self.device = hidden, device
        empty3 = torch.zeros(0, 0, hidden, device=device)
        self.params, self.m, self.v = empty3, empty3.clone(), empty3.clone()
        self.peak_vectors = empty3.half()
        self.ids = torch.zeros(0, 0, dtype=torch.long, device=device)
        for name in self.LONG:
            setattr(self, name, torch.zeros(0, dtype=torch.long, device=device))
        self.growing = torch.zeros(0, dtype=torch.bool, device=device)
        self._layout: Layout | None = None

    def __len__(self) -> int:
        return self.params.shape[0]

    @property
    def k_max(self) -> int:
        return self.params.shape[1]

    def _pad(self, k_max: int, t_max: int) -> None:
        """Widen the vector slots to k_max and the token slots to t_max (zeros: masked)."""
        if k_max > self.k_max:
            for name in self.VECTORS:
                t = getattr(self, name)
                setattr(self, name, torch.nn.functional.pad(t, (0, 0, 0, k_max - t.shape[1])))
        if t_max > self.ids.shape[1]:
            self.ids = torch.nn.functional.pad(self.ids, (0, t_max - self.ids.shape[1]))

    def add(self, rows: list[tuple[torch.Tensor, torch.Tensor, int, bool]]) -> None:
        """Append rows given as (vectors (K, H), ids (T,), n, growing)."""
        if not rows:
            return
        k_max = max([self.k_max] + [v.shape[0] for v, _, _, _ in rows])
        t_max = max([self.ids.shape[1]] + [len(ids) for _, ids, _, _ in rows])
        self._pad(k_max, t_max)
        vectors = torch.zeros(len(rows), k_max, self.hidden, device=self.device)
        ids = torch.zeros(len(rows), t_max, dtype=torch.long, device=self.device)
        for i, (v, t, _, _) in enumerate(rows):
            vectors[i, : v.shape[0]] = v
            ids[i, : len(t)] = t
        zeros = torch.zeros_like(vectors)
        self.params = torch.cat([self.params, vectors])
        self.m, self.v = torch.cat([self.m, zeros]), torch.cat([self.v, zeros])
        self.peak_vectors = torch.cat([self.peak_vectors, zeros.half()])
        self.ids = torch.cat([self.ids, ids])
        new = dict(k=[v.shape[0] for v, _, _, _ in rows], n=[n for _, _, n, _ in rows],
                   t_len=[len(t) for _, t, _, _ in rows])
        for name in self.LONG:
            values = new.get(name, [0] * len(rows))
            setattr(self, name, torch.cat([getattr(self, name), torch.tensor(values, device=self.device)]))
        self.growing = torch.cat([self.growing, torch.tensor([g for *_, g in rows], device=self.device)])
        self._layout = None

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, in this order; vector slots shrink to the widest kept row."""
        index = torch.tensor(indices, dtype=torch.long, device=self.device)
        k_max = int(self.k[index].max()) if indices else 0
        for name in self.VECTORS:
            setattr(self, name, getattr(self, name)[index, :k_max])
        self.ids = self.ids[index]
        for name in self.LONG + ("growing",):
            setattr(self, name, getattr(self, name)[index])
        self._layout = None

    def set_length(self, i: int, n: int, step: int) -> None:
        """Row i aims at n tokens from now on, its schedule at `step`, its patience renewed."""
        self.n[i], self.step[i], self.since[i] = n, step, 0
        self._layout = None

    def add_vectors_in_front(self, i: int, k: int, fresh: torch.Tensor) -> None:
        """Row i (k vectors) gets `fresh` vectors in front of its own (so the fitted ones keep
        their distance to the text), zero moments for them, and a new schedule."""
        more = k + fresh.shape[0]
        self._pad(more, 0)
        for name, head in (("params", fresh), ("m", torch.zeros_like(fresh)), ("v", torch.zeros_like(fresh))):
            t = getattr(self, name)
            t[i, :more] = torch.cat([head, t[i, :k]])
        self.k[i], self.step[i], self.since[i] = more, 0, 0
        self._layout = None

    def layout(self, prefix_len: int, lookahead: int) -> Layout:
        if self._layout is None:
            span = torch.where(self.growing, torch.minimum(self.t_len, self.n + lookahead), self.n)
            self._layout = layout(self.ids, self.k, self.n, span, prefix_len, self.k_max)
        return self._layout

    def note_peaks(self, holds: torch.Tensor) -> None:
        """A growing row keeps the vectors that held the most leading tokens so far."""
        better = self.growing & (holds > torch.maximum(self.peak, self.best_n))
        self.peak = torch.where(better, holds, self.peak)
        self.peak_vectors = torch.where(better[:, None, None], self.params.half(), self.peak_vectors)

    def adam(self, grad: torch.Tensor, active: torch.Tensor, lr: float, warmup: int, max_steps: int,
             betas: tuple[float, float], weight_decay: float) -> None:
        """One masked Adam update: rows in `active` step with their own step count and rate."""
        b1, b2 = betas
        inc = active.long()
        self.step, self.total, self.since = self.step + inc, self.total + inc, self.since + inc
        s = self.step.clamp(min=1).double()
        correction1 = (1 - b1 ** s).float()[:, None, None]
        correction2 = (1 - b2 ** s).float()[:, None, None]
        rate = learning_rates(self.step, lr, warmup, max_steps).float()[:, None, None]
        m = self.m * b1 + grad * (1 - b1)
        v = self.v * b2 + grad * grad * (1 - b2)
        update = (m / correction1) / ((v / correction2).sqrt() + 1e-8)
        params = self.params - rate * (update + weight_decay * self.params)
        on = active[:, None, None]
        self.m, self.v = torch.where(on, m, self.m), torch.where(on, v, self.v)
        self.params = torch.where(on, params, self.params)
