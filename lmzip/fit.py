"""Fitting memory vectors: only the vectors train, the model stays frozen.

Each segment gets K vectors of the model's hidden size, placed after the
prefix tokens and before its token embeddings, and trained on cross-entropy of
the segment's tokens. Many segments share one forward and backward pass; each
row has its own vectors, Adam state and schedule, leaves the batch as soon as
it verifies, and a waiting segment takes its place. A segment that runs out of
steps gets more vectors (new ones in front of the ones it has, so the fitted
vectors keep their distance to the text) and another budget, up to
`max_vectors`; past that it goes to zstd. A growing segment (see `Stream`)
instead lengthens while it verifies and, out of patience, closes at the longest
length its vectors hold. A row counts as done only when the
real decoder (`greedy_decode`) reproduces its tokens from the fp16-rounded
vectors with every top-1 logit ahead of the runner-up by at least the margin.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Iterator

import torch
import torch.nn.functional as F

from . import kinds
from .fit_batch import FitBatch, Layout, layout
from .fit_config import FitConfig
from .fit_decisions import (escalated_vectors, first_length, grown_length, salvaged_length, shrunk_length,
                            step_decisions, tail_vectors)
from .generate import greedy_decode, greedy_decode_batch, teacher_forced_accuracy
from .models import LoadedModel
from .precision import exact_float32
from .segmenting import Piece, Region, Stream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    vectors: torch.Tensor | None  # (K, H) float16 when verified, else None
    steps: int                    # over all attempts and lengths tried
    seconds: float
    accuracy: float               # teacher-forced, on the last fp16 vectors tried
    min_margin: float             # of the last real decode tried (-inf if none)


@dataclass
class _Row:
    """What the fit loop knows of one row on the host; its numbers live in a `FitBatch`."""

    key: Hashable
    stream: Stream
    ids: torch.Tensor      # (T,) all the tokens the stream offers
    started: float
    k: int                 # vectors
    n: int                 # the loss covers the first n tokens
    best_n: int = 0        # the longest length verified by the float32 check, and its vectors
    best: torch.Tensor | None = None
    fallback: tuple[int, torch.Tensor] | None = None  # the verified length a salvage replaced
    last_margin: float = float("-inf")
    total_steps: int = 0   # read from the batch when the row closes
    tried: torch.Tensor | None = None  # its last vectors, when it closes without a verified length


# The token GPT-2-style pretraining puts between documents: what such a model sees first.
DOCUMENT_SEPARATOR = "<|endoftext|>"


def sink_prefix(lm: LoadedModel, cfg: FitConfig) -> tuple[int, ...]:
    """The prefix tokens segments are fitted (and decoded) after.

    Causal LMs put much of their attention on the first position (an attention
    sink). A memory vector there must play that role as well as carry text;
    with a start-of-text token in front, SmolLM2 fitted 10 tokens into one
    vector in 31 to 50 steps instead of failing in 300 (README). The document
    separator beat the chat BOS `<|im_start|>` (median 66.5 against 87.5 steps
    for K = 4), so it comes first; then the tokenizer's BOS, then its EOS.
    """
    if cfg.prefix is not None:
        return tuple(cfg.prefix)
    tok = lm.tokenizer
    separator = tok.get_vocab().get(DOCUMENT_SEPARATOR)
    for token_id in (separator, tok.bos_token_id, tok.eos_token_id):
        if token_id is not None:
            return (int(token_id),)
    return ()


def verify_all(lm: LoadedModel, candidates: list[tuple[torch.Tensor, list[int]]], margin: float,
               prefix: tuple[int, ...]) -> list[tuple[bool, float]]:
    """Verify several segments in one batched decode (a closing segment does not hold up the fit);
    one that fails in the batch is verified alone before it counts as failed (SPEC.md, "Batched
    decoding"). Each (vectors16, ids) gets (ok, min_margin)."""
    if len(candidates) == 1:
        return [verify(lm, *candidates[0], margin, prefix)]
    with exact_float32():
        decoded = greedy_decode_batch(lm, [(v.float(), len(ids)) for v, ids in candidates], prefix,
                                      batch_size=len(candidates))
    out = []
    for (vectors16, ids), d in zip(candidates, decoded):
        ok = d.ids == list(ids) and d.min_margin >= margin
        out.append((True, d.min_margin) if ok else verify(lm, vectors16, ids, margin, prefix))
    return out


def verify(lm: LoadedModel, vectors16: torch.Tensor, ids, margin: float, prefix: tuple[int, ...]):
    """Decode exactly as the decoder will; return (ok, min_margin)."""
    with exact_float32():
        decoded = greedy_decode(lm, vectors16.float(), len(ids), prefix)
    ok = decoded.ids == list(ids) and decoded.min_margin >= margin
    return ok, decoded.min_margin


class _VectorInit:
    """Draws starting vectors around the mean token embedding, spread like the embeddings.

    Token embeddings share a large common component (its norm is 2.2 of their
    3.2 on SmolLM2); starting from it took a median 53 steps against 66.5 from
    zero-mean noise (README).
    """

    def __init__(self, lm: LoadedModel, seed: int):
        with torch.no_grad():
            weight = lm.model.get_input_embeddings().weight.float()
            self.mean, self.std = weight.mean(0), weight.std()
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, k: int) -> torch.Tensor:
        noise = torch.randn(k, self.mean.shape[0], generator=self.generator).to(self.mean.device)
        return self.mean + noise * self.std


