"""An archive's memory as plain data, for feeding to the model without lmzip.

`memory(blob)` reads the memory segments of an archive (no model needed);
`to_safetensors(blob)` writes them as a safetensors file: one float16 tensor
`segment.N.vectors` (K, H) per memory segment, and as string metadata each
segment's prefix token ids, token count and byte span, and the model's id and
fingerprints. The model regenerates segment N exactly by greedy decoding from
the prefix tokens' embeddings followed by the vectors, as `inputs_embeds`
(README, "Memory as model input").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import save

from . import container, inspection
from .kinds.memory import read_vectors

EXPORT_FORMAT = "lmzip-memory-1"  # metadata["format"], so readers can tell later layouts apart


@dataclass(frozen=True, eq=False)  # eq=False: == on arrays is elementwise
class MemorySegment:
    """Greedy decoding of `token_count` tokens after the `prefix` tokens' embeddings and
    `vectors` gives back the original bytes [byte_start, byte_end)."""

    index: int               # the segment's index in the archive, as `lmzip info` numbers it
    vectors: np.ndarray = field(repr=False)  # (K, H) float16
    prefix: tuple[int, ...]  # token ids whose embeddings go before the vectors
    token_count: int
    byte_start: int
    byte_end: int
    model_id: str
    tokenizer_sha256: str    # hex, as `lmzip info` prints it
    weights_sha256: str


def _memory(archive: container.Archive) -> list[MemorySegment]:
    h = archive.header
    found, start = [], 0
    for i, s in enumerate(archive.segments):
        end = start + s.original_length
        if s.kind == container.KIND_MEMORY:
            # check() found the payload intact, and exactly vector_count finite vectors of hidden_size
            vectors = read_vectors(archive.payload(i), s.vector_count)
            found.append(MemorySegment(i, vectors.astype(np.float16), tuple(h.prefix), s.token_count,
                                       start, end, h.model_id, h.tokenizer_sha256.hex(),
                                       h.weights_sha256.hex()))
        start = end
    return found


def memory(blob) -> list[MemorySegment]:
    """The memory segments of an archive, in order (zstd segments are left out); damage
    (a payload's CRC, a non-finite vector) is an error, as in decoding."""
    return _memory(inspection.check(blob))


def to_safetensors(blob) -> bytes:
    """A safetensors file of the archive's memory segments (module docstring)."""
    return safetensors_and_count(blob)[0]


def safetensors_and_count(blob) -> tuple[bytes, int]:
    """to_safetensors(blob), and how many memory segments it holds."""
    archive = inspection.check(blob)
    segments = _memory(archive)
    h = archive.header
    metadata = {
        "format": EXPORT_FORMAT,
        "model_id": h.model_id,
        "tokenizer_sha256": h.tokenizer_sha256.hex(),
        "weights_sha256": h.weights_sha256.hex(),
        "hidden_size": str(h.hidden_size),
        "original_size": str(h.original_size),
        "segments": json.dumps([m.index for m in segments]),
    }
    for m in segments:
        key = f"segment.{m.index}"
        metadata.update({f"{key}.prefix": json.dumps(list(m.prefix)),
                         f"{key}.token_count": str(m.token_count),
                         f"{key}.byte_start": str(m.byte_start),
                         f"{key}.byte_end": str(m.byte_end)})
    return save({f"segment.{m.index}.vectors": m.vectors for m in segments}, metadata=metadata), len(segments)
