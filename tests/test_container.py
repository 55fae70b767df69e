"""The container alone: layout, strict parsing and zstd segments."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lmzip
from lmzip import container
from lmzip.codec import ZSTD_SEGMENT_BYTES


def zstd_archive(data: bytes) -> bytes:
    return lmzip.encode(data, method="zstd")


def test_magic_and_version_are_pinned():
    assert lmzip.MAGIC == b"\x89LMZ\r\n\x1a\n"
    assert lmzip.FORMAT_VERSION == 3
    blob = zstd_archive(b"abc")
    assert blob[:8] == lmzip.MAGIC
    assert struct.unpack_from("<H", blob, 8) == (3,)


def test_empty_input_is_a_header_and_an_empty_table():
    blob = zstd_archive(b"")
    assert len(blob) == container.MIN_HEADER_SIZE + 4  # and the table's checksum
    assert lmzip.decode(blob) == b""
    assert lmzip.inspect(blob)["segments"] == []


def test_str_is_encoded_as_utf8():
    assert lmzip.decode(lmzip.encode("naïve ☃", method="zstd")) == "naïve ☃".encode()


def test_rejects_other_types():
    with pytest.raises(lmzip.InputError, match="bytes or str"):
        lmzip.encode(12, method="zstd")


def test_large_input_is_split_into_bounded_zstd_segments():
    data = bytes(range(256)) * (ZSTD_SEGMENT_BYTES // 256 * 2 + 3)
    blob = zstd_archive(data)
    sizes = [s["original_length"] for s in lmzip.inspect(blob)["segments"]]
    assert sizes == [ZSTD_SEGMENT_BYTES, ZSTD_SEGMENT_BYTES, 768]
    assert lmzip.decode(blob) == data


@given(st.binary(max_size=4096))
def test_round_trip_bytes(data):
    assert lmzip.decode(zstd_archive(data)) == data


@given(st.text(max_size=2000))
def test_round_trip_text(text):
    data = text.encode("utf-8", errors="surrogatepass")
    assert lmzip.decode(zstd_archive(data)) == data


def test_round_trip_awkward_text():
    for text in ["", "\x00", "a\r\nb\rc\n", "\ufeffBOM", "emoji 😀👩‍👩‍👧", "שלום עולם", "e\u0301"]:
        data = text.encode()
        assert lmzip.decode(zstd_archive(data)) == data
    assert lmzip.decode(zstd_archive(b"\xff\xfe\x80invalid")) == b"\xff\xfe\x80invalid"


def decode_or_error(blob: bytes, original: bytes) -> None:
    """The one acceptable outcome of decoding damaged data: the original, or an LmzError."""
    try:
        out = lmzip.decode(blob)
    except lmzip.LmzError:
        return
    assert out == original


@given(st.binary(min_size=1, max_size=300), st.data())
def test_bit_flips_never_give_other_bytes(data, draw):
    blob = bytearray(zstd_archive(data))
    position = draw.draw(st.integers(0, len(blob) * 8 - 1))
    blob[position // 8] ^= 1 << (position % 8)
    decode_or_error(bytes(blob), data)


@given(st.binary(max_size=300), st.data())
def test_truncation_and_extension(data, draw):
    blob = zstd_archive(data)
    cut = draw.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(lmzip.LmzError):
        lmzip.decode(blob[:cut])
    extra = draw.draw(st.binary(min_size=1, max_size=16))
    with pytest.raises(lmzip.TrailingDataError):
        lmzip.decode(blob + extra)


def test_a_skippable_frame_is_not_a_zstd_segment():
    from archive_edit import edit_entry, table_span

    skippable = b"\x50\x2a\x4d\x18\x03\x00\x00\x00xyz"
    start, end = table_span(zstd_archive(b"x"))
    blob = zstd_archive(b"x")[: end + 4] + skippable
    blob = edit_entry(blob, 0, payload_length=len(skippable), original_length=0)
    blob = blob[:16] + b"\0" * 8 + blob[24:]  # original size 0, header checksum now stale
    from archive_edit import edit_header

    blob = edit_header(blob, original_size=0)
    with pytest.raises(lmzip.LmzError):
        lmzip.decode(blob)


def test_header_without_a_model_must_have_zero_model_fields():
    from archive_edit import edit_header

    with pytest.raises(lmzip.HeaderError, match="no model is named"):
        lmzip.decode(edit_header(zstd_archive(b"abc"), hidden_size=576))


def test_errors_name_the_problem():
    blob = zstd_archive(b"hello world")
    with pytest.raises(lmzip.NotLmzError, match="not an lmzip archive"):
        lmzip.decode(b"PK\x03\x04" + blob[4:])
    with pytest.raises(lmzip.TruncatedError, match="truncated"):
        lmzip.decode(blob[:20])
    with pytest.raises(lmzip.TrailingDataError, match="trailing data"):
        lmzip.decode(blob + b"\0")
    damaged = bytearray(blob)
    damaged[30] ^= 1
    with pytest.raises(lmzip.HeaderError, match="header checksum"):
        lmzip.decode(bytes(damaged))
    damaged = bytearray(blob)
    damaged[-1] ^= 0x40
    with pytest.raises(lmzip.SegmentError, match="damaged segment 0"):
        lmzip.decode(bytes(damaged))
