"""Mutated archives: the original bytes or an LmzError, never other bytes or another exception.

Mutations: bit flips, byte edits in every header and table field (with and
without the guarding checksum recomputed), truncation at every structure
boundary, appended bytes, swapped segments. Seeds: the good samples in
formats/, memory-coded ones included.
"""

import signal
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lmzip
from archive_edit import (ENTRY_FIELDS, HEADER_FIELDS, boundaries, edit_entry, edit_header, entries,
                          table_span)
from lmzip.container import _CRC, _ENTRY, crc32

from conftest import FORMATS, TINY_MODEL

SEEDS = {p.name: (p.read_bytes(), p.with_suffix(".out").read_bytes()) for p in sorted(FORMATS.glob("good-*.lmz"))}
NON_EMPTY = [name for name, (_, out) in SEEDS.items() if out]
TRIED = {"count": 0}
# Every decode of a mutant must finish well within this (the work is bounded by the limits).
SECONDS_PER_DECODE = 30


def outcome(codec, blob: bytes, original: bytes) -> str:
    TRIED["count"] += 1
    signal.alarm(SECONDS_PER_DECODE)
    try:
        out = codec.decode(blob, model=TINY_MODEL)
    except lmzip.LmzError as e:
        assert str(e) and "\n" not in str(e), "errors are one line"
        return type(e).__name__
    finally:
        signal.alarm(0)
    assert out == original, "a mutated archive decoded to other bytes"
    return "ok"


seeds = st.sampled_from(sorted(SEEDS))
non_empty = st.sampled_from(NON_EMPTY)


@given(seeds, st.data())
def test_bit_flips(codec, name, data):
    blob, original = SEEDS[name]
    mutant = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        bit = data.draw(st.integers(0, len(mutant) * 8 - 1))
        mutant[bit // 8] ^= 1 << (bit % 8)
    outcome(codec, bytes(mutant), original)


@given(seeds, st.data())
def test_byte_edits(codec, name, data):
    blob, original = SEEDS[name]
    mutant = bytearray(blob)
    at = data.draw(st.integers(0, len(mutant) - 1))
    mutant[at] = data.draw(st.integers(0, 255))
    outcome(codec, bytes(mutant), original)


def _value_for(fmt: str, draw):
    size = struct.calcsize("<" + fmt)
    if fmt.endswith("s"):
        return draw(st.binary(min_size=size, max_size=size))
    if fmt == "f":
        return draw(st.floats(width=32))
    return draw(st.one_of(st.sampled_from([0, 1, 2, (1 << (8 * size)) - 1, 1 << (8 * size - 1)]),
                          st.integers(0, (1 << (8 * size)) - 1)))


HEADER_FORMATS = ["8s", "H", "H", "I", "Q", "32s", "I", "I", "H", "B", "B", "f", "32s", "32s", "H", "H"]
ENTRY_FORMATS = ["B", "B", "H", "I", "I", "I", "Q", "I", "I"]


@given(seeds, st.sampled_from(range(len(HEADER_FIELDS))), st.data())
def test_header_field_edits_behind_a_valid_checksum(codec, name, field, data):
    blob, original = SEEDS[name]
    value = _value_for(HEADER_FORMATS[field], data.draw)
    if HEADER_FIELDS[field] == "model_id_length":
        return  # moves the checksum itself; covered by byte edits
    if HEADER_FIELDS[field] == "prefix_length" and blob[8] == 1:
        return  # version 1 has no such field
    outcome(codec, edit_header(blob, **{HEADER_FIELDS[field]: value}), original)


@given(non_empty, st.data())
def test_table_field_edits_behind_a_valid_checksum(codec, name, data):
    blob, original = SEEDS[name]
    index = data.draw(st.integers(0, len(entries(blob)) - 1))
    field = data.draw(st.sampled_from(range(len(ENTRY_FIELDS))))
    value = _value_for(ENTRY_FORMATS[field], data.draw)
    outcome(codec, edit_entry(blob, index, **{ENTRY_FIELDS[field]: value}), original)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_truncation_at_every_boundary(codec, name):
    blob, original = SEEDS[name]
    for cut in boundaries(blob):
        for at in {cut - 1, cut, cut + 1} & set(range(len(blob))):
            assert outcome(codec, blob[:at], original) != "ok"


@given(seeds, st.binary(min_size=1, max_size=64))
def test_appended_bytes(codec, name, extra):
    blob, original = SEEDS[name]
    assert outcome(codec, blob + extra, original) == "TrailingDataError"


@given(non_empty, st.data())
def test_swapped_segments(codec, name, data):
    blob, original = SEEDS[name]
    rows = entries(blob)
    if len(rows) < 2:
        return
    i, j = data.draw(st.lists(st.integers(0, len(rows) - 1), min_size=2, max_size=2, unique=True))
    # Swap the table entries (offsets too, so the payloads follow): a reordered file.
    start, end = table_span(blob)
    out = bytearray(blob)
    for a, b in ((i, j), (j, i)):
        _ENTRY.pack_into(out, start + a * 32, *rows[b].values())
    _CRC.pack_into(out, end, crc32(out[start:end]))
    result = outcome(codec, bytes(out), original)
    if rows[i] != rows[j]:
        assert result != "ok"


def test_report_how_many_mutants_were_tried():
    # Runs last in this file (pytest keeps file order): a count for the closing note.
    print(f"\nfuzz: {TRIED['count']} mutated archives decoded")
    assert TRIED["count"] > 0
