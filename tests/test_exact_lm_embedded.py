"""The exact lm coder on the embedded model (SmolLM2-135M Q4_1): pinned fingerprint and payloads.

If a change to the arithmetic or the quantization changes these, archives made before it no
longer decode: bump the arithmetic's version (VERSIONS, lmzip/exact/model.py) and then these pins.
"""

import pytest

import lmzip
from lmzip.exact import ExactModel, decode_chunks, encode_chunks
from lmzip.models import load_model

SENTENCE = "The quick brown fox jumps over the lazy dog."
EMBEDDED_EXACT_FINGERPRINT = "5da9b9fc712a952841b5d33652f8091b4c329fe6dadd28243b43d9e01a66dc4e"
PAYLOADS = ["40b6fca0", "40b7"]
# arithmetic /3 (smoothed weights), what compress --method lm writes
EMBEDDED_EXACT_FINGERPRINT_3 = "ad4eb8df5f08770c94b83c17ad85f23f8d31dc78bc63627041b3fe546e76b01b"
PAYLOADS_3 = ["82a5febf30", "82a5f8"]


@pytest.fixture(scope="module")
def embedded():
    try:
        lm = load_model(device="cpu")
    except lmzip.ModelUnavailableError as e:
        pytest.fail(f"the embedded model must be installed for the tests: {e}")
    return lm, ExactModel.from_loaded(lm)


PINS = {2: (EMBEDDED_EXACT_FINGERPRINT, PAYLOADS), 3: (EMBEDDED_EXACT_FINGERPRINT_3, PAYLOADS_3)}


@pytest.mark.parametrize("arithmetic", sorted(PINS))
def test_embedded_fingerprint_and_payloads_are_pinned(embedded, arithmetic):
    lm, exact = embedded
    exact = exact if arithmetic == 2 else ExactModel.from_loaded(lm, arithmetic)
    fingerprint, pinned_payloads = PINS[arithmetic]
    assert exact.fingerprint.hex() == fingerprint
    prefix = (lm.tokenizer.get_vocab()["<|endoftext|>"],)
    ids = lm.tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]
    chunks = [ids, ids[:3]]
    payloads = encode_chunks(exact, chunks, prefix)
    assert [p.hex() for p in payloads] == pinned_payloads
    assert decode_chunks(exact, payloads, [len(c) for c in chunks], prefix, batch_size=2) == chunks


def test_the_codec_checks_the_same_pins():
    from lmzip.kinds import lm as lm_kind

    assert lm_kind.EMBEDDED_FINGERPRINTS == {2: EMBEDDED_EXACT_FINGERPRINT, 3: EMBEDDED_EXACT_FINGERPRINT_3}
