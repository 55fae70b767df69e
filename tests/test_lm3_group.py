"""Kind 6, lm3-group: kind 5's chunks with counts shared by the chunks of a segment mixed into
their frequencies (lmzip/exact/mixing.py, SPEC.md 1.7)."""

import hashlib
import random

import pytest
import torch

import lmzip
from lmzip.errors import OptionError
from lmzip.exact import mixing
from lmzip.exact.coding import check_chunks, decode_chunks, encode_chunks
from lmzip.kinds import lm as lm_kind
from lmzip.segmenting import Piece

from archive_edit import edit_entry, kinds
from conftest import TINY_MODEL, word_chunks

TEXT = (b"Alice was beginning to get very tired of sitting by her sister on the bank. "
        b"The Rabbit said: oh dear, oh dear, I shall be late. ") * 5
# The archive of TEXT in 12-token chunks: pinned, as the format (the mixing's integers) must not move.
GROUP_ARCHIVE_SHA256 = "c262d1394db6eb945f57b5a2d48d2f349a3b9e1855c440a0e9f46e155f3689ef"


def test_a_symbol_is_coded_under_its_row_of_the_mixed_frequencies():
    """The encoder mixes one symbol's (cum, freq, total), the decoder a batch of rows: the same integers."""
    rng = random.Random(0)
    for _ in range(60):
        v, b = rng.randrange(2, 40), rng.randrange(1, 5)
        f = torch.tensor([[rng.randrange(1, 1 << 24) for _ in range(v)] for _ in range(b)], dtype=torch.int64)
        found = []
        for _ in range(b):
            after = {rng.randrange(v): rng.randrange(1, 50) for _ in range(rng.randrange(1, 6))}
            seen = rng.choice([sum(after.values()), 512, 1024, 1 << 20])  # the last ones: w = 0 or small
            after = {t: min(n, seen) for t, n in after.items()}
            hit = (rng.choice((1, 2)), tuple(sorted(after.items())), max(seen, sum(after.values())))
            found.append(rng.choice([hit, hit, None]))
        rows = f.clone()
        mixing.mix_rows(rows, found)
        for r, hit in enumerate(found):
            inclusive = torch.cumsum(rows[r], 0).tolist()
            for y in range(v):
                cum, freq = int(f[r, :y].sum()), int(f[r, y])
                assert mixing.mix_symbol(cum, freq, int(f[r].sum()), y, hit) == (
                    inclusive[y] - int(rows[r, y]), int(rows[r, y]), inclusive[-1])
            assert int(rows[r].min()) >= 1
            w = mixing.weight(hit[0], hit[2]) if hit else 0
            assert (w == 0) == torch.equal(rows[r], f[r])  # no weight: the lm frequencies as they are


def test_counts_see_only_earlier_positions_of_the_group():
    chunks = [[1, 2, 3, 1, 2, 3], [1, 2, 9]]
    found = list(mixing.group_contexts(chunks, 0))
    # positions 0 and 1 have no counted context yet; after 2 (position 2) or 3 (position 3) nothing
    # was counted before; at position 4, "1" was followed by 2 at position 1 of both chunks
    assert found[:4] == [None] * 4
    assert found[4] == (1, ((2, 2),), 2)
    # at position 5, the order-2 context (1, 2) was followed by 3 and by 9 at position 2
    assert found[5] == (2, ((3, 1), (9, 1)), 2)
    assert list(mixing.group_contexts(chunks, 1)) == [None] * 3  # the same counts, its own contexts


def test_weights_are_in_64ths_and_bucketed_by_order_and_count():
    assert all(0 <= w < mixing.ONE for row in mixing.WEIGHTS for w in row)
    assert mixing.weight(1, 1) == mixing.WEIGHTS[0][0] and mixing.weight(2, 3) == mixing.WEIGHTS[1][1]
    assert mixing.weight(2, 1 << 20) == mixing.WEIGHTS[1][15]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_groups_decode_to_their_chunks_at_any_threads_and_batch(exact3, threads, batch_size):
    chunks = word_chunks((30, 25, 30, 7, 18, 1, 0))
    groups = [[0, 1, 2], [3, 4, 5, 6]]  # an empty chunk too
    contexts = lm_kind.shared_contexts([Piece(b"", c) for c in chunks], groups)
    per_chunk = [contexts[i] for i in range(len(chunks))]
    mixed = encode_chunks(exact3, chunks, [0], contexts=per_chunk, threads=threads)
    plain = encode_chunks(exact3, chunks, [0])
    assert sum(map(len, mixed)) < sum(map(len, plain))  # the repeated words cost less
    counts = [len(c) for c in chunks]
    assert decode_chunks(exact3, mixed, counts, [0], batch_size=batch_size, threads=threads, groups=groups) == chunks
    assert not check_chunks(exact3, chunks, mixed, [0], batch_size=batch_size, threads=threads, contexts=per_chunk)
    try:  # decoded without the counts: the coder cannot follow, or other tokens
        assert decode_chunks(exact3, mixed, counts, [0]) != chunks
    except ValueError:
        pass


def test_decoding_refuses_groups_that_do_not_partition_the_chunks(exact3):
    with pytest.raises(ValueError, match="partition"):
        decode_chunks(exact3, [b"", b""], [0, 0], [0], groups=[[0], [0]])


