"""Write the sample archives of formats/ (run from the repository root).

    python formats/make_samples.py

Good samples come from the real encoder (memory-coded ones with the tiny test
model); bad and unsupported ones are good ones edited field by field, with the
header or table checksum recomputed where the damage must get past it. Every
sample's outcome is checked here before it is written, and again by
tests/test_formats.py against the table in formats/README.md.

Samples of older format versions (`*-v1.lmz`, `*-v2.lmz`) were written by the
lmzip that wrote that version; they are kept as they are, not rebuilt, and
still checked.
"""

from __future__ import annotations

import struct
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tests"))

import lmzip  # noqa: E402
from archive_edit import (edit_entry, edit_header, entries, flip, header_value,  # noqa: E402
                          payload_offset)
from lmzip.container import MIN_HEADER_SIZE, crc32  # noqa: E402

OUT = ROOT / "formats"
TINY = "tests/data/tiny-llama"  # relative, so the archive names a path that works from the root
WRAP_TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
             "nothing to do: once or twice she had peeped into the book her sister was reading. ")
TEXT = "Hello, lmzip!\r\nA short text,\nwith CRLF and LF, emoji 😀 and a NUL \x00 too.\n"
def payload_crc(blob: bytes, index: int) -> bytes:
    """Recompute a segment's payload CRC-32 after its payload was edited (so the damage gets past it)."""
    e = entries(blob)[index]
    return edit_entry(blob, index, payload_crc32=crc32(blob[e["payload_offset"]: e["payload_offset"]
                                                           + e["payload_length"]]))


def negate_vector(blob: bytes, index: int) -> bytes:
    """Flip the sign of every value of a memory segment's first vector (still finite fp16)."""
    at, hidden = payload_offset(blob, index), header_value(blob, "hidden_size")
    out = bytearray(blob)
    for i in range(hidden):
        out[at + 2 * i + 1] ^= 0x80
    return payload_crc(bytes(out), index)


def infinite_value(blob: bytes, index: int) -> bytes:
    out = bytearray(blob)
    out[payload_offset(blob, index): payload_offset(blob, index) + 2] = b"\x00\x7c"  # +inf in binary16
    return payload_crc(bytes(out), index)


def more_tokens_in_first_chunk(blob: bytes, index: int) -> bytes:
    """An lm-packed segment's chunk table claiming one token more for its first chunk (a one-byte varint)."""
    out = bytearray(blob)
    at = payload_offset(blob, index) + 1  # after the chunk count
    assert out[at] < 0x7F
    out[at] += 1
    return bytes(out)


