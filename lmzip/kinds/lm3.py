"""Segment kind 5, lm3: lm chunks under arithmetic /3, in kind 4's packed layout.

Arithmetic `lmzip-exact-lm/3` is /2's forward pass over weights smoothed by powers of two
(lmzip/exact/smoothing.py): the int8 roundings of the Linears' inputs lose less, and alice29.txt
codes about 1.5 % smaller (BENCHMARKS.md). The payload is kind 4's chunk table and chunks (one
chunk or more, each at most 8192 positions with the prefix). A kind of its own, so that a reader
without /3 reports such a segment as unsupported rather than decoding it under /2's frequencies.
"""

from __future__ import annotations

from . import lm, lm_packed

KIND = 5
NAME = "lm3"
NEEDS_MODEL = True
ARITHMETIC = 3
work = lm.work


def check_entry(entry, header) -> str | None:
    return lm_packed.entry_problem(entry, header, NAME)


def encode(datas: list[bytes], counts: list[int], payloads: list[bytes], prefix):
    return lm_packed.encode(datas, counts, payloads, prefix, kind=KIND, name=NAME)


def decode(jobs, ctx) -> list[bytes]:
    return lm_packed.decode(jobs, ctx, arithmetic=ARITHMETIC, name=NAME)
