"""Greedy decoding of many memory segments at once: one forward pass per step for a whole batch.

Each row is one segment, laid out exactly as the single decoder lays it out
(SPEC.md, "Decoding a memory segment"): the prefix tokens at positions 0 to
P - 1, its K vectors at P to P + K - 1, then its generated tokens. Rows differ
in K and in length, so they are aligned on the right (left padding): the
attention mask hides the padding columns and the position ids are given per
row, so padding moves no row's positions.

The batch is kept full (continuous batching): a row that has all its tokens
leaves, and waiting segments are prefilled together and joined to the running
rows, the caches left-padded to a common length; columns that no row attends
to any more are dropped. The longest segments are admitted first, so the
batch drains at the end over the short ones.

Batching changes the float32 rounding (other GEMM shapes, padded softmax
rows), and should never change which token wins: the encoder stores a segment
only if every step's top-1 logit led the runner-up by at least the archive's
margin, and batched logits differ from single-row ones by far less
(notes-batchdec.md has the measured figure). A caller decodes a segment that
fails its CRC in a batch again alone before it reports the segment damaged.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import InputError, OptionError
from .models import LoadedModel
from .sharding import deal, map_shards

DEFAULT_BATCH_SIZE = 128  # rows: on a CPU core, 128 rows decode 1.15 times faster than 64 (BENCHMARKS.md)
# On a GPU a step costs about the same from 1 to 512 rows (it is bound by launching operations):
# an H200 decoded 15,788 tokens/s in batches of 512 against 3,203 in batches of 128 (BENCHMARKS.md).
GPU_BATCH_SIZE = 512
# Bytes of float32 keys and values that all the batches of one call may hold together: the
# rows of a batch are cut to fit (a 1.7B-parameter model keeps 390 KB a position and row).
CACHE_BUDGET = 4 << 30
MIN_SHARD_ROWS = 16  # segments a thread must get to run a batch of its own
# Rows times columns of one prefill: its logits take this times the vocabulary in float32
# (400 MB for SmolLM2), however many vectors a segment has (an archive may give 1024).
MAX_PREFILL_POSITIONS = 2048


def default_batch_size(device: torch.device | None) -> int:
    """Rows decoded together where the caller does not say: more on a CUDA GPU (CACHE_BUDGET still
    cuts them for long segments); other devices, and none (no model), get the CPU's."""
    return GPU_BATCH_SIZE if device is not None and device.type == "cuda" else DEFAULT_BATCH_SIZE


@dataclass(frozen=True)
class Decoded:
    ids: list[int]
    min_margin: float  # smallest (top-1 logit - top-2 logit) over all steps


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    top = torch.topk(logits, 2, dim=-1).values  # (..., 2)
    return top[..., 0] - top[..., 1]


def memory_inputs(lm: LoadedModel, prefix: tuple[int, ...], vectors: torch.Tensor) -> torch.Tensor:
    """(P + K, H) float32 input embeddings: the prefix tokens' embeddings, then the vectors."""
    ids = torch.tensor(prefix, dtype=torch.long, device=lm.device)
    return torch.cat([lm.embed(ids).float(), vectors.to(lm.device, torch.float32)])


