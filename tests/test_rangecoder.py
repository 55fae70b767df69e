"""The range coder: round trips, size near the ideal, carries, damaged data, a pinned encoding."""

import hashlib
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmzip import rangecoder
from lmzip.rangecoder import MAX_TOTAL, RangeDecoder, RangeEncoder


def _cumulative(freqs):
    cum = [0]
    for f in freqs:
        cum.append(cum[-1] + f)
    return cum


def _encode(steps):
    """steps: [(freqs, symbol)] -> (payload, ideal bits)."""
    enc = RangeEncoder()
    bits = 0.0
    for freqs, s in steps:
        cum = _cumulative(freqs)
        enc.encode(cum[s], freqs[s], cum[-1])
        bits -= math.log2(freqs[s] / cum[-1])
    return enc.finish(), bits


def _decode(payload, steps):
    dec = RangeDecoder(payload)
    out = [dec.decode(_cumulative(freqs), sum(freqs)) for freqs, _ in steps]
    dec.finish()
    return out


frequency = st.one_of(st.just(1), st.integers(1, 1 << 24), st.integers(1, MAX_TOTAL // 64))


@st.composite
def step_lists(draw):
    n = draw(st.integers(1, 64))
    steps = []
    for _ in range(draw(st.integers(0, 60))):
        freqs = draw(st.lists(frequency, min_size=n, max_size=n))
        steps.append((freqs, draw(st.integers(0, n - 1))))
    return steps


@given(step_lists())
def test_round_trip_and_size(steps):
    payload, bits = _encode(steps)
    assert _decode(payload, steps) == [s for _, s in steps]
    assert len(payload) <= math.ceil(bits / 8) + 2


def test_carries_propagate(monkeypatch):
    """Symbols at the top of the interval make 0xFF runs that a later carry must ripple through."""
    carries = []
    original = RangeEncoder._carry
    monkeypatch.setattr(RangeEncoder, "_carry", lambda self: (carries.append(1), original(self)))
    rng = random.Random(5)
    for _ in range(200):
        steps = []
        for _ in range(rng.randint(1, 80)):
            freqs = [rng.choice([1, 3, 1 << 20, (1 << 40) + 7]) for _ in range(5)]
            steps.append((freqs, rng.choice([0, 4, 4, 4])))
        payload, _ = _encode(steps)
        assert _decode(payload, steps) == [s for _, s in steps]
    assert carries, "no step carried: the test does not reach the carry path"


def test_empty_and_certain_symbols_cost_nothing():
    assert RangeEncoder().finish() == b""
    payload, _ = _encode([([1], 0)] * 1000)
    assert payload == b""
    assert _decode(b"", [([1], 0)] * 1000) == [0] * 1000


def test_pinned_encoding():
    """The byte format is part of the archive format: a change here breaks old archives."""
    rng = random.Random(1234)
    steps = []
    for _ in range(500):
        freqs = [rng.randint(1, 1 << rng.randint(1, 30)) for _ in range(17)]
        steps.append((freqs, rng.randrange(17)))
    payload, _ = _encode(steps)
    assert len(payload) == 910
    assert hashlib.sha256(payload).hexdigest()[:16] == "ef5a6b1d94597ed0"


@pytest.mark.parametrize("cum,freq,total", [(0, 0, 5), (-1, 1, 5), (4, 2, 5), (0, 1, MAX_TOTAL + 1)])
def test_bad_frequencies_are_refused(cum, freq, total):
    with pytest.raises(ValueError):
        RangeEncoder().encode(cum, freq, total)


def test_code_outside_the_interval_is_refused():
    dec = RangeDecoder(b"\xff" * 8)  # code 2**64 - 1 is past the initial width 2**64 - 1
    with pytest.raises(ValueError, match="outside the interval"):
        dec.target(1)


def test_trailing_bytes_are_refused():
    steps = [([1, 2, 3], 2)] * 10
    payload, _ = _encode(steps)
    dec = RangeDecoder(payload)
    _ = [dec.decode([0, 1, 3, 6], 6) for _ in steps]
    padded = payload + b"\0" * (dec.pos - len(payload))  # the same values, then one byte more
    with pytest.raises(ValueError, match="after the end"):
        _decode(padded + b"\x01", steps)


def test_damaged_payloads_fail_cleanly():
    """Any byte string decodes to some symbols or raises ValueError; nothing else."""
    rng = random.Random(7)
    steps = [([rng.randint(1, 1 << 30) for _ in range(9)], rng.randrange(9)) for _ in range(100)]
    payload, _ = _encode(steps)
    outcomes = set()
    for trial in range(300):
        data = bytearray(payload)
        if trial % 3 == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif trial % 3 == 1:
            data = data[:rng.randrange(len(data) + 1)]
        else:
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
        try:
            outcomes.add(_decode(bytes(data), steps) == [s for _, s in steps])
        except ValueError:
            outcomes.add("error")
    assert False in outcomes or "error" in outcomes


def test_state_constants():
    assert rangecoder.BOTTOM * 256 == rangecoder.TOP
    assert rangecoder.BOTTOM // MAX_TOTAL >= 256  # every step keeps r = width // total >= 2**8


def test_consuming_a_symbol_that_misses_the_target_is_refused():
    payload, _ = _encode([([5, 5, 5], 2)])
    dec = RangeDecoder(payload)
    assert dec.target(15) >= 10
    with pytest.raises(ValueError, match="does not contain"):
        dec.consume(0, 5)


def test_only_the_canonical_payload_is_accepted():
    """Each symbol sequence has one payload: extra, changed or zero bytes at the end are refused."""
    rng = random.Random(3)
    steps = [([rng.randint(1, 1 << 20) for _ in range(6)], rng.randrange(6)) for _ in range(50)]
    payload, _ = _encode(steps)
    for damaged in (payload + b"\x01", payload + b"\0", payload[:-1] + bytes([payload[-1] ^ 1])):
        with pytest.raises(ValueError, match="damaged"):
            _decode(damaged, steps)
    with pytest.raises(ValueError, match="damaged"):
        _decode(b"\x01", [([1], 0)] * 3)
