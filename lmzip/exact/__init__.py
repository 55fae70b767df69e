"""Exact (machine-independent) arithmetic for coding tokens under the language model.

    exact = ExactModel.from_loaded(lm)          # quantize once
    payloads = encode_chunks(exact, chunks, prefix)
    chunks = decode_chunks(exact, payloads, token_counts, prefix, batch_size=64)
    failed = check_chunks(exact, chunks, payloads, prefix)  # the chunks that do not decode back

SPEC.md ("lm payloads") specifies the arithmetic and the payload format.
"""

from .coding import check_chunks, decode_chunks, encode_chunks
from .model import ARITHMETIC_VERSION, MAX_POSITIONS, V1_POSITIONS, ExactModel

__all__ = ["ARITHMETIC_VERSION", "MAX_POSITIONS", "V1_POSITIONS", "ExactModel", "check_chunks", "decode_chunks",
           "encode_chunks"]