def bf16_available(device: torch.device) -> bool:
    """bfloat16 autocast pays on GPUs and on CPUs with native bf16 (AVX-512 BF16, AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _gap_to_runner_up(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Target logit minus the best other logit, per position (negative when wrong). The top two
    logits give the best other one in a pass, without a copy of the (..., V) logits. (Under the
    hinge its gradient goes to one of two tied runners-up, not split between them.)"""
    right = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    top = logits.topk(2, dim=-1)
    best_other = torch.where(top.indices[..., 0] == target, top.values[..., 1], top.values[..., 0])
    return right - best_other


def _holding(lm: LoadedModel, candidates: list[tuple[torch.Tensor, torch.Tensor]], margin: float,
             prefix: tuple[int, ...]) -> list[int]:
    """The float32 screen, batched: for each (vectors16 (K, H), ids (T,)), teacher-forced, how many
    leading tokens are right by at least the margin. One forward pass and one host sync for all;
    only a screen (padding may move a logit in its last bits): `verify` decides."""
    if not candidates:
        return []
    device = lm.device
    k = torch.tensor([v.shape[0] for v, _ in candidates], device=device)
    n = torch.tensor([len(ids) for _, ids in candidates], device=device)
    ids = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(t, device=device) for _, t in candidates],
                                          batch_first=True)
    vectors = torch.nn.utils.rnn.pad_sequence([v.float() for v, _ in candidates], batch_first=True)
    lay = layout(ids, k, n, n, len(prefix), vectors.shape[1])
    with torch.no_grad(), exact_float32():
        prefix_embeds = lm.embed(torch.tensor(prefix, dtype=torch.long, device=device)).float()
        embeds = torch.cat([prefix_embeds.expand(len(candidates), -1, -1), vectors,
                            lm.embed(lay.target).float()], dim=1)
        hidden = lm.model.base_model(inputs_embeds=embeds, attention_mask=lay.mask, position_ids=lay.positions,
                                     use_cache=False).last_hidden_state
        picked = hidden.gather(1, lay.predictor.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        logits = lm.model.get_output_embeddings()(picked).float()
        gap = _gap_to_runner_up(logits, lay.target)
        return ((gap >= margin) & lay.scored).long().cumprod(1).sum(1).tolist()


def fit_regions(lm: LoadedModel, regions: Iterable[tuple[Hashable, Region]],
                cfg: FitConfig) -> Iterator[tuple[Hashable, kinds.CodedSegment]]:
    """Cut every region into fitted segments; yield (key, coded segment) for each.

    Plain data in and out, so that the caller may be another process: a region's
    segments come in order, each as soon as it closes (regions interleave); a
    segment without a payload is raw text for zstd.
    """
    streams = ((key, Stream.of(lm.tokenizer, region)) for key, region in regions)
    for key, piece, result in fit_streams(lm, streams, cfg):
        stats = dict(tokens=len(piece.ids or ()), steps=result.steps, seconds=result.seconds,
                     accuracy=result.accuracy, min_margin=result.min_margin)
        if result.vectors is not None:
            yield key, kinds.memory.encode(piece.data, piece.ids, result.vectors, **stats)
        else:
            yield key, kinds.raw(piece.data, **stats)


def fit_streams(lm: LoadedModel, streams: Iterable[tuple[Hashable, Stream]],
                cfg: FitConfig) -> Iterator[tuple[Hashable, Piece, FitResult]]:
    """Cut every stream into fitted segments; yield (key, piece, result) for each segment.

    A stream's segments come in order, each as soon as it closes; streams interleave.
    A result without vectors means the piece goes to zstd.
    """
    device = lm.device
    bf16 = bf16_available(device) if cfg.bf16 is None else cfg.bf16
    prefix = sink_prefix(lm, cfg)
    with torch.no_grad():
        prefix_embeds = lm.embed(torch.tensor(prefix, dtype=torch.long, device=device)).float()
    fitting = lm.fitting_copy() if bf16 else lm.model
    body, head = fitting.base_model, fitting.get_output_embeddings()
    init_vectors = _VectorInit(lm, cfg.seed)
    pending = deque(streams)
    batch = FitBatch(lm.hidden_size, device)
    rows: list[_Row] = []  # rows[i] is row i of `batch`
    held: dict[Hashable, tuple[int, int]] = {}  # per stream: tokens and vectors memory-coded so far

    def admit():
        """Fill the batch from the waiting streams; a stream with no valid length here skips on."""
        new: list[_Row] = []
        while pending and len(rows) + len(new) < cfg.batch_size:
            key, stream = pending.popleft()
            n = first_length(stream, cfg.start_tokens) if not stream.done else None
            if n is not None:
                k = tail_vectors(stream, cfg.vectors, *held.get(key, (0, 0)), cfg.start_tokens)
                ids = torch.tensor(stream.ids, device=device)
                new.append(_Row(key, stream, ids, time.perf_counter(), k, n))
            elif not stream.done:
                yield key, stream.skip(), _unfitted()
                pending.appendleft((key, stream))  # done, or on to what follows the skipped text
        batch.add([(init_vectors(r.k), r.ids, r.n, r.stream.growing) for r in new])
        rows.extend(new)

    def set_length(i: int, n: int) -> None:
        rows[i].n = n
        batch.set_length(i, n, cfg.warmup)  # back to the peak rate, no second warm-up

    def verified(i: int, vectors16: torch.Tensor, holding: int) -> bool:
        """Row i's vectors passed the float32 screen at its length: keep them; grow if it can.
        False: the row closes."""
        r = rows[i]
        r.best_n, r.best = r.n, vectors16
        batch.best_n[i] = r.n
        n = grown_length(r.stream, max(r.n, holding), r.best_n, cfg.grow_tokens) if r.stream.growing else None
        if n is not None:
            set_length(i, n)
        return n is not None

    def out_of_steps(out: list[int], before: torch.Tensor) -> list[int]:
        """Rows out of steps salvage, grow, shrink or escalate; return those that close."""
        salvaging = [i for i in out if rows[i].stream.growing]
        tried = {i: [before[i, : rows[i].k].half()] for i in salvaging}
        for i in salvaging:
            if int(batch.peak[i]) > 0:
                tried[i].insert(0, batch.peak_vectors[i, : rows[i].k].clone())
        flat = [(v, rows[i].ids) for i in salvaging for v in tried[i]]
        holdings = iter(_holding(lm, flat, cfg.margin, prefix))
        closing = []
        for i in out:
            r = rows[i]
            if r.stream.growing:
                first = r.best is None
                choice = salvaged_length(r.stream, [next(holdings) for _ in tried[i]], r.best_n)
                if choice is not None:
                    if r.best is not None and r.fallback is None:
                        r.fallback = (r.best_n, r.best)
                    r.best_n, r.best = choice[1], tried[i][choice[0]]
                    batch.best_n[i] = r.best_n
                if first and r.best is not None:  # the first length fell short: go on from what holds
                    n = grown_length(r.stream, r.best_n, r.best_n, cfg.grow_tokens)
                    if n is not None:
                        set_length(i, n)
                        continue
                if r.best is None:
                    n = shrunk_length(r.stream, r.n)
                    if n is not None:
                        set_length(i, n)
                        continue
            elif r.best is None:
                k = escalated_vectors(r.k, cfg.vector_limit)
                if k is not None:
                    batch.add_vectors_in_front(i, r.k, init_vectors(k - r.k))
                    r.k = k
                    continue
            closing.append(i)
        return closing

    def verify_closing(closed: list[_Row]) -> dict[int, bool]:
        """Verify the closing rows' best vectors together by real decoding; a salvaged length that
        fails falls back to the one verified before it."""
        ok: dict[int, bool] = {}
        todo = [r for r in closed if r.best is not None]
        while todo:
            results = verify_all(lm, [(r.best, r.ids[: r.best_n].tolist()) for r in todo], cfg.margin, prefix)
            retry = []
            for r, (good, r.last_margin) in zip(todo, results):
                ok[id(r)] = good
                if not good and r.fallback is not None:
                    r.best_n, r.best = r.fallback
                    r.fallback = None
                    retry.append(r)
            todo = retry
        return ok

    def close(r: _Row, ok: bool) -> tuple[Hashable, Piece, FitResult]:
        """Cut the row's piece from the stream: memory-coded if its vectors verified."""
        vectors16 = r.best.cpu() if ok else None
        n = r.best_n or r.n
        tried = r.best if r.best is not None else r.tried
        acc = teacher_forced_accuracy(lm, tried.float(), r.ids[:n].tolist(), prefix)
        result = FitResult(vectors16, r.total_steps, time.perf_counter() - r.started, acc, r.last_margin)
        log.debug("segment of stream %s: %d tokens, %d vectors, %s after %d steps, %.1f s", r.key, n, r.k,
                  "verified" if vectors16 is not None else "to zstd", r.total_steps, result.seconds)
        if vectors16 is not None:
            tokens, vectors = held.get(r.key, (0, 0))
            held[r.key] = (tokens + n, vectors + r.k)
        return r.key, r.stream.take(n), result

    yield from admit()
    embedded: tuple[Layout | None, torch.Tensor | None] = (None, None)
    while rows:
        b = len(rows)
        lay = batch.layout(len(prefix), cfg.grow_tokens)
        if embedded[0] is not lay:  # token embeddings change only with the layout
            with torch.no_grad():
                embedded = (lay, lm.embed(lay.target).float())
        before = batch.params  # updates replace it, so this stays the vectors of this pass
        params = before.detach().requires_grad_(True)
        embeds = torch.cat([prefix_embeds.expand(b, -1, -1), params, embedded[1]], dim=1)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = body(inputs_embeds=embeds, attention_mask=lay.mask, position_ids=lay.positions,
                          use_cache=False).last_hidden_state
            picked = hidden.gather(1, lay.predictor.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            logits = head(picked).float()  # (B, T, V): logits[i, j] predicts token j of row i
        ce = F.cross_entropy(logits.transpose(1, 2), lay.target, reduction="none")  # (B, T)
        # Optional hinge on thin gaps: it helps the tiny test model reach the margin with
        # one vector, but on SmolLM2 cross-entropy alone verified in fewer steps (README).
        if cfg.hinge:
            gap = _gap_to_runner_up(logits, lay.target)  # (B, T)
            loss = ce + cfg.hinge * F.relu(2 * cfg.margin - gap)
        else:  # the gap only tells what holds: keep its (B, T, V) work out of the backward pass
            gap = _gap_to_runner_up(logits.detach(), lay.target)
            loss = ce
        per_row = (loss * lay.scored).sum(1) / lay.scored.sum(1)
        (grad,) = torch.autograd.grad(per_row.sum(), params)

        with torch.no_grad():
            # What each row holds in this (bf16) pass, read back in one host sync.
            holds, candidate, over = step_decisions(gap.detach(), lay.valid, batch.n, batch.since,
                                                    cfg.max_steps, cfg.margin)
            batch.note_peaks(holds)
            holds_h, candidate_h, over_h = torch.stack([holds, candidate.long(), over.long()]).tolist()
            screened = [i for i in range(b) if candidate_h[i]]
            # One float32 teacher-forced pass on the fp16 vectors of all candidates: bf16
            # candidates often fail in float32, and the real (greedy) decode costs a pass per token.
            sixteen = {i: before[i, : rows[i].k].half() for i in screened}
            screen = _holding(lm, [(sixteen[i], rows[i].ids[: rows[i].n]) for i in screened], cfg.margin, prefix)
            passed = [i for i, h in zip(screened, screen) if h >= rows[i].n]
            stays = set(passed)
            active = ~over
            if passed:
                active[passed] = False
            batch.adam(grad, active, cfg.lr, cfg.warmup, cfg.max_steps, cfg.betas, cfg.weight_decay)

            closing = [i for i in passed if not verified(i, sixteen[i], holds_h[i])]
            closing += out_of_steps([i for i in range(b) if over_h[i] and i not in stays], before)

        if closing:
            closing.sort()
            totals = batch.total[closing].tolist()
            for i, total in zip(closing, totals):
                rows[i].total_steps = total
                rows[i].tried = before[i, : rows[i].k].half()
            closed = [rows[i] for i in closing]
            gone = set(closing)
            kept = [i for i in range(b) if i not in gone]
            batch.keep(kept)
            rows[:] = [rows[i] for i in kept]
            ok = verify_closing(closed)
            for r in closed:
                yield close(r, ok.get(id(r), False))
                if not r.stream.done:  # the stream's next segment goes first
                    pending.appendleft((r.key, r.stream))
            yield from admit()


def _unfitted() -> FitResult:
    return FitResult(None, 0, 0.0, 0.0, float("-inf"))
