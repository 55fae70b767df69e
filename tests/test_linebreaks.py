"""Line breaks as the model reads them (lmzip/linebreaks.py, kind 8): CRLF as LF, soft breaks as
spaces, and the break stream that restores them."""

import random
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmzip import linebreaks
from lmzip.errors import InternalError
from lmzip.linebreaks import CRLF, UNWRAP

WORDS = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
         "nothing to do: once or twice she had peeped into the book her sister was reading, but it had "
         "no pictures or conversations in it, 'and what is the use of a book,' thought Alice").split()
PROSE = "\n\n".join(textwrap.fill(" ".join(WORDS[i:] + WORDS[:i]), 64) for i in range(40)) + "\n"

texts = st.lists(st.text(alphabet="ab é\n\r\t", max_size=40), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(texts, st.sampled_from([0, CRLF, UNWRAP, CRLF | UNWRAP]))
def test_any_texts_restore_under_the_flags_they_allow(chunks, flags):
    if flags & CRLF and not all(map(linebreaks.crlf_only, chunks)):
        flags &= ~CRLF
    joined = linebreaks.join(chunks, flags)
    assert linebreaks.restore(joined.texts, flags, joined.stream) == chunks
    assert joined.texts == [linebreaks.coded(c, flags) for c in chunks]
    assert [len(c) - c.count("\r") * bool(flags & CRLF) for c in chunks] == list(map(len, joined.texts))


def test_a_wrapped_text_is_coded_as_paragraphs_and_its_breaks_cost_little():
    joined = linebreaks.join([PROSE], UNWRAP)
    assert joined.texts[0].count("\n") == 2 * PROSE.count("\n\n") + 1  # the paragraph breaks only
    assert joined.breaks == PROSE.count("\n") - joined.texts[0].count("\n") > 100
    # textwrap fills greedily: the line length with the next word tells each break once its context
    # has seen a few
    assert 8 * len(joined.stream) < 0.6 * joined.breaks
    assert linebreaks.choose(PROSE) == UNWRAP
    assert linebreaks.choose(PROSE.replace("\n", "\r\n")) == CRLF | UNWRAP


def test_texts_that_do_not_pay_keep_their_breaks():
    assert linebreaks.choose(" ".join(WORDS) * 20) == 0            # no line breaks
    assert linebreaks.choose("line one\r\nline two\n") == 0        # a lone \n: not all CRLF
    rng = random.Random(0)
    lines = [" ".join(rng.sample(WORDS, rng.randrange(1, 6))) for _ in range(200)]
    assert linebreaks.choose("\r\n".join(lines)) == CRLF           # lines whose lengths do not tell their ends
    assert linebreaks.choose("\n".join(WORDS[:10])) == 0           # too few soft breaks


def test_a_cut_before_a_coded_crlf_cuts_before_its_cr():
    coded, offsets = linebreaks.coded_offsets("ab\r\ncd\r\n", CRLF)
    assert coded == "ab\ncd\n" and offsets == [0, 1, 2, 4, 5, 6, 8]


def test_the_chunks_share_one_stream_in_order():
    chunks = [PROSE[:700], PROSE[700:]]
    joined = linebreaks.join(chunks, UNWRAP)
    assert linebreaks.restore(joined.texts, UNWRAP, joined.stream) == chunks
    assert linebreaks.restore(joined.texts[::-1], UNWRAP, joined.stream) != chunks[::-1]


@pytest.mark.parametrize("flags,stream,texts,problem", [
    (4, b"", ["a"], "unknown line flags"),
    (CRLF, b"\x01", ["a"], "without the unwrap flag"),
    (CRLF, b"", ["a\rb"], r"a \\r in a text"),
])
def test_restore_refuses_what_no_writer_makes(flags, stream, texts, problem):
    with pytest.raises(ValueError, match=problem):
        linebreaks.restore(texts, flags, stream)


def test_a_damaged_stream_is_an_error_or_other_text():
    joined = linebreaks.join([PROSE], UNWRAP)
    for cut in (joined.stream[:-1], joined.stream + b"\x00", joined.stream + b"\x01"):
        try:
            restored = linebreaks.restore(joined.texts, UNWRAP, cut)
        except ValueError:
            continue
        assert restored != [PROSE]  # the segment's crc32 then refuses it


def test_the_writer_checks_its_join_with_the_readers_restore(monkeypatch):
    monkeypatch.setattr(linebreaks, "restore", lambda texts, flags, stream: [t.upper() for t in texts])
    with pytest.raises(InternalError, match="do not restore"):
        linebreaks.join([PROSE], UNWRAP)
    assert linebreaks.choose(PROSE) == UNWRAP  # the writer's choice keeps only the stream's length


def test_the_writer_refuses_crlf_flags_for_a_lone_newline():
    with pytest.raises(InternalError):
        linebreaks.join(["a\nb\r\n"], CRLF)
