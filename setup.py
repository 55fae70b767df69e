"""The one compiled part of lmzip: lmzip/_fused.c, fused steps of the exact lm arithmetic.

Optional: where it does not build (no C compiler), lmzip runs the same arithmetic in torch
operations, with the same bits, more slowly. The flags are part of its exactness: no
floating-point contraction (a fused multiply-add rounds once where the arithmetic rounds twice)
and no fast-math."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "lmzip._fused", ["lmzip/_fused.c"], optional=True,
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-associative-math"],
)])
