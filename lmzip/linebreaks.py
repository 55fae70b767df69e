"""Line breaks as the model reads them best: CRLF as LF, and hard-wrapped lines joined (kind 8).

The model predicts "\\r" badly (it is a token of its own, before every "\\n" of a CRLF text) and
cannot count columns, so it pays bits for every line end of a hard-wrapped text, and for the next
word, which then lacks its leading space. A kind 8 segment codes its chunks' text with CRLF as
LF and with its soft line breaks (a "\\n" between two characters that are not whitespace) as
spaces; a stream beside it range-codes, for every such space, whether it was a line break, under
an adaptive model whose context is the length the line would have with the next word on it. A
text wrapped at a width pays a fraction of a bit a break for it (SPEC.md, "lm3-text payloads").

Everything here is integer and string logic: `restore` is the decoder's, and the encoder runs it
on what it stores.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InternalError
from .rangecoder import RangeDecoder, RangeEncoder

CRLF = 1    # flag: every line break of every chunk was "\r\n"
UNWRAP = 2  # flag: soft line breaks are spaces in the coded text, each told by the break stream
FLAGS = CRLF | UNWRAP
WHITESPACE = frozenset(" \t\n\v\f\r")
MAX_CONTEXT = 255  # line lengths past this share one context
# A context's frequencies (no break, break) start at 8 and 1 and grow by 16 an answer: most spaces
# are not breaks, and a wrapped text's contexts answer the same every time (tuned on alice29.txt
# and greedily filled texts: 26 % fewer bits than the KT estimator's 1, 1 and 2)
START = (8, 1)
INCREMENT = 16
MAX_TOTAL = 1 << 16  # then both are halved (rounding up), so the coder's totals stay small
# The writer joins wrapped lines only where telling the breaks costs at most this many bits a
# soft break: the model saves about 3 bits a break on alice29.txt (BENCHMARKS.md)
MOST_BITS_PER_BREAK = 1.0
MIN_BREAKS = 16


class BreakModel:
    """The adaptive frequencies of "this space was a line break", per line-length context."""

    def __init__(self):
        self._freqs: dict[int, list[int]] = {}

    def freqs(self, context: int) -> list[int]:
        return self._freqs.setdefault(context, list(START))

    def update(self, context: int, bit: int) -> None:
        f = self.freqs(context)
        f[bit] += INCREMENT
        if f[0] + f[1] > MAX_TOTAL:
            f[0], f[1] = (f[0] + 1) // 2, (f[1] + 1) // 2


def _soft(text: str, i: int) -> bool:
    """Whether the character at i (a space or "\\n") lies between two that are not whitespace."""
    return 0 < i < len(text) - 1 and text[i - 1] not in WHITESPACE and text[i + 1] not in WHITESPACE


def _word_after(text: str, i: int) -> int:
    """The characters from i + 1 to the next whitespace or the end."""
    j = i + 1
    while j < len(text) and text[j] not in WHITESPACE:
        j += 1
    return j - i - 1


def _scan(coded: str, model: BreakModel, tell) -> str:
    """`coded` with each soft space that `tell(freqs, context)` says was a break (1) made "\\n"
    again; the model learns each answer. The encoder's and decoder's one walk over the text."""
    out, line_start = [], 0  # line_start: where the current line starts in `coded`
    for i, ch in enumerate(coded):
        if ch == " " and _soft(coded, i):
            context = min(MAX_CONTEXT, i - line_start + 1 + _word_after(coded, i))
            bit = tell(model.freqs(context), context)
            model.update(context, bit)
            if bit:
                ch = "\n"
        if ch == "\n":
            line_start = i + 1
        out.append(ch)
    return "".join(out)


def crlf_only(text: str) -> bool:
    """Every "\\r" of the text starts a "\\r\\n", and every "\\n" ends one."""
    return text.count("\r") == text.count("\n") == text.count("\r\n")


@dataclass
class Joined:
    """What the writer codes for a group's chunks: their texts as the model reads them, and the
    break stream (empty without UNWRAP)."""

    texts: list[str]
    stream: bytes
    breaks: int  # soft line breaks joined


def join(texts: list[str], flags: int) -> Joined:
    """The coded form of consecutive chunks' texts under `flags` (CRLF needs `crlf_only` texts),
    checked by `restore`, the decoder's own function, on exactly what it returns."""
    joined = _join(texts, flags)
    try:
        restored = restore(joined.texts, flags, joined.stream)
    except ValueError as e:
        restored = e
    if restored != texts:
        raise InternalError(f"lmzip bug: line flags {flags} do not restore the text ({restored!r:.60})")
    return joined