def longer_header(blob: bytes, version: int, extra: int, **changes) -> bytes:
    """The header grown by `extra` bytes before its checksum (as a newer writer might), offsets moved."""
    if changes:
        blob = edit_header(blob, **changes)
    for i, e in enumerate(entries(blob)):
        blob = edit_entry(blob, i, payload_offset=e["payload_offset"] + extra)
    size = struct.unpack_from("<I", blob, 12)[0]
    body = bytearray(blob[: size - 4]) + bytes(range(256)) * (extra // 256) + bytes(extra % 256)
    struct.pack_into("<HHI", body, 8, version, struct.unpack_from("<H", blob, 10)[0], size + extra)
    return bytes(body) + struct.pack("<I", crc32(body)) + blob[size:]


def main() -> None:
    codec = lmzip.Codec(model=TINY, device="cpu")
    text = TEXT.encode()
    binary = bytes(range(256)) * 4
    mixed = text + b"\xff\xfe invalid UTF-8 \xc3 here\n" + text
    zstd_text = lmzip.encode(text, method="zstd")
    memory = codec.encode(mixed, model=TINY, tokens_per_segment=8, vectors=1, max_vectors=1,
                          max_steps=300, lr=0.1, margin=0.5, hinge=1.0, bf16=False)
    kinds = [s["kind"] for s in lmzip.inspect(memory)["segments"]]
    assert "memory" in kinds and "zstd" in kinds, kinds
    first_memory = kinds.index("memory")
    end = len(zstd_text)
    # The lm kind's frequencies are the same on every machine, so this file is a check of the arithmetic.
    lm_coded = codec.encode(mixed, method="lm", model=TINY, tokens_per_segment=16, pack_lm=False, lm_arithmetic=2)
    first_lm = [s["kind"] for s in lmzip.inspect(lm_coded)["segments"]].index("lm")
    lm_packed = codec.encode(mixed, method="lm", model=TINY, tokens_per_segment=16,
                             lm_arithmetic=2)  # runs of chunks: kind 4
    first_packed = [s["kind"] for s in lmzip.inspect(lm_packed)["segments"]].index("lm-packed")
    long_text = text * 32  # past 2048 positions: one lm-long segment (arithmetic /2)
    lm_long = codec.encode(long_text, method="lm", model=TINY, tokens_per_segment=8191, lm_arithmetic=2)
    assert [s["kind"] for s in lmzip.inspect(lm_long)["segments"]] == ["lm-long"]
    # arithmetic /3 (kind 5): short chunks, and one past 2048
    lm3 = codec.encode(mixed, method="lm", model=TINY, tokens_per_segment=16, lm_mix=False)
    assert [s["kind"] for s in lmzip.inspect(lm3)["segments"]] == ["lm3", "zstd"] * 2 + ["lm3"]
    lm3_long = codec.encode(long_text, method="lm", model=TINY, tokens_per_segment=8191, lm_mix=False)
    assert [s["kind"] for s in lmzip.inspect(lm3_long)["segments"]] == ["lm3"]
    # kind 6: chunks sharing counts, groups of at most 16
    lm3_group = codec.encode(text * 4, method="lm", model=TINY, tokens_per_segment=16, lm_head=0)
    assert [s["kind"] for s in lmzip.inspect(lm3_group)["segments"]] == ["lm3-group"] * 2
    # kind 7 (what compress --method lm writes now): kind 6's groups, each chunk but the first after its head
    lm3_head = codec.encode(text * 4, method="lm", model=TINY, tokens_per_segment=16)
    assert [s["kind"] for s in lmzip.inspect(lm3_head)["segments"]] == ["lm3-head"] * 2
    # kind 8 (what compress --method lm writes for CRLF or hard-wrapped text): kind 7 over the text
    # with CRLF as LF and its wrapped lines joined
    wrapped = "\r\n\r\n".join(textwrap.fill(WRAP_TEXT * 3, 30).replace("\n", "\r\n") for _ in range(4)).encode()
    lm3_text = codec.encode(wrapped, method="lm", model=TINY, tokens_per_segment=40)
    assert {s["kind"] for s in lmzip.inspect(lm3_text)["segments"]} == {"lm3-text"}

    samples = {
        "good-empty.lmz": (lmzip.encode(b"", method="zstd"), b""),
        "good-zstd-text.lmz": (zstd_text, text),
        "good-zstd-binary.lmz": (lmzip.encode(binary, method="zstd"), binary),
        "good-memory-tiny.lmz": (memory, mixed),
        "good-lm-tiny.lmz": (lm_coded, mixed),
        "good-lm-long-tiny.lmz": (lm_long, long_text),
        "good-lm-packed-tiny.lmz": (lm_packed, mixed),
        "good-lm3-tiny.lmz": (lm3, mixed),
        "good-lm3-long-tiny.lmz": (lm3_long, long_text),
        "good-lm3-group-tiny.lmz": (lm3_group, text * 4),
        "good-lm3-head-tiny.lmz": (lm3_head, text * 4),
        "good-lm3-text-tiny.lmz": (lm3_text, wrapped),
        "good-compatible-header-extension.lmz": (longer_header(zstd_text, 3, 40, compatible_flags=0x8000), text),
        "good-compatible-segment-flag.lmz": (edit_entry(zstd_text, 0, flags=0x80), text),
        "bad-magic.lmz": (b"\x89LMX" + zstd_text[4:], lmzip.NotLmzError),
        "bad-truncated-header.lmz": (zstd_text[:60], lmzip.TruncatedError),
        "bad-truncated-payload.lmz": (zstd_text[:-3], lmzip.TruncatedError),
        "bad-trailing-data.lmz": (zstd_text + b"\0\0\0\0", lmzip.TrailingDataError),
        "bad-header-bit-flip.lmz": (flip(zstd_text, 20), lmzip.HeaderError),
        "bad-header-size.lmz": (edit_header(zstd_text, header_size=1 << 30), lmzip.HeaderError),
        "bad-header-extension-unflagged.lmz": (longer_header(zstd_text, 3, 40), lmzip.HeaderError),
        "bad-model-source.lmz": (edit_header(memory, model_source=9), lmzip.HeaderError),
        "bad-model-source-none.lmz": (edit_header(memory, model_source=0), lmzip.HeaderError),
        "bad-content-checksum.lmz": (edit_header(zstd_text, content_sha256=bytes(32)),
                                     lmzip.ContentChecksumError),
        "bad-absurd-segment-count.lmz": (edit_header(zstd_text, segment_count=0xFFFFFFFF), lmzip.LimitError),
        "bad-absurd-original-size.lmz": (edit_header(zstd_text, original_size=1 << 62), lmzip.LimitError),
        # the entry's crc32 field: only the table checksum tells this from a damaged segment
        "bad-table-bit-flip.lmz": (flip(zstd_text, MIN_HEADER_SIZE + 24), lmzip.SegmentTableError),
        "bad-absurd-segment-length.lmz": (edit_entry(zstd_text, 0, original_length=0xFFFFFFFF),
                                          lmzip.SegmentTableError),
        "bad-sizes-disagree.lmz": (edit_entry(zstd_text, 0, original_length=len(text) - 1),
                                   lmzip.SegmentTableError),
        "bad-offset-out-of-range.lmz": (edit_entry(zstd_text, 0, payload_offset=1 << 40),
                                        lmzip.SegmentTableError),
        "bad-offsets-overlap.lmz": (edit_entry(memory, 1, payload_offset=payload_offset(memory, 0) + 1),
                                    lmzip.SegmentTableError),
        "bad-payload-bit-flip.lmz": (flip(zstd_text, end - 5), lmzip.SegmentError),
        "bad-payload-checksum.lmz": (edit_entry(memory, first_memory, payload_crc32=0), lmzip.SegmentError),
        "bad-zstd-payload.lmz": (payload_crc(flip(zstd_text, end - 5), 0), lmzip.SegmentError),
        "bad-segment-checksum.lmz": (edit_entry(zstd_text, 0, crc32=0), lmzip.SegmentError),
        "bad-memory-vector.lmz": (negate_vector(memory, first_memory), lmzip.SegmentError),
        "bad-infinite-vector.lmz": (infinite_value(memory, first_memory), lmzip.SegmentError),
        "bad-absurd-token-count.lmz": (edit_entry(memory, first_memory, token_count=1 << 30),
                                       lmzip.SegmentTableError),
        "bad-wrong-weights.lmz": (edit_header(memory, weights_sha256=b"\x01" * 32), lmzip.ModelMismatchError),
        "bad-wrong-tokenizer.lmz": (edit_header(memory, tokenizer_sha256=b"\x01" * 32),
                                    lmzip.ModelMismatchError),
        "bad-lm-payload.lmz": (payload_crc(flip(lm_coded, payload_offset(lm_coded, first_lm) + 2, 0x10), first_lm),
                               lmzip.SegmentError),
        "bad-lm-packed-table.lmz": (payload_crc(more_tokens_in_first_chunk(lm_packed, first_packed), first_packed),
                                    lmzip.SegmentError),
        "bad-lm3-payload.lmz": (payload_crc(flip(lm3, payload_offset(lm3, 1) - 3, 0x10), 0), lmzip.SegmentError),
        "bad-lm3-group-as-lm3.lmz": (edit_entry(lm3_group, 0, kind=5), lmzip.SegmentError),
        "bad-lm3-head-as-lm3-group.lmz": (edit_entry(lm3_head, 0, kind=6), lmzip.SegmentError),
        "bad-lm3-text-as-lm3-head.lmz": (edit_entry(lm3_text, 0, kind=7), lmzip.SegmentError),
        "bad-absurd-prefix.lmz": (edit_header(memory, prefix_length=0xFFFF), lmzip.LimitError),
        "unsupported-version-4.lmz": (longer_header(zstd_text, 4, 2000), lmzip.UnsupportedVersionError),
        "unsupported-incompatible-flag.lmz": (edit_header(zstd_text, incompatible_flags=0x0001),
                                              lmzip.UnsupportedError),
        "unsupported-segment-kind.lmz": (edit_entry(zstd_text, 0, kind=255), lmzip.UnsupportedKindError),
        "unsupported-segment-flag.lmz": (edit_entry(zstd_text, 0, flags=0x01), lmzip.UnsupportedError),
    }
    for name, (blob, expected) in samples.items():
        try:
            got = codec.decode(blob, model=TINY)
        except lmzip.LmzError as e:
            assert isinstance(expected, type) and isinstance(e, expected), (name, e)
        else:
            assert got == expected, name
        (OUT / name).write_bytes(blob)
        if isinstance(expected, bytes):
            (OUT / (name[:-4] + ".out")).write_bytes(expected)
        print(name)
    for old in OUT.glob("good-*-v[12].lmz"):  # kept as their lmzip wrote them
        blob = old.read_bytes()
        assert blob[8] in (1, 2) and codec.decode(blob, model=TINY) == old.with_suffix(".out").read_bytes(), old


if __name__ == "__main__":
    main()
