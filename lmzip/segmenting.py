"""Cutting input bytes into segments whose bytes concatenate to the input exactly.

Valid UTF-8 text is cut every N tokens, at character boundaries (the last
segments of a run share its tail evenly, at most N tokens each); each piece is
re-tokenized on its own and kept for memory coding only if its tokens decode
back to exactly its text. Everything else (invalid UTF-8, a tokenizer that
normalizes, runs that cannot pay for a fit: see `worth_fitting`) is marked for zstd.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from . import linebreaks

# Invalid UTF-8 bytes come back from surrogateescape as U+DC80..U+DCFF; valid
# UTF-8 never decodes to a surrogate, so these mark exactly the binary runs.
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]+")


@dataclass(frozen=True)
class Piece:
    data: bytes
    ids: tuple[int, ...] | None  # the tokens to memory-code, or None for zstd


@dataclass(frozen=True)
class Region:
    """Text for the fitter, as plain data: grown into segments, or fitted whole."""

    text: str
    growing: bool
    max_tokens: int                     # growing: the longest a segment may become
    ids: tuple[int, ...] | None = None  # whole: its tokens, as `memory_piece` checked them


# A run of valid UTF-8 is memory-coded only if it can pay for its vectors (SPEC.md does not
# depend on this; README "Junk input"): at least this many tokens, so that a segment's K
# vectors stand for several tokens each ...
MIN_MEMORY_TOKENS = 8
# ... and text-like: this share of its characters printable or \t \n \r. Random bytes give
# short valid runs, about a quarter of whose characters are control characters.
MIN_PRINTABLE_SHARE = 0.9
_UNPRINTABLE = re.compile(r"[^\t\n\r\x20-\x7e\xa0-\U0010ffff]|[\u2028\u2029\ufffe\uffff]")


def worth_fitting(tokenizer, text: str) -> bool:
    """Whether a run of valid UTF-8 may pay for memory vectors (else it goes to zstd unfitted)."""
    if len(text) < MIN_MEMORY_TOKENS:  # a token is at least one character
        return False
    if len(_UNPRINTABLE.findall(text)) > (1 - MIN_PRINTABLE_SHARE) * len(text):
        return False
    if len(text) >= 64 * MIN_MEMORY_TOKENS:  # tokens are rarely that long: skip the tokenizer
        return True
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= MIN_MEMORY_TOKENS


def _runs(data: bytes) -> Iterator[tuple[str, bool]]:
    """Yield (text, is_valid_utf8) runs covering `data` in order."""
    text = data.decode("utf-8", errors="surrogateescape")
    pos = 0
    for m in _ESCAPED_BYTES.finditer(text):
        if m.start() > pos:
            yield text[pos : m.start()], True
        yield m.group(), False
        pos = m.end()
    if pos < len(text):
        yield text[pos:], True


# Text is tokenized in windows of this many characters, so that the offsets of
# a several-MB text are never all held at once.
WINDOW_CHARS = 1 << 16


def _cut_points(tokenizer, text: str, tokens_per_segment: int) -> Iterator[int]:
    """Yield increasing character offsets that cut `text` about every N tokens, ending at len(text)."""
    start = 0
    while start < len(text):
        window = text[start : start + WINDOW_CHARS]
        last_window = start + len(window) >= len(text)
        offsets = tokenizer(window, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cut = 0
        if last_window:  # even out the last segments: no short tail costing K vectors for a few tokens
            count = -(-len(offsets) // tokens_per_segment)
            starts = [round(i * len(offsets) / count) for i in range(1, count)]
        else:
            starts = range(tokens_per_segment, len(offsets), tokens_per_segment)
        for j in starts:
            if offsets[j][0] > cut:  # a token inside a multi-byte character shares its offset
                cut = offsets[j][0]
                yield start + cut
        # The window's tail is tokenized again with what follows, unless nothing follows.
        if last_window or cut == 0:
            start += len(window)
            if not last_window:
                yield start
        else:
            start += cut
    yield len(text)


def memory_piece(tokenizer, text: str, lines: int = 0) -> Piece:
    """A piece of text, with its tokens (of the text as `linebreaks.coded` makes it under `lines`)
    if they detokenize back to exactly that text."""
    data = text.encode("utf-8")
    text = linebreaks.coded(text, lines)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # At most one token per byte: the decoder then never runs more steps than the
    # segment has bytes, which bounds the work a hostile archive can ask for.
    if not ids or len(ids) > len(data) or tokenizer.decode(ids, clean_up_tokenization_spaces=False) != text:
        return Piece(data, None)
    return Piece(data, tuple(ids))


def plan(data: bytes, tokenizer, tokens_per_segment: int, worth=worth_fitting, lines: int = 0) -> Iterator[Piece]:
    """Cut `data` into pieces of about `tokens_per_segment` tokens (of the text as the `lines`
    flags code it: linebreaks.py); runs of valid UTF-8 that `worth(tokenizer, text)` turns down
    go to zstd whole."""
    for text, valid in _runs(data):
        if not valid or not worth(tokenizer, text):
            yield Piece(text.encode("utf-8", errors="surrogateescape"), None)
            continue
        coded, offsets = linebreaks.coded_offsets(text, lines)
        a = 0
        for b in _cut_points(tokenizer, coded, tokens_per_segment):
            b = offsets[b] if offsets is not None else b
            if b > a:
                yield memory_piece(tokenizer, text[a:b], lines)
                a = b


def text_runs(data: bytes) -> str:
    """The text of `data`'s valid UTF-8 runs, each after a NUL (so that none continues another)."""
    return "".join("\0" + text for text, valid in _runs(data) if valid)


