"""Kind 7, lm3-head: kind 6's groups of chunks, each chunk but the first coded after the first's
head (SPEC.md, "lm3-head payloads (kind 7)")."""

import hashlib

import pytest

import lmzip
from lmzip.errors import OptionError
from lmzip.exact import mixing
from lmzip.exact.coding import check_chunks, decode_chunks, encode_chunks
from lmzip.kinds import lm as lm_kind
from lmzip.kinds import lm3_head, lm_packed
from lmzip.segmenting import Piece

from archive_edit import edit_entry, kinds
from conftest import TINY_MODEL, word_chunks

TEXT = (b"Alice was beginning to get very tired of sitting by her sister on the bank. "
        b"The Rabbit said: oh dear, oh dear, I shall be late. ") * 5
# The archive of TEXT in 12-token chunks: pinned, as the format (which tokens a row is fed) must not move.
HEAD_ARCHIVE_SHA256 = "18b82feba53f80b19ed687e0995f9014a96871cce3dd612c620fcadf23a31ada"


def coded_group(exact3, chunks, groups, most, threads=1):
    pieces = [Piece(b"", c) for c in chunks]
    heads = lm_kind.group_heads(pieces, groups, [0], most)
    contexts = lm_kind.shared_contexts(pieces, groups, heads)
    before = lm_kind.head_tokens(pieces, groups, heads)
    per_chunk = [contexts[i] for i in range(len(chunks))], [before[i] for i in range(len(chunks))]
    return heads, per_chunk, encode_chunks(exact3, chunks, [0], contexts=per_chunk[0], heads=per_chunk[1],
                                           threads=threads)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_groups_with_heads_decode_to_their_chunks_at_any_threads_and_batch(exact3, threads, batch_size):
    chunks = word_chunks((30, 25, 30, 4, 18, 1, 0))
    groups = [[0, 1, 2], [3, 4, 5, 6]]  # the second group's head is its whole first chunk; an empty chunk
    heads, (contexts, before), payloads = coded_group(exact3, chunks, groups, 6, threads)
    assert heads == [6, 4] and before[1] == tuple(chunks[0][:6]) and before[0] == () == before[3]
    counts = [len(c) for c in chunks]
    assert decode_chunks(exact3, payloads, counts, [0], batch_size=batch_size, threads=threads, groups=groups,
                         heads=heads) == chunks
    assert not check_chunks(exact3, chunks, payloads, [0], batch_size=batch_size, threads=threads,
                            contexts=contexts, heads=before)
    try:  # decoded without the heads: the coder cannot follow, or other tokens
        assert decode_chunks(exact3, payloads, counts, [0], groups=groups) != chunks
    except ValueError:
        pass
    # the check feeds each primed row its head: payloads coded without one fail it, those rows only
    headless = encode_chunks(exact3, chunks, [0], contexts=contexts)
    assert check_chunks(exact3, chunks, headless, [0], batch_size=batch_size, contexts=contexts,
                        heads=before) == {1, 2, 4, 5}


def test_a_head_is_the_context_a_chunk_is_coded_after(exact3):
    """Without mixing in the way, a chunk coded after a head is the chunk coded after the prefix and
    the head: the head's tokens are context, not coded."""
    chunks = [[5, 6, 7, 8, 9], [10, 11, 12]]
    plain = encode_chunks(exact3, [chunks[1]], [0, 5, 6, 7])
    assert encode_chunks(exact3, [chunks[1]], [0], heads=[(5, 6, 7)]) == plain
    assert decode_chunks(exact3, encode_chunks(exact3, chunks, [0], heads=[(), (5, 6, 7)]), [5, 3], [0],
                         groups=[[0, 1]], heads=[3]) == chunks


def test_the_head_counts_once_and_is_a_chunks_first_context():
    chunks = [[1, 2, 3, 1, 2], [7, 1, 2]]
    found = list(mixing.group_contexts(chunks, 1, head=2))  # chunk 1 follows the head 1 2: 1 2 | 7 1 2
    assert len(found) == 3 and len(list(mixing.group_contexts(chunks, 0, head=2))) == 5
    # its 7 (after 1 2) and its 1 (after 2 7): no context counted yet; the head's 2 -> 7 counts from
    # the next position on as chunk 1's own first pair, with the head's 2 as its context
    assert found[:2] == [None, None]
    # its 2 after 7 1: "1" was followed by 2 once, the first chunk's (the head's copy is not counted)
    assert found[2] == (1, ((2, 1),), 1)