def test_pieces_are_grouped_in_runs_of_at_most_16_as_even_as_can_be():
    def pieces(n, gaps=()):
        return [Piece(b"x", None if i in gaps else [1]) for i in range(n)]

    sizes = [len(g) for g in lm_kind.group_pieces(pieces(21), [0])]
    assert sizes == [11, 10]
    assert [len(g) for g in lm_kind.group_pieces(pieces(33), [0])] == [11, 11, 11]
    assert lm_kind.group_pieces(pieces(5, gaps={2}), [0]) == [[0, 1], [3, 4]]
    assert lm_kind.group_pieces(pieces(16), [0]) == [list(range(16))]


def test_groups_of_long_chunks_are_fewer_and_a_run_is_cut_at_the_segment_bound():
    long = [Piece(b"x", [1] * 8191) for _ in range(9)]  # 8192 positions: 4 rows a batch
    assert [len(g) for g in lm_kind.group_pieces(long, [0])] == [3, 3, 3]
    big = [Piece(b"x" * (1 << 19), [1]) for _ in range(5)]  # 512 KiB each: two to a segment
    assert lm_kind.group_pieces(big, [0]) == [[0, 1], [2, 3], [4]]


def test_lm_method_without_a_head_writes_lm3_group_and_it_comes_back(codec):
    blob = codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_head=0)
    assert set(kinds(blob)) == {"lm3-group"}
    assert codec.decode(blob, model=TINY_MODEL) == TEXT
    kind5 = codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_mix=False)
    assert set(kinds(kind5)) == {"lm3"} and len(blob) < len(kind5)
    for batch_size in (1, 5):
        assert codec.decode(blob, model=TINY_MODEL, batch_size=batch_size) == TEXT


def test_the_archive_is_pinned(codec):
    blob = codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_head=0)
    digest = hashlib.sha256(blob).hexdigest()
    assert digest == GROUP_ARCHIVE_SHA256


def test_a_segment_decoded_without_its_counts_is_an_error_not_wrong_bytes(codec):
    blob = codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_head=0)
    with pytest.raises(lmzip.SegmentError):
        codec.decode(edit_entry(blob, 0, kind=5), model=TINY_MODEL)


def test_a_chunk_that_fails_its_check_sends_its_group_to_zstd(codec, monkeypatch):
    real = lm_kind.check

    def first_fails(lm, pieces, payloads, prefix, sample, **kw):
        real(lm, pieces, payloads, prefix, sample, **kw)
        return {min(sample)}

    monkeypatch.setattr(lm_kind, "check", first_fails)
    monkeypatch.setattr(lm_kind, "check_shards", lambda *a: [])  # the check runs here, through `check`
    blob = codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_head=0)
    got = kinds(blob)
    assert got[0] == "zstd" and "lm3-group" in got  # the first group as raw bytes, the others coded
    assert codec.decode(blob, model=TINY_MODEL) == TEXT


def test_mixing_needs_arithmetic_3_and_packed_chunks(codec):
    for options in ({"lm_arithmetic": 2, "lm_mix": True}, {"pack_lm": False, "lm_mix": True}):
        with pytest.raises(OptionError, match="lm_mix"):
            codec.encode(TEXT, method="lm", model=TINY_MODEL, **options)
    assert set(kinds(codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, pack_lm=False))) \
        == {"lm3"}


def test_a_kind_5_journal_is_not_resumed_for_a_kind_6_run(codec, tmp_path):
    journal = tmp_path / "j"
    codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_mix=False, journal=journal)
    with pytest.raises(lmzip.LmzError, match="shared counts"):
        codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_head=0, journal=journal)


def test_a_chunk_table_of_more_chunks_than_a_group_holds_is_damage(codec):
    from lmzip.container import crc32
    from lmzip.kinds import lm_packed

    from archive_edit import entries

    table = lm_packed.pack([b""] * 17, [1] * 17)  # 17 one-token chunks of empty payloads
    with pytest.raises(ValueError, match="17 chunks in one group"):
        lm_packed.unpack(table, 17, 100, group_positions=1)
    lm_packed.unpack(table, 17, 100)  # a kind 5 table may hold them
    blob = codec.encode(TEXT[:180], method="lm", model=TINY_MODEL, tokens_per_segment=100, lm_head=0)
    assert kinds(blob) == ["lm3-group"]
    e = entries(blob)[0]
    payload = lm_packed.pack([b""] * 17, [1] * 16 + [e["token_count"] - 16])
    damaged = blob[:e["payload_offset"]] + payload
    damaged = edit_entry(damaged, 0, payload_length=len(payload), payload_crc32=crc32(payload))
    with pytest.raises(lmzip.LmzError, match="chunks in one group"):
        codec.decode(damaged, model=TINY_MODEL)


def test_an_entry_of_more_tokens_than_16_chunks_hold_is_refused(codec):
    blob = codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_head=0)
    header = lmzip.container.parse(blob).header
    entry = lmzip.container.parse(blob).segments[0]
    from lmzip.kinds import lm3_group, lm_packed
    room = lm_packed.room(header.prefix)
    assert lm3_group.check_entry(entry, header) is None
    big = entry.__class__(**{**entry.__dict__, "token_count": 16 * room + 1, "original_length": 1 << 30})
    assert "16 chunks" in lm3_group.check_entry(big, header)


def test_a_vocabulary_too_large_for_the_mixed_totals_writes_kind_5(codec, monkeypatch):
    import lmzip.codec

    monkeypatch.setattr(lmzip.codec, "MIX_MAX_VOCAB", 100)  # the tiny model has 257 tokens
    assert set(kinds(codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12))) == {"lm3"}
    with pytest.raises(OptionError, match="vocabulary"):
        codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=12, lm_mix=True)