class Stream:
    """A run of text that memory segments are taken from, front to back.

    A growing stream lets the fit choose each segment's length: it offers the
    tokens of what is left (at most `max_tokens` of them) and says which lengths
    end a valid piece: at a character boundary, re-tokenizing on its own to
    exactly those tokens. A fixed stream is one piece, fitted whole.
    """

    growing = True

    def __init__(self, tokenizer, text: str, max_tokens: int):
        self.tokenizer, self.text, self.max_tokens = tokenizer, text, max_tokens
        self.start = 0  # character offset of the next segment
        self._load()

    @classmethod
    def of(cls, tokenizer, region: Region) -> "Stream":
        if region.growing:
            return cls(tokenizer, region.text, region.max_tokens)
        return cls.whole(tokenizer, Piece(region.text.encode("utf-8"), region.ids))

    @classmethod
    def whole(cls, tokenizer, piece: Piece) -> "Stream":
        """A fixed stream: one piece, already checked by `memory_piece`, fitted whole."""
        stream = cls.__new__(cls)
        stream.tokenizer, stream.text, stream.growing = tokenizer, piece.data.decode("utf-8"), False
        stream.start, stream.ids = 0, piece.ids
        stream.max_tokens = stream._all = len(piece.ids)
        stream._offsets, stream._valid = None, {len(piece.ids): len(stream.text)}
        return stream

    def _load(self) -> None:
        rest = self.text[self.start :]
        enc = self.tokenizer(rest, add_special_tokens=False, return_offsets_mapping=True)
        self._all = len(enc["input_ids"])
        self.ids: tuple[int, ...] = tuple(enc["input_ids"][: self.max_tokens])
        self._offsets = enc["offset_mapping"]
        self._valid: dict[int, int | None] = {}

    @property
    def tokens_left(self) -> int:
        """Tokens in all the text left, past the cap too."""
        return self._all

    @property
    def done(self) -> bool:
        return self.start >= len(self.text)

    def _cut(self, n: int) -> int | None:
        """Where (in characters from `start`) a segment of n tokens ends, or None if none can."""
        if n not in self._valid and self._offsets is not None:  # a whole stream has one length
            rest = self.text[self.start :]
            if n == self._all:
                cut = len(rest)
            else:
                cut = self._offsets[n][0]
                if cut <= self._offsets[n - 1][0]:  # token n starts inside a character
                    cut = None
            if cut is not None and memory_piece(self.tokenizer, rest[:cut]).ids != self.ids[:n]:
                cut = None
            self._valid[n] = cut
        return self._valid.get(n)

    def length_at_least(self, n: int) -> int | None:
        """The shortest valid length >= n (up to all the stream offers), or None."""
        for m in range(max(n, 1), len(self.ids) + 1):
            if self._cut(m) is not None:
                return m
        return None

    def length_at_most(self, n: int) -> int | None:
        """The longest valid length <= n, or None."""
        for m in range(min(n, len(self.ids)), 0, -1):
            if self._cut(m) is not None:
                return m
        return None

    def take(self, n: int) -> Piece:
        """Cut the next segment, n tokens long (a valid length), and move past it."""
        cut = self._cut(n)
        if cut is None:
            raise ValueError(f"no valid segment of {n} tokens here")
        piece = Piece(self.text[self.start : self.start + cut].encode("utf-8"), self.ids[:n])
        self.start += cut
        if not self.done:
            self._load()
        return piece

    def skip(self) -> Piece:
        """No valid segment starts here within max_tokens: the text those tokens cover goes to
        zstd (all that is left, if they cover it all), and the stream goes on after it."""
        cut = self._offsets[len(self.ids)][0] if self._all > len(self.ids) else 0
        end = self.start + cut if cut > 0 else len(self.text)
        piece = Piece(self.text[self.start : end].encode("utf-8"), None)
        self.start = end
        if not self.done:
            self._load()
        return piece