@dataclass
class _Rows:
    """The running rows, one per segment: state as (B, ...) tensors, a KV cache of B rows."""

    jobs: list[int]  # the job each row decodes
    cache: object  # transformers DynamicCache: per layer, keys and values (B, heads, L, head_dim)
    mask: torch.Tensor  # (B, L) long: 1 where a column holds one of the row's positions
    positions: torch.Tensor  # (B,) long: the position the row's next input takes
    remaining: torch.Tensor  # (B,) long: tokens the row has still to generate
    min_margin: torch.Tensor  # (B,) float32: smallest top-1 lead so far
    logits: torch.Tensor  # (B, V) float32: what the row's next token is chosen from

    def __len__(self) -> int:
        return len(self.jobs)

    def select(self, keep: torch.Tensor) -> _Rows:
        """Keep only the rows `keep` (B',), then drop columns none of them attends to."""
        first = int(self.mask[keep].any(0).long().argmax())  # mask is right-aligned: a prefix of pad columns
        for layer in self.cache.layers:
            layer.keys = layer.keys[keep, :, first:]
            layer.values = layer.values[keep, :, first:]
            _drop_buffers(layer)
        self.jobs = [self.jobs[i] for i in keep.tolist()]
        self.mask = self.mask[keep, first:]
        for name in ("positions", "remaining", "min_margin", "logits"):
            setattr(self, name, getattr(self, name)[keep])
        return self

    def join(self, other: _Rows) -> _Rows:
        """Append other's rows; the shorter cache is left-padded with masked zero columns."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, length, 2), _left_pad(theirs.keys, length, 2)])
            mine.values = torch.cat([_left_pad(mine.values, length, 2), _left_pad(theirs.values, length, 2)])
            _drop_buffers(mine)
        self.jobs = self.jobs + other.jobs
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(other.mask, length, 1)])
        for name in ("positions", "remaining", "min_margin", "logits"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        return self


def _drop_buffers(layer) -> None:
    """Let a growing layer's old buffers go once its keys and values are new tensors: held until
    the next step, they would double the cache's memory after every join and every drain."""
    if hasattr(layer, "key_buffer"):
        layer.key_buffer = layer.value_buffer = None


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


GROW_POSITIONS = 64  # free columns a cache layer's buffer gets when it has to be reallocated


@functools.cache
def _growing_layer_class():
    """A transformers DynamicLayer that appends into a buffer with room to spare.

    DynamicLayer appends a step's keys and values with torch.cat, a copy of the whole cache
    per layer and step (14 % of a 64-row step of 32-token segments, more for longer ones).
    Here the keys and values are views of the first columns of a larger buffer, and a step
    writes into the next free columns; the buffer is made again (one copy) only when it is
    full or when `select` or `join` gave the layer new tensors. The values are the same."""
    from transformers.cache_utils import DynamicLayer  # transformers loads with the model

    class GrowingLayer(DynamicLayer):
        key_buffer = value_buffer = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self.keys.numel() == 0:  # the first update: nothing cached yet
                self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
            self.key_buffer, self.keys = _append(self.key_buffer, self.keys, key_states)
            self.value_buffer, self.values = _append(self.value_buffer, self.values, value_states)
            return self.keys, self.values

    return GrowingLayer


def _append(buffer, cached: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): `cached` (B, H, L, D) followed by `new` (B, H, M, D), as a view of the first
    columns of `buffer` (B, H, C, D) if `cached` is its first L columns and C >= L + M, else of a
    new buffer with room to spare."""
    length, more = cached.shape[-2], new.shape[-2]
    inside = (buffer is not None and cached.data_ptr() == buffer.data_ptr() and cached.stride() == buffer.stride()
              and cached.shape[:2] == buffer.shape[:2] and length + more <= buffer.shape[-2])
    if not inside:
        shape = (*cached.shape[:2], length + more + GROW_POSITIONS, cached.shape[-1])
        buffer = cached.new_empty(shape)
        buffer[..., :length, :] = cached
    buffer[..., length:length + more, :] = new
    return buffer, buffer[..., :length + more, :]


def _new_cache(lm: LoadedModel):
    """The model's own cache, its plain layers (every column kept) growing in buffers."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=lm.model.config)
    growing = _growing_layer_class()
    cache.layers = [growing() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _prefill(lm: LoadedModel, prefix: tuple[int, ...], jobs, chosen: list[int]) -> _Rows:
    """Run the prefix and vectors of the `chosen` jobs, right-aligned, in one forward pass."""
    inputs = [memory_inputs(lm, prefix, jobs[j][0]) for j in chosen]
    length = max(len(x) for x in inputs)
    embeds = inputs[0].new_zeros(len(inputs), length, inputs[0].shape[1])  # (G, L, H)
    mask = torch.zeros(len(inputs), length, dtype=torch.long, device=lm.device)  # (G, L)
    for row, x in enumerate(inputs):
        embeds[row, length - len(x):] = x
        mask[row, length - len(x):] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # (G, L): 0 at each row's first real column
    # Logits at every position, as a one-row decode computes them: keeping only the last one
    # changes the head's matrix shape and its rounding, and one row stays bit-identical so.
    out = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=True,
                   past_key_values=_new_cache(lm))
    logits = out.logits[:, -1].float()  # (G, V)
    return _Rows(jobs=list(chosen), cache=out.past_key_values, mask=mask, positions=mask.sum(1),
                 remaining=torch.tensor([jobs[j][1] for j in chosen], device=lm.device),
                 min_margin=torch.full((len(chosen),), float("inf"), device=lm.device), logits=logits)