def _join(texts: list[str], flags: int) -> Joined:
    """`join` without the check (for `choose`, which keeps only the stream's length)."""
    if flags & CRLF:
        if not all(map(crlf_only, texts)):
            raise InternalError("lmzip bug: CRLF line flags for a text with a lone \\r or \\n")
        texts = [t.replace("\r\n", "\n") for t in texts]
    coded, stream, breaks = texts, b"", 0
    if flags & UNWRAP:
        coded = [_unwrap(t) for t in texts]
        encoder, model = RangeEncoder(), BreakModel()
        for original, text in zip(texts, coded):
            bits = iter(original[i] == "\n" for i, ch in enumerate(text) if ch == " " and _soft(text, i))

            def tell(freqs, context, bits=bits):
                bit = int(next(bits))
                encoder.encode(0 if bit == 0 else freqs[0], freqs[bit], freqs[0] + freqs[1])
                return bit

            _scan(text, model, tell)
            breaks += original.count("\n") - text.count("\n")
        stream = encoder.finish()
    return Joined(coded, stream, breaks)


def _unwrap(text: str) -> str:
    return "".join(" " if ch == "\n" and _soft(text, i) else ch for i, ch in enumerate(text))


def coded(text: str, flags: int) -> str:
    """One chunk's text as the model reads it under `flags`."""
    if flags & CRLF:
        text = text.replace("\r\n", "\n")
    return _unwrap(text) if flags & UNWRAP else text


def coded_offsets(text: str, flags: int) -> tuple[str, list[int] | None]:
    """`coded(text, flags)` and, for each of its characters and its end, the offset in `text` it
    came from (a cut before a CRLF's "\n" in the coded text cuts before its "\r"); None where
    they are the same (no CRLF flag: unwrapping keeps every offset)."""
    if not flags & CRLF:
        return coded(text, flags), None
    lf_of_crlf = {i for i in range(1, len(text)) if text[i] == "\n" and text[i - 1] == "\r"}
    return coded(text, flags), [i for i in range(len(text) + 1) if i not in lf_of_crlf]


def choose(text: str) -> int:
    """The flags the writer codes a text under: CRLF if all its line breaks are CRLF, and UNWRAP if
    it has soft line breaks whose stream costs at most MOST_BITS_PER_BREAK bits each."""
    flags = CRLF if "\r\n" in text and crlf_only(text) else 0
    lf = coded(text, flags)
    if sum(1 for i, ch in enumerate(lf) if ch == "\n" and _soft(lf, i)) >= MIN_BREAKS:
        joined = _join([text], flags | UNWRAP)
        if 8 * len(joined.stream) <= MOST_BITS_PER_BREAK * joined.breaks:
            flags |= UNWRAP
    return flags


def restore(texts: list[str], flags: int, stream: bytes) -> list[str]:
    """The chunks' original texts from their coded ones; ValueError if the stream is not what the
    writer makes for them."""
    if flags & ~FLAGS:
        raise ValueError(f"unknown line flags {flags:#x}")
    if flags & UNWRAP:
        decoder, model = RangeDecoder(stream), BreakModel()

        def tell(freqs, context):
            bit = int(decoder.target(freqs[0] + freqs[1]) >= freqs[0])
            decoder.consume(0 if bit == 0 else freqs[0], freqs[bit])
            return bit

        texts = [_scan(t, model, tell) for t in texts]
        decoder.finish()
    elif stream:
        raise ValueError("a break stream without the unwrap flag")
    if flags & CRLF:
        if any("\r" in t for t in texts):
            raise ValueError("a \\r in a text coded without its line ends' \\r")
        texts = [t.replace("\n", "\r\n") for t in texts]
    return texts
