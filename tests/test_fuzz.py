"""Mutated archives: the original bytes or an LmzError, never other bytes or another exception.

Mutations: bit flips, byte edits in every header and table field (with and
without the guarding checksum recomputed), truncation at every structure
boundary, appended bytes, swapped segments. Seeds: the good samples in
formats/, memory-coded ones included (all but SLOW_SEEDS).
"""

import collections
import signal
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lmzip
from archive_edit import (ENTRY_FIELDS, ENTRY_FORMATS, LAYOUT_FIELDS, boundaries, edit_entry, edit_header,
                          entries, header_fields, header_formats, table_span)
from lmzip.container import _CRC, _ENTRY, crc32

from conftest import FORMATS, TINY_MODEL

# Not the lm-long sample: its clean decode is 2,400 exact steps (10 s here), a mutant may claim
# up to 8191 (a minute or more), and its container and coder paths are good-lm-tiny's; its own
# entry bound has a test in test_lm_kind.py.
SLOW_SEEDS = {"good-lm-long-tiny.lmz"}
SEEDS = {p.name: (p.read_bytes(), p.with_suffix(".out").read_bytes()) for p in sorted(FORMATS.glob("good-*.lmz"))
         if p.name not in SLOW_SEEDS}
NON_EMPTY = [name for name, (_, out) in SEEDS.items() if out]
MULTI_SEGMENT = [name for name in NON_EMPTY if len(entries(SEEDS[name][0])) >= 2]
# Outcomes of every mutant decoded, by error name, for the closing note (printed at the end).
OUTCOMES: collections.Counter = collections.Counter()
# Every decode of a mutant must finish well within this (the work is bounded by the limits).
SECONDS_PER_DECODE = 30


class DecodeTookTooLong(Exception):
    pass


def _too_long(signum, frame):
    raise DecodeTookTooLong(f"a mutant took more than {SECONDS_PER_DECODE} s to decode")


def outcome(codec, blob: bytes, original: bytes) -> str:
    previous = signal.signal(signal.SIGALRM, _too_long)  # fails this test, not the run
    signal.alarm(SECONDS_PER_DECODE)
    try:
        out = codec.decode(blob, model=TINY_MODEL)
    except lmzip.LmzError as e:
        assert str(e) and "\n" not in str(e), "errors are one line"
        OUTCOMES[type(e).__name__] += 1
        return type(e).__name__
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert out == original, "a mutated archive decoded to other bytes"
    OUTCOMES["ok"] += 1
    return "ok"


def test_a_slow_decode_fails_its_test_only(codec, monkeypatch):
    blob, original = SEEDS["good-zstd-text.lmz"]
    monkeypatch.setattr(codec, "decode", lambda *a, **k: signal.pause())
    monkeypatch.setattr(__import__(__name__), "SECONDS_PER_DECODE", 1)
    with pytest.raises(DecodeTookTooLong):
        outcome(codec, blob, original)


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


@given(seeds, st.data())
def test_header_field_edits_behind_a_valid_checksum(codec, name, data):
    blob, original = SEEDS[name]
    # Length fields move the checksum itself: byte edits and truncation cover them.
    fields = [(f, code) for f, code in zip(header_fields(blob), header_formats(blob)) if f not in LAYOUT_FIELDS]
    field, code = data.draw(st.sampled_from(fields))
    outcome(codec, edit_header(blob, **{field: _value_for(code, data.draw)}), original)


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


@given(st.sampled_from(MULTI_SEGMENT), st.data())
def test_swapped_segments(codec, name, data):
    blob, original = SEEDS[name]
    rows = entries(blob)
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


def test_the_seeds_cover_every_version_and_kind():
    assert {SEEDS[n][0][8] for n in SEEDS} == {1, 2, 3}
    assert MULTI_SEGMENT, "no seed has two segments to swap"


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    yield
    if OUTCOMES:  # a count for the closing note, whatever order the tests ran in
        print(f"\nfuzz: {sum(OUTCOMES.values())} mutated archives decoded: {dict(sorted(OUTCOMES.items()))}")
