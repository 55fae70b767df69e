"""A range coder over integer frequencies with 64-bit state (Python integers).

Each symbol is coded with (cum, freq, total): its frequency, the sum of the
frequencies before it, and the sum of all, 1 <= freq, cum + freq <= total <=
MAX_TOTAL. The frequencies are the caller's (for lmzip the exact model's), so
the coder adds no modelling of its own and the format is exactly this file;
SPEC.md ("lm payloads") spells it out for other implementations.

State: `low` and `width` of the current interval in units of 2**-64 below the
bytes already written. A step narrows the interval to
[low + r * cum, low + r * (cum + freq)) with r = width // total, and shifts
out a byte whenever width < 2**56. A carry out of `low` propagates into the
bytes written (they cannot all be 0xFF). The encoder ends on the value in the
final interval with the most trailing zero bits, and drops the zero bytes
at the end; the decoder reads zeros past the end.
"""

from __future__ import annotations

STATE_BITS = 64
TOP = 1 << STATE_BITS
BOTTOM = 1 << (STATE_BITS - 8)    # renormalize below this width
MASK = TOP - 1
MAX_TOTAL = 1 << 48               # r = width // total >= 2**8


def _final_value(low: int, width: int) -> int:
    """The value in [low, low + width) with the most trailing zero bits (may carry past 2**64)."""
    for k in range(STATE_BITS, -1, -1):
        value = (low + (1 << k) - 1) >> k << k
        if value < low + width:
            return value
    raise AssertionError("width >= 1 always holds a value")


class RangeEncoder:
    def __init__(self):
        self.out = bytearray()
        self.low = 0
        self.width = MASK

    def encode(self, cum: int, freq: int, total: int) -> None:
        if not (0 <= cum and 1 <= freq and cum + freq <= total <= MAX_TOTAL):
            raise ValueError(f"bad frequencies cum={cum} freq={freq} total={total}")
        r = self.width // total
        self.low += r * cum
        self.width = r * freq
        if self.low >= TOP:
            self.low -= TOP
            self._carry()
        while self.width < BOTTOM:
            self.out.append(self.low >> (STATE_BITS - 8))
            self.low = (self.low << 8) & MASK
            self.width <<= 8

    def _carry(self) -> None:
        i = len(self.out) - 1
        while self.out[i] == 0xFF:  # the interval lies below 1: some byte absorbs the carry
            self.out[i] = 0
            i -= 1
        self.out[i] += 1

    def finish(self) -> bytes:
        """The shortest byte string that decodes to the symbols encoded."""
        value = _final_value(self.low, self.width)
        if value >= TOP:
            value -= TOP
            self._carry()
        data = self.out + value.to_bytes(STATE_BITS // 8, "big")
        return bytes(data.rstrip(b"\0"))


class RangeDecoder:
    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.pos = STATE_BITS // 8
        self.code = int.from_bytes(self.data[:self.pos].ljust(self.pos, b"\0"), "big")
        self.width = MASK
        self.low = 0  # the encoder's low, tracked to check that the data ends where it must
        self.r = 0

    def target(self, total: int) -> int:
        """The value in [0, total) the next symbol's [cum, cum + freq) contains."""
        if not 1 <= total <= MAX_TOTAL:
            raise ValueError(f"bad total {total}")
        self.r = self.width // total
        value = self.code // self.r
        if value >= total:
            raise ValueError("damaged range-coded data: the code lies outside the interval")
        return value

    def consume(self, cum: int, freq: int) -> None:
        """Narrow to the symbol found for the last `target` (cum <= target < cum + freq)."""
        self.code -= self.r * cum
        self.low = (self.low + self.r * cum) & MASK
        self.width = self.r * freq
        if not 0 <= self.code < self.width:
            raise ValueError("damaged range-coded data: the symbol does not contain the target")
        while self.width < BOTTOM:
            byte = self.data[self.pos] if self.pos < len(self.data) else 0
            self.pos += 1
            self.code = (self.code << 8) | byte
            self.low = (self.low << 8) & MASK
            self.width <<= 8

    def decode(self, cumulative, total: int) -> int:
        """Decode one symbol given the cumulative frequencies cumulative[s] = sum of freq[:s],
        with cumulative[n] = total (a sequence of n + 1 ints)."""
        value = self.target(total)
        lo, hi = 0, len(cumulative) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cumulative[mid] <= value:
                lo = mid
            else:
                hi = mid
        self.consume(cumulative[lo], cumulative[lo + 1] - cumulative[lo])
        return lo

    def finish(self) -> None:
        """Raise ValueError unless the data is exactly what the encoder writes for these symbols:
        its final value, no bytes after it, no zero byte at the end."""
        if (self.low + self.code) & MASK != _final_value(self.low, self.width) & MASK:
            raise ValueError("damaged range-coded data: it does not end on the encoder's final value")
        if len(self.data) > self.pos:
            raise ValueError(f"damaged range-coded data: {len(self.data) - self.pos} bytes after the end")
        if self.data.endswith(b"\0"):
            raise ValueError("damaged range-coded data: a zero byte at the end")
