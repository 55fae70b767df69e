"""Kind 5, lm3: lm chunks under arithmetic /3, /2's forward pass over weights smoothed by powers
of two measured on lmzip's calibration text (lmzip/exact/smoothing.py)."""

import hashlib

import pytest
import torch

import lmzip
from lmzip import container
from lmzip.container import crc32
from lmzip.exact import forward as F
from lmzip.exact import smoothing
from lmzip.exact.model import ExactModel, float_weights
from lmzip.kinds import lm3, lm_packed

from archive_edit import edit_entry, entries, kinds
from conftest import TINY_MODEL

TEXT = b"Alice was beginning to get very tired of sitting by her sister on the bank. \xff\xfe binary " * 3
# Pins of /3 on the tiny model: a change to the smoothing, the calibration text or /2 moves them.
TINY_FINGERPRINT_3 = "96278ef5c436700994732e382a5ed2ae4ec3c807d1aac0d0e51451b70c69c126"
CALIBRATION_SHA256 = "0b1b3fa5e5d5cbf5960f24e082ef6000150b5dec81fa7af994d06f02100a58e9"  # as SPEC.md 1.6
TINY_FREQ_SHA256_3 = "ca7d323173bc315c3b6875b87ff77251ef990deb08f8c88c0da68cacd993f648"


@pytest.fixture(scope="module")
def exact2(tiny):
    return ExactModel.from_loaded(tiny)


def _freq_digest(exact, ids):
    logits = F.forward(exact, ids, F.Cache(exact.shape, ids.shape[0], ids.shape[1], "cpu"))
    return hashlib.sha256(F.frequencies(exact, logits).numpy().tobytes()).hexdigest()


def _ids():
    return torch.randint(0, 257, (2, 30), generator=torch.Generator().manual_seed(0))


def test_lm_method_writes_lm3_and_it_comes_back(codec):
    blob = codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=8, lm_mix=False)
    assert kinds(blob) == ["lm3", "zstd"] * 3 + ["lm3"]  # a lone chunk too: kind 5 has no loose form
    assert codec.decode(blob, model=TINY_MODEL) == TEXT
    loose = codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=8, pack_lm=False)
    assert kinds(loose).count("lm3") > kinds(blob).count("lm3")
    assert codec.decode(loose, model=TINY_MODEL) == TEXT


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_the_same_bytes_at_any_batch_size(codec, batch_size):
    blob = codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=8)
    assert codec.decode(blob, model=TINY_MODEL, batch_size=batch_size) == TEXT


def test_the_kind_chooses_the_arithmetic(codec):
    """The same chunks under /2 and /3 code differently, and a kind 5 segment relabelled as kind 4
    (the same layout, decoded under /2) fails its check instead of returning other bytes."""
    blob3 = codec.encode(TEXT[:70], method="lm", model=TINY_MODEL, tokens_per_segment=8, lm_mix=False)
    blob2 = codec.encode(TEXT[:70], method="lm", model=TINY_MODEL, tokens_per_segment=8, lm_arithmetic=2)
    assert kinds(blob3) == ["lm3"] and kinds(blob2) == ["lm-packed"]
    payload = lambda b: b[entries(b)[0]["payload_offset"]:]  # noqa: E731
    assert payload(blob3) != payload(blob2)
    relabelled = edit_entry(blob3, 0, kind=lm_packed.KIND)
    with pytest.raises(lmzip.SegmentError, match="damaged segment 0"):
        codec.decode(relabelled, model=TINY_MODEL)


def test_unknown_arithmetic_is_refused(codec, tiny):
    with pytest.raises(lmzip.OptionError, match="lm arithmetic"):
        codec.encode(TEXT, method="lm", model=TINY_MODEL, lm_arithmetic=1)
    with pytest.raises(ValueError, match="unknown exact arithmetic /4"):
        ExactModel.from_loaded(tiny, 4)


