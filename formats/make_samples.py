"""Write the sample archives of formats/ (run from the repository root).

    python formats/make_samples.py

Good samples come from the real encoder (memory-coded ones with the tiny test
model); bad and unsupported ones are good ones edited field by field, with the
header or table checksum recomputed where the damage must get past it. Every
sample's outcome is checked here before it is written, and again by
tests/test_formats.py against the table in formats/README.md.

Samples of older format versions (`*-v1.lmz`) were written by the lmzip that
wrote that version; they are kept as they are, not rebuilt, and still checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tests"))

import lmzip  # noqa: E402
from archive_edit import edit_entry, edit_header, flip, payload_offset  # noqa: E402
from lmzip.container import MIN_HEADER_SIZE  # noqa: E402

OUT = ROOT / "formats"
TINY = "tests/data/tiny-llama"  # relative, so the archive names a path that works from the root
TEXT = "Hello, lmzip!\r\nA short text,\nwith CRLF and LF, emoji 😀 and a NUL \x00 too.\n"
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

    samples = {
        "good-empty.lmz": (lmzip.encode(b"", method="zstd"), b""),
        "good-zstd-text.lmz": (zstd_text, text),
        "good-zstd-binary.lmz": (lmzip.encode(binary, method="zstd"), binary),
        "good-memory-tiny.lmz": (memory, mixed),
        "bad-magic.lmz": (b"\x89LMX" + zstd_text[4:], lmzip.NotLmzError),
        "bad-truncated-header.lmz": (zstd_text[:60], lmzip.TruncatedError),
        "bad-truncated-payload.lmz": (zstd_text[:-3], lmzip.TruncatedError),
        "bad-trailing-data.lmz": (zstd_text + b"\0\0\0\0", lmzip.TrailingDataError),
        "bad-header-bit-flip.lmz": (flip(zstd_text, 20), lmzip.HeaderError),
        "bad-header-size.lmz": (edit_header(zstd_text, header_size=1 << 30), lmzip.HeaderError),
        "bad-reserved-header-flags.lmz": (edit_header(zstd_text, flags=0x8000), lmzip.HeaderError),
        "bad-content-checksum.lmz": (edit_header(zstd_text, content_sha256=bytes(32)),
                                     lmzip.ContentChecksumError),
        "bad-absurd-segment-count.lmz": (edit_header(zstd_text, segment_count=0xFFFFFFFF), lmzip.LimitError),
        "bad-absurd-original-size.lmz": (edit_header(zstd_text, original_size=1 << 62), lmzip.LimitError),
        "bad-table-bit-flip.lmz": (flip(zstd_text, MIN_HEADER_SIZE + 4), lmzip.SegmentTableError),
        "bad-reserved-segment-flags.lmz": (edit_entry(zstd_text, 0, flags=1), lmzip.SegmentTableError),
        "bad-unknown-segment-kind.lmz": (edit_entry(zstd_text, 0, kind=7), lmzip.SegmentTableError),
        "bad-absurd-segment-length.lmz": (edit_entry(zstd_text, 0, original_length=0xFFFFFFFF),
                                          lmzip.SegmentTableError),
        "bad-sizes-disagree.lmz": (edit_entry(zstd_text, 0, original_length=len(text) - 1),
                                   lmzip.SegmentTableError),
        "bad-offset-out-of-range.lmz": (edit_entry(zstd_text, 0, payload_offset=1 << 40),
                                        lmzip.SegmentTableError),
        "bad-offsets-overlap.lmz": (edit_entry(memory, 1, payload_offset=payload_offset(memory, 0) + 1),
                                    lmzip.SegmentTableError),
        "bad-payload-bit-flip.lmz": (flip(zstd_text, end - 5), lmzip.SegmentError),
        "bad-segment-checksum.lmz": (edit_entry(zstd_text, 0, crc32=0), lmzip.SegmentError),
        "bad-memory-vector.lmz": (flip(memory, payload_offset(memory, first_memory) + 1, 0x7C),
                                  lmzip.SegmentError),
        "bad-absurd-token-count.lmz": (edit_entry(memory, first_memory, token_count=1 << 30),
                                       lmzip.SegmentTableError),
        "bad-wrong-weights.lmz": (edit_header(memory, weights_sha256=b"\x01" * 32), lmzip.ModelMismatchError),
        "bad-absurd-prefix.lmz": (edit_header(memory, prefix_length=0xFFFF), lmzip.LimitError),
        "unsupported-version-3.lmz": (edit_header(zstd_text, version=3), lmzip.UnsupportedVersionError),
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
    old = (OUT / "good-memory-tiny-v1.lmz").read_bytes()
    assert old[8] == 1 and codec.decode(old, model=TINY) == (OUT / "good-memory-tiny-v1.out").read_bytes()


if __name__ == "__main__":
    main()