def _admit(waiting: deque, free: int, length) -> list[int]:
    """Take the next waiting jobs for one prefill: at most `free`, and at most MAX_PREFILL_POSITIONS
    rows times columns (but always one)."""
    chosen = [waiting.popleft()]
    longest = length(chosen[0])
    while waiting and len(chosen) < free:
        widest = max(longest, length(waiting[0]))
        if (len(chosen) + 1) * widest > MAX_PREFILL_POSITIONS:
            break
        chosen.append(waiting.popleft())
        longest = widest
    return chosen


def _step(lm: LoadedModel, rows: _Rows, next_ids: torch.Tensor) -> None:
    """Feed each row its chosen token (B,) at its next position; one forward pass for all rows."""
    embeds = lm.embed(next_ids).float().unsqueeze(1)  # (B, 1, H)
    rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows), 1)], dim=1)
    out = lm.model(inputs_embeds=embeds, attention_mask=rows.mask, position_ids=rows.positions.unsqueeze(1),
                   past_key_values=rows.cache, use_cache=True)
    rows.cache = out.past_key_values
    rows.logits = out.logits[:, -1].float()
    rows.positions = rows.positions + 1


def _choose(rows: _Rows, ids: list[list[int]]) -> torch.Tensor:
    """Each row's next token (B,) from its logits, appended to its job's ids; counts it and its margin."""
    next_ids = torch.argmax(rows.logits, dim=-1)  # ties: the lowest id, as in the single decoder
    rows.min_margin = torch.minimum(rows.min_margin, top2_margin(rows.logits))
    rows.remaining = rows.remaining - 1
    for job, token in zip(rows.jobs, next_ids.tolist()):
        ids[job].append(token)
    return next_ids


def cache_bytes_per_position(config) -> int | None:
    """Float32 keys and values of one position of one row, from a transformers config; None where
    the config does not say."""
    if hasattr(config, "get_text_config"):  # a multimodal model keeps its LM's settings there
        config = config.get_text_config()
    try:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return int(config.num_hidden_layers * 2 * kv_heads * head_dim * 4)
    except (AttributeError, TypeError, ZeroDivisionError):
        return None


def rows_within(budget: int, lm: LoadedModel, jobs: list[tuple[torch.Tensor, int]], prefix: tuple[int, ...],
                batch_size: int) -> int:
    """At most `batch_size` rows, and no more than a cache of `budget` bytes holds at the jobs'
    longest length (rows are padded to it, and a buffer has GROW_POSITIONS spare columns)."""
    per_position = cache_bytes_per_position(lm.model.config)
    if per_position is None or not jobs:
        return batch_size
    longest = len(prefix) + max(len(vectors) + n for vectors, n in jobs) + GROW_POSITIONS
    return max(1, min(batch_size, budget // (per_position * longest)))


def _plain_cache_layers(lm: LoadedModel) -> bool:
    """Whether the model's cache holds every column of every layer (no sliding window, no
    chunked or linear layers): joining and trimming rows column by column is right only then."""
    from transformers.cache_utils import DynamicCache, DynamicLayer  # transformers loads with the model

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=lm.model.config).layers)


