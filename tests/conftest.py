import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import lmzip

# A fast default for the edit-test loop and a longer profile that CI runs (CI=true).
settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = str(ROOT / "tests" / "data" / "tiny-llama")
# LMZIP_TEST_DEVICE=cuda runs the tests that use the codec or tiny fixtures on a GPU (the format
# samples among them: made on a CPU, they check decoding across devices).
DEVICE = os.environ.get("LMZIP_TEST_DEVICE", "cpu")
FORMATS = ROOT / "formats"
# Settings that fit the tiny model quickly; each test may override.
# float32 fitting, so that what fits does not depend on the CPU's bf16 support.
TINY_OPTIONS = dict(model=TINY_MODEL, tokens_per_segment=8, vectors=1, max_vectors=1, max_steps=300,
                    lr=0.1, margin=0.5, batch_size=8, hinge=1.0, bf16=False)


def word_chunks(lengths, seed: int = 1) -> list[list[int]]:
    """Chunks of these lengths drawn from ten token ids (3 to 59): repetitive, as text is, so that
    counts shared by a group change the frequencies."""
    rng = random.Random(seed)
    words = [rng.randrange(3, 60) for _ in range(10)]
    return [[rng.choice(words) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="session")
def codec():
    return lmzip.Codec(model=TINY_MODEL, device=DEVICE)


@pytest.fixture(scope="session")
def tiny(codec):
    return codec.model(TINY_MODEL)


@pytest.fixture(scope="module")
def exact3(tiny):
    """The tiny model's exact form under arithmetic /3, made afresh for each test module."""
    from lmzip.exact.model import ExactModel

    return ExactModel.from_loaded(tiny, 3)
