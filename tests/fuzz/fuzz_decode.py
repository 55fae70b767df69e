"""Coverage-guided fuzzing of the .lmz decoder with atheris, for a person to run for longer.

    pip install atheris
    python tests/fuzz/fuzz_decode.py formats/ -max_total_time=600

Seeds come from formats/ (pass the folder as the corpus); memory segments are
decoded with the tiny test model. The only acceptable outcomes are the
original bytes (the archive's own SHA-256 vouches for them) or an LmzError;
any other exception is a crash that atheris reports with the input that made
it. Add what it finds to formats/ (see formats/make_samples.py).
"""

import hashlib
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import lmzip
    from lmzip import container

TINY = str(Path(__file__).resolve().parent.parent / "data" / "tiny-llama")
CODEC = lmzip.Codec(model=TINY, device="cpu")


def test_one_input(data: bytes) -> None:
    try:
        out = CODEC.decode(data, model=TINY)
    except lmzip.LmzError:
        return
    # It decoded: it must be exactly what the archive's checksum describes.
    header = container.parse(data).header
    assert len(out) == header.original_size
    assert hashlib.sha256(out).digest() == header.content_sha256


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
