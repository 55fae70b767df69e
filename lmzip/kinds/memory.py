"""Segment kind 1, memory: K fp16 vectors from which the model regenerates the segment's tokens.

The decoder feeds the header's prefix tokens, then the vectors, and decodes greedily in
float32 (`generate`); the encoder stored the vectors only after that same decoding gave
exactly the segment's tokens with the margin guard (SPEC.md, "Decoding a memory segment").
"""

from __future__ import annotations

import numpy as np

from ..errors import DeviceMemoryError, SegmentError
from ..limits import MAX_TOKENS_PER_SEGMENT, MAX_VECTORS_PER_SEGMENT

KIND = 1
NAME = "memory"
NEEDS_MODEL = True


def check_entry(entry, header) -> str | None:
    if not header.has_model:
        return "a memory segment in an archive that names no model"
    if not 1 <= entry.vector_count <= MAX_VECTORS_PER_SEGMENT:
        return f"vector count {entry.vector_count} is outside [1, {MAX_VECTORS_PER_SEGMENT}]"
    if not 1 <= entry.token_count <= min(MAX_TOKENS_PER_SEGMENT, entry.original_length):
        return (f"token count {entry.token_count} is outside [1, {MAX_TOKENS_PER_SEGMENT}] "
                "or more than the segment's bytes")
    if entry.payload_length != entry.vector_count * header.hidden_size * 2:
        return (f"payload of {entry.payload_length} bytes does not hold {entry.vector_count} fp16 vectors "
                f"of size {header.hidden_size}")
    return None


def work(entry) -> int:
    return entry.token_count


def vectors_payload(vectors16) -> bytes:
    """(K, H) fp16 vectors as the payload's little-endian binary16 values; non-finite ones refused."""
    import torch  # here, not above: reading an archive's table needs no torch

    array = np.asarray(vectors16.cpu() if isinstance(vectors16, torch.Tensor) else vectors16, dtype="<f2")
    if not np.isfinite(array).all():
        raise ValueError("memory vectors must be finite")
    return array.tobytes()


def read_vectors(payload, vector_count: int) -> np.ndarray:
    """The payload as a (K, H) float16 array; ValueError if a value is not finite."""
    array = np.frombuffer(payload, dtype="<f2").reshape(vector_count, -1)
    if not np.isfinite(array).all():
        raise ValueError("a memory vector holds an infinite or NaN value")
    return array


def check_payload(payload, entry) -> str | None:
    """What is wrong with a payload that its CRC does not catch (no model needed): non-finite
    values, which the encoder never writes (SPEC.md)."""
    try:
        read_vectors(payload, entry.vector_count)
    except ValueError as e:
        return str(e)
    return None


def encode(data: bytes, ids, vectors16, **stats):
    from . import CodedSegment

    return CodedSegment(KIND, data, vectors_payload(vectors16), token_count=len(ids),
                        vector_count=int(vectors16.shape[0]), stats=stats)


def max_positions(lm) -> int:
    """How many input positions the model can take (prefix, vectors and generated tokens)."""
    return getattr(lm.model.config, "max_position_embeddings", None) or (1 << 30)


def _positions_problem(lm, prefix, entry) -> str | None:
    if len(prefix) + entry.vector_count + entry.token_count > max_positions(lm):
        return (f"{len(prefix)} prefix tokens, {entry.vector_count} vectors and "
                f"{entry.token_count} tokens exceed the model's positions")
    return None


def token_ids(jobs, ctx) -> list[list[int]]:
    """Greedy decoding of each job's vectors, as the encoder verified it, `ctx.batch_size` at a time
    (batching changes float32 rounding, never a token that led by the margin: SPEC.md)."""
    import torch

    lm, prefix = ctx.model, ctx.header.prefix
    inputs = []
    for job in jobs:
        problem = _positions_problem(lm, prefix, job.entry)
        if problem:
            raise SegmentError(job.index, problem)
        try:
            vectors = read_vectors(job.payload, job.entry.vector_count)
        except ValueError as e:
            raise SegmentError(job.index, str(e)) from None
        inputs.append((torch.from_numpy(vectors.astype(np.float32)), job.entry.token_count))
    # the rows that fit on the device, for the next window too (lm kinds keep ctx.batch_size)
    decoded, ctx.memory_rows = decode_within_memory(lm, inputs, prefix, ctx.memory_rows or ctx.batch_size,
                                                    ctx.threads)
    return [d.ids for d in decoded]


def decode_within_memory(lm, inputs, prefix, batch_size: int, threads: int):
    """greedy_decode_sharded and the batch size it ran at: again with half the rows each time the
    device runs out of memory (any batch gives the same tokens), so that the caller starts its
    next segments there; DeviceMemoryError if one row at a time does not fit."""
    import torch

    from .. import batch_decode

    # halve from the rows a batch really takes: the cache budget may already cut the size asked for
    batch_size = batch_decode.rows_within(batch_decode.CACHE_BUDGET, lm, inputs, prefix, batch_size)
    while True:
        try:
            return batch_decode.greedy_decode_sharded(lm, inputs, prefix, batch_size, threads), batch_size
        except torch.OutOfMemoryError:
            pass  # handled below, once the exception and the failed batch's frames it holds are gone
        if batch_size == 1:
            other = "decode on the CPU (CUDA_VISIBLE_DEVICES=)" if lm.device.type == "cuda" else "a larger machine"
            raise DeviceMemoryError(f"out of {lm.device} memory decoding one memory segment at a time: "
                                    f"free some memory, or {other}")
        batch_size //= 2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what the failed batch held goes back before the next try


def detokenize(lm, ids) -> bytes:
    text = lm.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    return text.encode("utf-8", errors="surrogatepass")


def checked_length(job, data: bytes) -> bytes:
    """`data`, if it is as long as the job's entry says; else the segment is damaged."""
    if len(data) != job.entry.original_length:
        raise SegmentError(job.index, f"decoded {len(data)} bytes, expected {job.entry.original_length}")
    return data


def to_bytes(jobs, token_lists, lm) -> list[bytes]:
    """Each job's tokens as its original bytes, which must be as long as its entry says."""
    return [checked_length(job, detokenize(lm, ids)) for job, ids in zip(jobs, token_lists)]


def decode(jobs, ctx) -> list[bytes]:
    return to_bytes(jobs, token_ids(jobs, ctx), ctx.model)
