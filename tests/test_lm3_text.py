"""Kind 8, lm3-text: kind 7's groups over text with CRLF coded as LF and wrapped lines joined
(SPEC.md, "lm3-text payloads (kind 8)")."""

import hashlib
import textwrap
import zlib

import pytest

import lmzip
from lmzip import linebreaks
from lmzip.errors import OptionError
from lmzip.kinds import lm3_head, lm3_text, lm_packed

from archive_edit import edit_entry, entries, flip, kinds
from conftest import TINY_MODEL

PARAGRAPH = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
             "nothing to do: once or twice she had peeped into the book her sister was reading. ")
WRAPPED = "\n\n".join(textwrap.fill(PARAGRAPH * 3, 30) for _ in range(4)).replace("\n", "\r\n").encode()
# WRAPPED's archive in 40-token chunks: pinned, as the format (the coded text, the stream) must not move.
TEXT_ARCHIVE_SHA256 = "eb6e8fabf6eb5d27d0f75d7bcc934669a5072dd1cfe751e2cf70ef126885580e"


def lines_of(blob):
    """(flags, break stream, head) of each segment of an archive of kind 8 segments."""
    info = lmzip.container.parse(blob)
    return [lm3_text.unpack(bytes(info.payload(i)), s.token_count, info.header.prefix)[:3]
            for i, s in enumerate(info.segments)]


def test_a_wrapped_crlf_text_is_kind_8_and_comes_back(codec):
    blob = codec.encode(WRAPPED, method="lm", model=TINY_MODEL, tokens_per_segment=40)
    assert set(kinds(blob)) == {"lm3-text"}
    flags, stream, head = lines_of(blob)[0]
    assert flags == linebreaks.CRLF | linebreaks.UNWRAP and stream and head == 40
    for batch_size in (1, 3, 64):
        assert codec.decode(blob, model=TINY_MODEL, batch_size=batch_size) == WRAPPED


def test_the_coded_text_has_fewer_tokens_and_the_archive_is_smaller(codec):
    options = dict(method="lm", model=TINY_MODEL, tokens_per_segment=40)
    lines = codec.encode_to(WRAPPED, open("/dev/null", "wb"), **options)
    kept = codec.encode_to(WRAPPED, open("/dev/null", "wb"), lm_lines=False, **options)
    assert lines.memory_tokens < kept.memory_tokens
    assert len(codec.encode(WRAPPED, **options)) < len(codec.encode(WRAPPED, lm_lines=False, **options))


def test_a_text_whose_lines_are_kept_is_kind_7(codec):
    text = PARAGRAPH.encode() * 3
    assert set(kinds(codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=40))) == {"lm3-head"}
    assert set(kinds(codec.encode(WRAPPED, method="lm", model=TINY_MODEL, tokens_per_segment=40,
                                  lm_lines=False))) == {"lm3-head"}


def test_each_group_takes_the_flags_that_change_its_text(codec):
    one_line_paragraphs = "\r\n\r\n".join([PARAGRAPH * 2] * 12)  # CRLF, no soft breaks
    no_breaks = PARAGRAPH * 24
    text = ((WRAPPED * 2).decode() + "\r\n\r\n" + one_line_paragraphs + "\r\n\r\n" + no_breaks).encode()
    blob = codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=40)
    info = lmzip.container.parse(blob)
    flags = [lm3_text.unpack(bytes(info.payload(i)), s.token_count, info.header.prefix)[0]
             if s.kind == lm3_text.KIND else 0 for i, s in enumerate(info.segments)]
    assert flags[0] == 3 and 1 in flags and flags[-1] == 0 and kinds(blob)[-1] == "lm3-head"
    assert codec.decode(blob, model=TINY_MODEL) == text


def test_crlf_alone_and_without_a_head(codec):
    text = "\r\n".join(PARAGRAPH[i:i + 30] for i in range(0, 150, 30)).encode() * 2
    blob = codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=25, lm_head=0)
    assert [f for f, _, _ in lines_of(blob)] == [linebreaks.CRLF] and lines_of(blob)[0][2] == 0
    assert codec.decode(blob, model=TINY_MODEL) == text


def test_chunks_cut_on_the_coded_text_never_split_a_crlf(codec, tiny):
    from lmzip.codec import lm_pieces

    pieces, flags = lm_pieces(tiny, WRAPPED, 7, (0,), linebreaks.CRLF | linebreaks.UNWRAP)
    assert flags == 3 and len(pieces) > 10
    assert b"".join(p.data for p in pieces) == WRAPPED
    assert all(linebreaks.crlf_only(p.data.decode()) for p in pieces)