def test_exponents_are_half_the_binary_logarithm_of_the_ratio():
    x = torch.tensor([1.0, 4.0, 2.0, 3.9, 0.25, 0.3, 0.0, 1.0, 1e30, 1e-30], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.00, 1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    # log2 of the ratio: 0, 2, 1, 1.96, -2, -1.74 (floor -2), none, none, 99.7, -99.7
    assert smoothing.exponents(x, w).tolist() == [0, 1, 1, 1, -1, -1, 0, 0, 16, -16]


def test_smoothing_leaves_every_product_of_the_float_model_as_it_was(tiny):
    """Each factor 2**e divides the input side and multiplies the weight side: exact in float32, so
    norm weight times weight column (and up row times down column) is unchanged, bit for bit."""
    shape, w = float_weights(tiny.model)
    exact = ExactModel.from_weights(shape, w)
    w = float_weights(tiny.model)[1]
    w.layers = list(w.layers)
    smooth = smoothing.smoothed_weights(smoothing.calibration_maxima(exact, tiny.tokenizer), w)
    smooth.layers = list(smooth.layers)
    assert any(not torch.equal(a.qkv, b.qkv) for a, b in zip(w.layers, smooth.layers))  # it did smooth
    inter = shape.intermediate
    for a, b in zip(w.layers, smooth.layers):
        assert torch.equal(a.qkv * a.attn_norm, b.qkv * b.attn_norm)
        assert torch.equal(a.gate_up[:inter] * a.mlp_norm, b.gate_up[:inter] * b.mlp_norm)  # gate rows
        down_factor = b.down[0] / a.down[0]  # column n of down times 2**e_n: up row n divided by it
        assert torch.equal(a.down, b.down / down_factor)
        assert torch.equal(a.gate_up[inter:] * a.mlp_norm, b.gate_up[inter:] * b.mlp_norm * down_factor[:, None])
        assert torch.equal(a.o, b.o)
    assert torch.equal(w.head * w.final_norm, smooth.head * smooth.final_norm)
    assert torch.equal(w.embed, smooth.embed)


def test_pinned_fingerprint_and_frequencies(exact3, exact2):
    assert exact3.arithmetic == 3 and exact3.fingerprint != exact2.fingerprint
    assert exact3.fingerprint.hex() == TINY_FINGERPRINT_3
    assert _freq_digest(exact3, _ids()) == TINY_FREQ_SHA256_3


def test_calibration_text_is_pinned(monkeypatch):
    text = smoothing.calibration_text()
    assert hashlib.sha256(text.encode()).hexdigest() == CALIBRATION_SHA256 == smoothing.CALIBRATION_SHA256
    assert "\r\n" in text and "\t" in text
    monkeypatch.setattr(smoothing, "CALIBRATION_SHA256", "0" * 64)
    with pytest.raises(lmzip.ModelError, match="reinstall"):
        smoothing.calibration_text()


def test_lm3_entries_are_bounded_as_lm_packed_ones(codec):
    from dataclasses import replace

    blob = codec.encode(TEXT[:70], method="lm", model=TINY_MODEL, tokens_per_segment=8, lm_mix=False)
    header = container.parse(blob).header
    entry = container.Segment(lm3.KIND, original_length=100, payload_length=lm_packed.max_payload(10),
                              payload_offset=0, crc32=0, token_count=10)
    assert lm3.check_entry(entry, header) is None
    for change, problem in [({"payload_length": lm_packed.max_payload(10) + 1}, "too long"),
                            ({"token_count": 0}, "token count"), ({"vector_count": 1}, "an lm3 segment")]:
        assert problem in lm3.check_entry(container.Segment(**{**entry.__dict__, **change}), header)
    assert "an lm3 segment in an archive that names no model" in lm3.check_entry(entry, replace(header, prefix=()))
    with pytest.raises(lmzip.SegmentTableError, match="too long for 70 tokens"):
        lmzip.inspect(edit_entry(blob, 0, payload_length=lm_packed.max_payload(70) + 1))
    assert lmzip.kinds.get(5) is lm3


@pytest.mark.parametrize("options,name", [({"lm_mix": False}, "lm3"), ({"lm_head": 0}, "lm3-group"), ({}, "lm3-head")])
def test_a_damaged_chunk_table_names_the_kind(codec, options, name):
    blob = codec.encode(TEXT[:70], method="lm", model=TINY_MODEL, tokens_per_segment=8, **options)
    e = entries(blob)[0]
    start = e["payload_offset"]
    at = start + (name == "lm3-head")  # kind 7's table follows its head's varint
    damaged = blob[:at] + bytes([blob[at] + 1]) + blob[at + 1:]  # one chunk more than the table holds
    damaged = edit_entry(damaged, 0, payload_crc32=crc32(damaged[start:start + e["payload_length"]]))
    with pytest.raises(lmzip.SegmentError, match=f"damaged {name} payload"):
        codec.decode(damaged, model=TINY_MODEL)


def test_an_exact_form_of_the_embedded_model_other_than_the_pinned_one_is_refused(tiny, monkeypatch):
    """A torch or tokenizers that rounds or tokenizes otherwise would make archives nobody else
    decodes: the embedded model's exact forms are checked against their pinned fingerprints."""
    import copy

    from lmzip.kinds import lm as lm_kind

    def as_embedded():
        fake = copy.copy(tiny)
        fake.__dict__.pop("_exact3", None)
        object.__setattr__(fake, "source", "embedded")
        return fake

    monkeypatch.setitem(lm_kind.EMBEDDED_FINGERPRINTS, 3, "0" * 64)
    with pytest.raises(lmzip.ModelError, match="another exact form of the embedded model under arithmetic /3"):
        lm_kind.exact_model(as_embedded(), 3)
    monkeypatch.setitem(lm_kind.EMBEDDED_FINGERPRINTS, 3, TINY_FINGERPRINT_3)
    assert lm_kind.exact_model(as_embedded(), 3).fingerprint.hex() == TINY_FINGERPRINT_3


def test_a_scaling_that_would_round_is_refused():
    """Powers of two scale exactly only inside float32's normal range (below it a result rounds, or
    is flushed to zero on hosts that flush subnormals)."""
    assert torch.equal(smoothing._scaled(torch.tensor([3.0, -5e-30]), torch.tensor([2.0 ** -16, 2.0 ** 16])),
                       torch.tensor([3.0 * 2 ** -16, -5e-30 * 2 ** 16]))
    with pytest.raises(lmzip.ModelError, match="leaves float32's normal range"):
        smoothing._scaled(torch.tensor([1e-38 * 3]), torch.tensor([2.0 ** -16]))  # rounds
    with pytest.raises(lmzip.ModelError, match="leaves float32's normal range"):
        smoothing._scaled(torch.tensor([2.0 ** -120]), torch.tensor([2.0 ** -16]))  # exact, but subnormal
