"""The one compiled part of lmzip: lmzip/_fused.c, fused steps of the exact lm arithmetic.

Optional: where it does not build (no C compiler), lmzip runs the same arithmetic in torch
operations, with the same bits, more slowly. The flags are part of its exactness: no
floating-point contraction (a fused multiply-add rounds once where the arithmetic rounds twice)
and no fast-math."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXACT_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
# speed only: GCC's generic tuning avoids vector gathers, which the exp table lookups and the
# strided score reads need (about a third of the attention step's time here); other compilers
# refuse the option, and the build is retried without it
GATHERS = ["-mtune-ctrl=use_gather,use_gather_2parts,use_gather_4parts"]


class BuildExt(build_ext):
    def build_extension(self, ext):
        original = list(ext.extra_compile_args)
        ext.extra_compile_args = original + GATHERS
        try:
            super().build_extension(ext)
        except Exception:  # noqa: BLE001 - any compiler failure: retry with the exact flags alone
            ext.extra_compile_args = original
            super().build_extension(ext)


setup(cmdclass={"build_ext": BuildExt},
      ext_modules=[Extension("lmzip._fused", ["lmzip/_fused.c"], optional=True, extra_compile_args=EXACT_FLAGS)])
