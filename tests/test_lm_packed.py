"""The lm-packed kind: runs of lm chunks in one segment, a chunk table instead of 32-byte entries
(arithmetic /2; kind 5, lm3, is the same layout under /3: test_lm3.py)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lmzip
from lmzip import container
from lmzip.kinds import lm as lm_kind
from lmzip.kinds import lm_packed

from archive_edit import edit_entry, entries, kinds
from conftest import TINY_MODEL

TEXT = b"Alice was beginning to get very tired of sitting by her sister on the bank. \xff\xfe binary " * 3


def payloads(blob):
    return [blob[e["payload_offset"]: e["payload_offset"] + e["payload_length"]] for e in entries(blob)]


@pytest.fixture(scope="module")
def archives(codec):
    return {pack: codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=8, pack_lm=pack,
                                 lm_arithmetic=2)
            for pack in (True, False)}


def test_runs_of_chunks_are_packed_and_come_back(codec, archives):
    packed = archives[True]
    # each run of chunks up to the invalid UTF-8 in one segment; the last, a lone chunk, kind 2
    assert kinds(packed) == ["lm-packed", "zstd"] * 3 + ["lm"]
    assert len(packed) < len(archives[False]) - 20 * 32
    assert codec.decode(packed, model=TINY_MODEL) == TEXT


@pytest.mark.parametrize("batch_size", [1, 2, 7, 64])
def test_the_same_bytes_at_any_batch_size(codec, archives, batch_size):
    assert codec.decode(archives[True], model=TINY_MODEL, batch_size=batch_size) == TEXT


def test_packing_keeps_every_chunk_payload_as_it_was(archives):
    """The same chunks, coded the same way: only the table around them differs."""
    loose = [p for p, kind in zip(payloads(archives[False]), kinds(archives[False])) if kind == "lm"]
    counts = [e["token_count"] for e in entries(archives[False]) if e["kind"] == lm_kind.KIND]
    chunks, chunk_counts = [], []
    for payload, e in zip(payloads(archives[True]), entries(archives[True])):
        if e["kind"] == lm_packed.KIND:
            got, n = lm_packed.unpack(payload, e["token_count"], 8191)
            chunks += got
            chunk_counts += n
        elif e["kind"] == lm_kind.KIND:
            chunks.append(payload)
            chunk_counts.append(e["token_count"])
    assert chunks == loose and chunk_counts == counts


def test_a_lone_chunk_stays_an_lm_segment(codec):
    """What older readers know: kind 2 for a run of one chunk."""
    blob = codec.encode(TEXT[:70], method="lm", model=TINY_MODEL, lm_arithmetic=2)
    assert kinds(blob) == ["lm"]


def test_a_run_is_cut_at_the_segment_size_limit(codec, monkeypatch):
    monkeypatch.setattr(lm_kind, "MAX_SEGMENT_BYTES", 40)
    text = TEXT[:76] * 2
    blob = codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=4, lm_arithmetic=2)
    sizes = [s["original_length"] for s in lmzip.inspect(blob)["segments"]]
    assert len(sizes) > 3 and max(sizes) <= 40 and "lm-packed" in kinds(blob)
    assert codec.decode(blob, model=TINY_MODEL) == text


@pytest.mark.parametrize("arithmetic,packed", [(2, "lm-packed"), (3, "lm3")])
def test_a_chunk_that_fails_the_check_splits_its_run(codec, monkeypatch, arithmetic, packed):
    import lmzip.exact

    real = lmzip.exact.check_chunks
    monkeypatch.setattr(lmzip.exact, "check_chunks", lambda exact, chunks, payloads, prefix, **kw:
                        set(range(len(chunks))))  # every sampled chunk (0, 16, 32) fails
    text = TEXT[:76] * 6
    blob = codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=4, lm_arithmetic=arithmetic,
                        lm_mix=False)
    monkeypatch.setattr(lmzip.exact, "check_chunks", real)
    assert kinds(blob)[:4] == ["zstd", packed, "zstd", packed]
    assert codec.decode(blob, model=TINY_MODEL) == text


@given(st.integers(0, (1 << 32) - 1))
def test_varints_round_trip(n):
    data = lm_packed.varint(n)
    assert lm_packed.read_varint(b"\x00" + data + b"\x01", 1) == (n, 1 + len(data))
    assert len(data) == max(1, -(-n.bit_length() // 7))


@pytest.mark.parametrize("data,problem", [
    (b"", "cut off"), (b"\x80", "cut off"), (b"\x80\x00", "shortest form"),
    (b"\x80\x80\x80\x80\x80\x01", "over 5 bytes"), (b"\xff\xff\xff\xff\x10", "over 2\\*\\*32")])
def test_bad_varints_are_refused(data, problem):
    with pytest.raises(ValueError, match=problem):
        lm_packed.read_varint(data, 0)


def table(counts, lengths, chunk_count=None):
    return lm_packed.varint(len(counts) if chunk_count is None else chunk_count) + b"".join(
        map(lm_packed.varint, counts)) + b"".join(map(lm_packed.varint, lengths))


@pytest.mark.parametrize("payload,tokens,problem", [
    (table([3, 2], [2, 1]) + b"abc", 5, None),
    (table([], []), 5, "0 chunks"),
    (table([3, 2], [2, 1], chunk_count=6) + b"abc", 5, "6 chunks"),
    (table([3, 0], [2, 1]) + b"abc", 3, "0 tokens"),
    (table([3, 9000], [2, 1]) + b"abc", 9003, "9000 tokens"),
    (table([3, 2], [2, 1]) + b"abc", 6, "hold 5 tokens"),
    (table([3, 2], [2, 1]) + b"abcd", 5, "take 3 bytes"),
    (table([3, 2], [2, 1]) + b"ab", 5, "take 3 bytes"),
    (table([1, 1], [25, 0]) + bytes(25), 2, "too long"),
])
def test_chunk_tables_are_checked(payload, tokens, problem):
    if problem is None:
        assert lm_packed.unpack(payload, tokens, 8191) == ([b"ab", b"c"], [3, 2])
    else:
        with pytest.raises(ValueError, match=problem):
            lm_packed.unpack(payload, tokens, 8191)


def test_a_damaged_chunk_table_is_a_damaged_segment(codec, archives):
    blob = archives[True]
    e = entries(blob)[0]
    damaged = bytearray(blob)
    damaged[e["payload_offset"] + 1] += 1  # the first chunk claims a token more
    at, end = e["payload_offset"], e["payload_offset"] + e["payload_length"]
    damaged = edit_entry(bytes(damaged), 0, payload_crc32=container.crc32(damaged[at:end]))
    with pytest.raises(lmzip.SegmentError, match="damaged segment 0: damaged lm-packed payload: the chunks hold"):
        codec.decode(damaged, model=TINY_MODEL)


def test_lm_packed_entries_are_bounded(archives):
    header = container.parse(archives[True]).header
    entry = container.Segment(lm_packed.KIND, original_length=100, payload_length=lm_packed.max_payload(10),
                              payload_offset=0, crc32=0, token_count=10)
    assert lm_packed.check_entry(entry, header) is None
    for change, problem in [({"payload_length": lm_packed.max_payload(10) + 1}, "too long"),
                            ({"token_count": 101}, "token count"), ({"token_count": 0}, "token count"),
                            ({"vector_count": 1}, "vector count")]:
        assert problem in lm_packed.check_entry(container.Segment(**{**entry.__dict__, **change}), header)
    with pytest.raises(lmzip.SegmentTableError, match="vector count"):
        lmzip.inspect(edit_entry(archives[True], 0, vector_count=1))


def test_the_payload_bound_is_each_chunks_bound_and_two_varints_per_token():
    assert lm_packed.max_payload(10) == (8 + 16 + 2 * 5) * 10 + 5
    assert lm_packed.room((256,)) == 8191  # arithmetic /2's 8192 positions, less the prefix


def test_a_chunk_may_take_all_the_positions_but_no_more():
    payload = table([8191], [0])
    assert lm_packed.unpack(payload, 8191, lm_packed.room((256,))) == ([b""], [8191])
    with pytest.raises(ValueError, match="8192 tokens"):
        lm_packed.unpack(table([8192], [0]), 8192, lm_packed.room((256,)))


def test_an_lm_packed_segment_needs_a_model_and_a_prefix(archives):
    from dataclasses import replace

    header = container.parse(archives[True]).header
    entry = container.Segment(lm_packed.KIND, original_length=100, payload_length=10, payload_offset=0,
                              crc32=0, token_count=10)
    assert "no model or prefix" in lm_packed.check_entry(entry, replace(header, prefix=()))


def test_the_writer_refuses_a_chunk_a_reader_would_refuse():
    with pytest.raises(lmzip.InternalError, match="a reader would refuse"):
        lm_packed.encode([b"ab", b"c"], [1, 1], [bytes(25), b""], prefix=(256,))


def test_a_segment_of_the_wrong_length_is_damaged(codec, archives, monkeypatch):
    from lmzip.kinds import memory

    monkeypatch.setattr(memory, "detokenize", lambda lm, ids: b"x" * (3 * len(ids)))
    with pytest.raises(lmzip.SegmentError, match="damaged segment 0: decoded .* bytes, expected"):
        codec.decode(archives[True], model=TINY_MODEL)


def test_the_segment_the_coder_cannot_follow_is_the_one_named(codec, archives, monkeypatch):
    """Decoded together the batch fails; decoded alone, each segment tells whether it is the one."""
    import lmzip.exact

    blob = archives[True]
    e = entries(blob)[2]
    bad, _ = lm_packed.unpack(payloads(blob)[2], e["token_count"], 8191)
    real = lmzip.exact.decode_chunks

    def refuses_segment_2(exact, chunk_payloads, counts, prefix, **kw):
        if bad[0] in chunk_payloads:
            raise ValueError("the target is past the total")
        return real(exact, chunk_payloads, counts, prefix, **kw)

    monkeypatch.setattr(lmzip.exact, "decode_chunks", refuses_segment_2)
    with pytest.raises(lmzip.SegmentError, match="damaged segment 2: the range coder cannot follow"):
        codec.decode(blob, model=TINY_MODEL)


@pytest.mark.parametrize("arithmetic,packed", [(2, "lm-packed"), (3, "lm3"), (3, "lm3-group"), (3, "lm3-head")])
def test_progress_counts_each_byte_once_with_packed_runs(codec, arithmetic, packed):
    seen = []
    text = TEXT * 4
    options = {"lm-packed": {}, "lm3": {"lm_mix": False}, "lm3-group": {"lm_head": 0}, "lm3-head": {}}[packed]
    blob = codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=4, lm_arithmetic=arithmetic,
                        progress=lambda p: seen.append((p.done, p.lm, p.memory, p.zstd)), **options)
    done = [d for d, *_ in seen]
    assert packed in kinds(blob)
    assert done == sorted(done) and done[-1] == len(text)
    found = kinds(blob)
    assert seen[-1][1:] == (found.count(packed) + found.count("lm"), 0, found.count("zstd"))


def test_decoding_progress_counts_lm_segments_as_lm(codec, archives):
    seen = []
    codec.decode(archives[True], model=TINY_MODEL, progress=lambda p: seen.append((p.lm, p.memory, p.zstd, p.tokens)))
    assert seen[-1] == (4, 0, 3, sum(e["token_count"] for e in entries(archives[True]) if e["kind"] != 0))
