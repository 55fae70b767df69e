"""Segment kinds: one module per kind, behind one small interface, and the registry.

A kind module has:

- `KIND` (its id in the segment table), `NAME`, and `NEEDS_MODEL`;
- `check_entry(entry, header) -> str | None`: what is wrong with a table entry of this
  kind (its counts and payload length), or None; the container calls it for the reader
  and for the writer alike;
- `work(entry) -> int`: the model steps decoding the segment costs (0 without a model);
- `decode(jobs, ctx) -> list[bytes]`: the original bytes of each payload, in order,
  raising `SegmentError` for one that cannot be decoded; a kind may decode its jobs
  together (a batch), and the codec decodes a segment alone again before it reports
  a checksum mismatch;
- an `encode...` function that turns a piece of input into a `CodedSegment`.

Adding a kind is one new module and one line in `KINDS` below (and, for a kind coded under the
model's predictions, in `LM_KINDS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UnsupportedKindError
from . import lm, lm3, lm3_group, lm3_head, lm3_text, lm_long, lm_packed, memory, zstd


@dataclass(frozen=True)
class CodedSegment:
    """One segment as the encoder hands it to the writer: plain data that can cross a process.

    `payload` None means raw bytes that the writer stores as zstd, sharing one frame with
    raw neighbours (a piece that was not fitted, or was not worth fitting).
    """

    kind: int
    data: bytes                  # the original bytes
    payload: bytes | None
    token_count: int = 0
    vector_count: int = 0
    stats: dict = field(default_factory=dict, compare=False)  # steps, seconds, accuracy, margin, tokens


@dataclass(frozen=True)
class DecodeJob:
    index: int
    entry: object      # container.Segment
    payload: bytes


@dataclass
class DecodeContext:
    header: object                 # container.Header
    model: object | None = None    # models.LoadedModel, for kinds that need one
    batch_size: int = 128           # as batch_decode.DEFAULT_BATCH_SIZE
    threads: int = 1                 # memory segments' batches decoded side by side (the model's
                                     # CPU threads; 1 on a GPU); the lm kinds use all CPU threads
    memory_rows: int | None = None   # memory segments' rows once a batch ran out of device memory


# What encode(method=...) takes: memory segments, the lm kinds, or zstd alone.
METHODS = ("memory", "lm", "zstd")
KINDS = {module.KIND: module for module in (zstd, memory, lm, lm_long, lm_packed, lm3, lm3_group, lm3_head,
                                                 lm3_text)}
LM_KINDS = frozenset({lm.KIND, lm_long.KIND, lm_packed.KIND, lm3.KIND, lm3_group.KIND,
                      lm3_head.KIND, lm3_text.KIND})  # tokens range-coded under the model


def get(kind: int):
    """The module of a kind id, or UnsupportedKindError naming it."""
    try:
        return KINDS[kind]
    except KeyError:
        raise UnsupportedKindError(f"unsupported segment kind {kind} (this lmzip knows "
                                   f"{', '.join(f'{k} {m.NAME}' for k, m in sorted(KINDS.items()))}); "
                                   "a newer lmzip may read it") from None


def raw(data: bytes, **stats) -> CodedSegment:
    """Bytes for the writer to store as zstd."""
    return CodedSegment(zstd.KIND, data, None, stats=stats)