def test_a_chunk_that_would_pass_its_positions_keeps_the_text_as_it_is(tiny, monkeypatch):
    from lmzip import segmenting
    from lmzip.codec import lm_pieces

    real = segmenting.memory_piece
    longer = lambda tokenizer, text, lines=0: (segmenting.Piece(text.encode(), (5,) * 9000) if lines  # noqa: E731
                                               else real(tokenizer, text))
    monkeypatch.setattr(segmenting, "memory_piece", longer)
    pieces, flags = lm_pieces(tiny, WRAPPED, None, (0,), linebreaks.CRLF | linebreaks.UNWRAP)
    assert flags == 0 and b"".join(p.data for p in pieces) == WRAPPED and max(len(p.ids) for p in pieces) < 9000


def test_coded_text_longer_than_the_segment_is_refused_before_it_is_restored(codec, tiny):
    from dataclasses import replace

    from lmzip.kinds import DecodeContext, DecodeJob

    blob = codec.encode(WRAPPED, method="lm", model=TINY_MODEL, tokens_per_segment=40)
    info = lmzip.container.parse(blob)
    entry = replace(info.segments[0], original_length=info.segments[0].original_length // 2)
    with pytest.raises(lmzip.SegmentError, match="coded text, more than"):
        lm3_text.decode([DecodeJob(0, entry, bytes(info.payload(0)))], DecodeContext(info.header, model=tiny))


def test_the_archive_is_pinned(codec):
    blob = codec.encode(WRAPPED, method="lm", model=TINY_MODEL, tokens_per_segment=40)
    assert hashlib.sha256(blob).hexdigest() == TEXT_ARCHIVE_SHA256


@pytest.mark.parametrize("edit,problem", [
    (lambda p: b"", "no line flags"),
    (lambda p: b"\x00" + p[1:], "line flags 0x0"),
    (lambda p: b"\x07" + p[1:], "line flags 0x7"),
    (lambda p: p[:1] + b"\x7f" + p[2:], "runs past the payload"),
])
def test_a_payload_a_reader_refuses(edit, problem):
    payload = lm3_text.pack(3, b"\x01\x02", 0, [b"", b""], [5, 3])
    assert lm3_text.unpack(payload, 8, [0]) == (3, b"\x01\x02", 0, [b"", b""], [5, 3])
    with pytest.raises(ValueError, match=problem):
        lm3_text.unpack(edit(payload), 8, [0])


def test_a_crlf_only_payload_has_no_stream():
    assert lm3_text.pack(linebreaks.CRLF, b"", 0, [b""], [4])[:2] == b"\x01\x00"  # flags, then kind 7's head


def test_a_segment_with_a_damaged_stream_or_read_as_kind_7_is_an_error(codec):
    blob = codec.encode(WRAPPED, method="lm", model=TINY_MODEL, tokens_per_segment=40)
    with pytest.raises(lmzip.SegmentError):
        codec.decode(edit_entry(blob, 0, kind=7), model=TINY_MODEL)
    # a stream damaged behind a payload checksum that matches: restored to other text of the same
    # length, or refused, but never returned
    entry = entries(blob)[0]
    at = entry["payload_offset"] + 2  # flags, the stream's varint, then its first byte
    damaged = flip(blob, at, 0x40)
    payload = damaged[entry["payload_offset"]:entry["payload_offset"] + entry["payload_length"]]
    with pytest.raises((lmzip.SegmentError, lmzip.ContentChecksumError)):
        codec.decode(edit_entry(damaged, 0, payload_crc32=zlib.crc32(payload)), model=TINY_MODEL)


def test_line_options(codec):
    with pytest.raises(OptionError, match="lm_lines needs lm_mix"):
        codec.encode(WRAPPED, method="lm", model=TINY_MODEL, lm_lines=True, lm_mix=False)
    assert set(kinds(codec.encode(WRAPPED, method="lm", model=TINY_MODEL, tokens_per_segment=40,
                                  lm_mix=False))) == {"lm3"}


def test_a_journal_without_line_flags_is_not_resumed_with_them(codec, tmp_path):
    journal = tmp_path / "j"
    codec.encode(WRAPPED, method="lm", model=TINY_MODEL, tokens_per_segment=40, lm_lines=False, journal=journal)
    with pytest.raises(lmzip.LmzError, match="line"):
        codec.encode(WRAPPED, method="lm", model=TINY_MODEL, tokens_per_segment=40, journal=journal)


def test_an_entry_may_hold_a_stream_as_long_as_its_text():
    header = type("H", (), {"has_model": True, "prefix": (0,)})()
    extra = 1 + 2 * lm_packed.MAX_VARINT_BYTES + 100 + lm3_text.STREAM_SLACK
    entry = type("E", (), {"vector_count": 0, "token_count": 10, "original_length": 100,
                           "payload_length": lm_packed.max_payload(10) + extra})()
    assert lm3_text.check_entry(entry, header) is None
    entry.payload_length += 1
    assert "too long" in lm3_text.check_entry(entry, header)
    assert lm3_head.check_entry(entry, header) is not None