@torch.no_grad()
def greedy_decode_batch(lm: LoadedModel, jobs: list[tuple[torch.Tensor, int]], prefix: tuple[int, ...] = (),
                        batch_size: int = DEFAULT_BATCH_SIZE,
                        observe: Callable[[list[int], torch.Tensor], None] | None = None,
                        cache_budget: int = CACHE_BUDGET) -> list[Decoded]:
    """Decode every job (vectors (K_i, H), n_tokens_i) as `greedy_decode` would; results in job order.

    At most `batch_size` segments run side by side, fewer where their keys and values would
    outgrow `cache_budget` bytes. The caller checks that P + K_i + n_tokens_i
    fits the model's positions (as for `greedy_decode`). `observe(jobs, logits)`, if given, sees
    each step's (B, V) logits and the job of each row before a token is chosen (for measurements).
    """
    if batch_size < 1:
        raise OptionError(f"decode batch size must be at least 1, not {batch_size}")
    for vectors, n_tokens in jobs:
        if vectors.dim() != 2 or vectors.shape[1] != lm.hidden_size or len(prefix) + vectors.shape[0] == 0:
            raise InputError(f"memory vectors of shape {tuple(vectors.shape)} for a model of hidden size "
                             f"{lm.hidden_size} (and {len(prefix)} prefix tokens)")
        if n_tokens < 0:
            raise InputError(f"cannot generate {n_tokens} tokens")
    if not _plain_cache_layers(lm):
        batch_size = 1  # one row never joins or trims a cache
    batch_size = rows_within(cache_budget, lm, jobs, prefix, batch_size)

    ids: list[list[int]] = [[] for _ in jobs]
    margins = [float("inf")] * len(jobs)
    # Longest first: the batch drains over the short ones at the end.
    waiting = deque(sorted((j for j in range(len(jobs)) if jobs[j][1] > 0), key=lambda j: -jobs[j][1]))
    rows: _Rows | None = None
    while waiting or rows is not None:
        free = batch_size - (len(rows) if rows is not None else 0)
        if waiting and free > 0:
            admitted = _prefill(lm, prefix, jobs, _admit(waiting, free, lambda j: len(prefix) + len(jobs[j][0])))
            rows = admitted if rows is None else rows.join(admitted)
        if observe is not None:
            observe(rows.jobs, rows.logits)
        next_ids = _choose(rows, ids)
        done = rows.remaining == 0
        if bool(done.any()):
            for row in done.nonzero()[:, 0].tolist():
                margins[rows.jobs[row]] = float(rows.min_margin[row])
            keep = (~done).nonzero()[:, 0]
            rows = rows.select(keep) if len(keep) else None
            next_ids = next_ids[keep]
        if rows is not None:
            _step(lm, rows, next_ids)
    return [Decoded(i, m) for i, m in zip(ids, margins)]


def greedy_decode_sharded(lm: LoadedModel, jobs: list[tuple[torch.Tensor, int]], prefix: tuple[int, ...] = (),
                          batch_size: int = DEFAULT_BATCH_SIZE, threads: int = 1) -> list[Decoded]:
    """`greedy_decode_batch` over up to `threads` shards of the jobs at once, each shard batches of at
    most `batch_size` rows run by its own thread with one torch thread; results in job order.

    Jobs are dealt to every thread that gets at least MIN_SHARD_ROWS of them, even when they
    would fill one batch: on 2 cores, two one-thread batches of half the rows decode as fast as
    one two-thread batch or faster (BENCHMARKS.md); below that, every shard would read all the
    weights for a few rows. The shards share the cache budget. Like any batch composition,
    sharding changes float32 rounding, not a token that led by the margin."""
    shards = max(1, min(threads, len(jobs) // MIN_SHARD_ROWS))
    return map_shards(lambda indices: greedy_decode_batch(lm, [jobs[j] for j in indices], prefix,
                                                          batch_size=batch_size,
                                                          cache_budget=CACHE_BUDGET // shards),
                      deal([n for _, n in jobs], shards), len(jobs))
