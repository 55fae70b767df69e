"""The exact lm coder on the embedded model (SmolLM2-135M Q4_1): pinned fingerprint and payloads.

If a change to the arithmetic or the quantization changes these, archives made before it no
longer decode: bump ARITHMETIC_VERSION (lmzip/exact/model.py) and then these pins.
"""

import pytest

import lmzip
from lmzip.exact import ExactModel, decode_chunks, encode_chunks
from lmzip.models import load_model

SENTENCE = "The quick brown fox jumps over the lazy dog."
EMBEDDED_EXACT_FINGERPRINT = "5da9b9fc712a952841b5d33652f8091b4c329fe6dadd28243b43d9e01a66dc4e"
PAYLOADS = ["40b6fca0", "40b7"]


@pytest.fixture(scope="module")
def embedded():
    try:
        lm = load_model(device="cpu")
    except lmzip.ModelUnavailableError as e:
        pytest.fail(f"the embedded model must be installed for the tests: {e}")
    return lm, ExactModel.from_loaded(lm)


def test_embedded_fingerprint_and_payloads_are_pinned(embedded):
    lm, exact = embedded
    assert exact.fingerprint.hex() == EMBEDDED_EXACT_FINGERPRINT
    prefix = (lm.tokenizer.get_vocab()["<|endoftext|>"],)
    ids = lm.tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]
    chunks = [ids, ids[:3]]
    payloads = encode_chunks(exact, chunks, prefix)
    assert [p.hex() for p in payloads] == PAYLOADS
    assert decode_chunks(exact, payloads, [len(c) for c in chunks], prefix, batch_size=2) == chunks