def test_head_lengths_leave_room_and_none_for_a_lone_chunk():
    assert lm3_head.head_length([0], [100, 50]) == 100
    assert lm3_head.head_length([0], [300, 50]) == lm3_head.HEAD_TOKENS
    assert lm3_head.head_length([0], [8191, 8100]) == 91  # 1 + 91 + 8100 = 8192 positions
    assert lm3_head.head_length([0], [8191, 8191]) == 0
    assert lm3_head.head_length([0], [500]) == 0
    # the steps that feed the head to the other chunks stay within the group's tokens (its work)
    assert lm3_head.head_length([0], [2047, 1, 1, 1], most=2047) == 2050 // 3


def test_the_lm_method_writes_lm3_head_and_it_comes_back(codec):
    blob = codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12)
    assert set(kinds(blob)) == {"lm3-head"}
    for batch_size in (1, 5, 64):
        assert codec.decode(blob, model=TINY_MODEL, batch_size=batch_size) == TEXT
    assert set(kinds(codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_head=0))) \
        == {"lm3-group"}
    info = lmzip.container.parse(blob)
    head, _, counts = lm3_head.unpack(bytes(info.payload(0)), info.segments[0].token_count, info.header.prefix)
    assert head == 12 == counts[0]  # the whole first chunk, under the default's 128


def test_the_archive_is_pinned(codec):
    blob = codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_head=5)
    assert hashlib.sha256(blob).hexdigest() == HEAD_ARCHIVE_SHA256


def test_a_segment_decoded_as_kind_6_is_an_error_not_wrong_bytes(codec):
    blob = codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_head=5)
    with pytest.raises(lmzip.SegmentError):
        codec.decode(edit_entry(blob, 0, kind=6), model=TINY_MODEL)


def test_head_options(codec):
    with pytest.raises(OptionError, match="lm_head needs lm_mix"):
        codec.encode(TEXT, method="lm", model=TINY_MODEL, lm_head=8, lm_mix=False)
    with pytest.raises(OptionError, match="lm_head must be"):
        codec.encode(TEXT, method="lm", model=TINY_MODEL, lm_head=-1)
    assert set(kinds(codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_mix=False))) \
        == {"lm3"}


def test_a_kind_6_journal_is_not_resumed_for_a_kind_7_run(codec, tmp_path):
    journal = tmp_path / "j"
    codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_head=0, journal=journal)
    with pytest.raises(lmzip.LmzError, match=r"head \(kind 7\)"):
        codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, journal=journal)


@pytest.mark.parametrize("head,counts,problem", [
    (6, [5, 3], "does not fit"),             # longer than the first chunk
    (3, [5], "does not fit"),                # a lone chunk has none
    (8000, [8100, 300], "does not fit"),     # the second chunk's positions would pass 8192
    (0, [1] * 17, "17 chunks in one group"),
    (100, [2047] * 16, "16 chunks in one group, more than the 15"),  # 1 + 100 + 2047 = 2148 positions a row
    (2046, [2047] + [1] * 15, "does not fit"),  # 15 x 2046 fed steps for 2,062 tokens of work
])
def test_a_head_or_table_a_reader_refuses(head, counts, problem):
    payload = lm3_head.pack(head, [b""] * len(counts), counts)
    with pytest.raises(ValueError, match=problem):
        lm3_head.unpack(payload, sum(counts), [0])


def test_heads_are_one_per_chunk(exact3):
    with pytest.raises(ValueError, match="one head per chunk"):
        encode_chunks(exact3, [[5], [6]], [0], heads=[()])
    with pytest.raises(ValueError, match="head token is outside"):
        check_chunks(exact3, [[5]], [b""], [0], heads=[(10**6,)])


def test_a_head_that_fits_is_read_back():
    payload = lm3_head.pack(3, [b"", b""], [5, 3])
    assert lm3_head.unpack(payload, 8, [0]) == (3, [b"", b""], [5, 3])


def test_an_entry_may_hold_the_heads_varint():
    header = type("H", (), {"has_model": True, "prefix": (0,)})()
    entry = type("E", (), {"vector_count": 0, "token_count": 10, "original_length": 100,
                           "payload_length": lm_packed.max_payload(10) + lm_packed.MAX_VARINT_BYTES})()
    assert lm3_head.check_entry(entry, header) is None
    entry.payload_length += 1
    assert "too long" in lm3_head.check_entry(entry, header)
