"""Exact (machine-independent) arithmetic for coding tokens under the language model.

    exact = ExactModel.from_loaded(lm)          # quantize once (from_loaded(lm, 3): arithmetic /3)
    payloads = encode_chunks(exact, chunks, prefix)
    chunks = decode_chunks(exact, payloads, token_counts, prefix, batch_size=64)
    failed = check_chunks(exact, chunks, payloads, prefix)  # the chunks that do not decode back

SPEC.md ("lm payloads") specifies the arithmetic and the payload format.
"""

from .coding import check_chunks, decode_chunks, encode_chunks
from .model import MAX_POSITIONS, V1_POSITIONS, VERSIONS, ExactModel

__all__ = ["MAX_POSITIONS", "V1_POSITIONS", "VERSIONS", "ExactModel", "check_chunks", "decode_chunks",
           "encode_chunks"]
