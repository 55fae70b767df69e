"""The decoder's named limits (SPEC.md, "Limits").

Every size read from an archive is checked against one of these before it is
used, and the writer refuses to write anything the reader would refuse.
"""

MAX_MODEL_ID_BYTES = 1024
MAX_REVISION_BYTES = 128
MAX_PREFIX_TOKENS = 64
# A header of any version, the unknown ones too: a larger header_size is damage, not a newer format.
MAX_ANY_HEADER_SIZE = 1 << 16
# Bytes a v3 header may carry past the fields this version defines, when a compatible flag says so.
MAX_HEADER_EXTENSION = 4096
MAX_SEGMENTS = 1 << 24
MAX_SEGMENT_BYTES = 1 << 20
MAX_ORIGINAL_SIZE = 1 << 40
MAX_TOKENS_PER_SEGMENT = 8192
# Positions (prefix + chunk) of an lm segment: kind 2 (arithmetic /1) and kind 3 (/2).
LM_POSITIONS = 2048
LM_LONG_POSITIONS = 8192
MAX_VECTORS_PER_SEGMENT = 1024
MAX_HIDDEN_SIZE = 16384
# A zstd frame is never much larger than its content (ZSTD_compressBound).
MAX_ZSTD_PAYLOAD = MAX_SEGMENT_BYTES + (MAX_SEGMENT_BYTES >> 8) + 1024
# Default bound on the model work of decoding one archive, in generated tokens (SPEC.md, "Work").
DEFAULT_WORK_LIMIT = 1 << 26
