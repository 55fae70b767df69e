"""Arithmetic /3's calibration maxima kept in lmzip's cache (lmzip/exact/calibration_cache.py):
read back only when whole and of the model's shape, and never able to change the arithmetic."""

import pytest
import torch

from lmzip.exact import calibration_cache as cc
from lmzip.exact import smoothing
from lmzip.exact.model import ExactModel
from lmzip.kinds import lm as lm_kind
from lmzip.models import load_model

from conftest import TINY_MODEL
from test_lm3 import TINY_FINGERPRINT_3


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LMZIP_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def tiny_lm():
    return load_model(TINY_MODEL, device="cpu")


@pytest.fixture(scope="module")
def maxima(tiny_lm):
    return smoothing.calibration_maxima(ExactModel.from_loaded(tiny_lm), tiny_lm.tokenizer)


def shape_of(lm):
    return ExactModel.from_loaded(lm).shape


def same(a, b):
    return all(torch.equal(x, y) for name in ("attn", "mlp", "down")
               for x, y in zip(getattr(a, name), getattr(b, name))) and torch.equal(a.head, b.head)


def test_a_second_build_reads_the_maxima_and_makes_the_same_model(cache_dir, tiny_lm):
    first = ExactModel.from_loaded(tiny_lm, 3, cache="use")
    assert cc.cache_file(tiny_lm).is_file()
    calls = []
    cached = cc.cached_maxima(tiny_lm, first.shape, lambda: calls.append(1))
    assert not calls and cached is not None  # read, not computed
    second = ExactModel.from_loaded(tiny_lm, 3, cache="use")
    assert first.fingerprint.hex() == second.fingerprint.hex() == TINY_FINGERPRINT_3


def test_what_is_read_back_is_what_was_kept(cache_dir, tiny_lm, maxima):
    cc.write(cc.cache_file(tiny_lm), maxima)
    assert same(cc.read(cc.cache_file(tiny_lm), shape_of(tiny_lm)), maxima)


@pytest.mark.parametrize("damage", ["flip", "cut", "empty"])
def test_a_damaged_file_is_computed_again_and_rewritten(cache_dir, tiny_lm, maxima, damage):
    path = cc.cache_file(tiny_lm)
    cc.write(path, maxima)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
    path.write_bytes(b"" if damage == "empty" else bytes(data[:-1] if damage == "cut" else data))
    assert cc.read(path, shape_of(tiny_lm)) is None
    calls = []
    got = cc.cached_maxima(tiny_lm, shape_of(tiny_lm), lambda: calls.append(1) or maxima)
    assert calls and same(got, maxima)
    assert same(cc.read(path, shape_of(tiny_lm)), maxima)  # rewritten whole


def test_maxima_of_another_shape_or_sign_are_refused(tiny_lm, maxima):
    short = smoothing.Maxima(maxima.attn[:-1], maxima.mlp[:-1], maxima.down[:-1], maxima.head)
    assert cc.decode(cc.encode(short), shape_of(tiny_lm)) is None
    narrow = smoothing.Maxima([maxima.attn[0][:-1]] + maxima.attn[1:], maxima.mlp, maxima.down, maxima.head)
    assert cc.decode(cc.encode(narrow), shape_of(tiny_lm)) is None
    negative = smoothing.Maxima(maxima.attn, maxima.mlp, maxima.down, -maxima.head - 1)
    assert cc.decode(cc.encode(negative), shape_of(tiny_lm)) is None
    assert same(cc.decode(cc.encode(maxima), shape_of(tiny_lm)), maxima)


def test_a_cache_path_that_is_not_a_directory_is_skipped(tmp_path, monkeypatch, tiny_lm, maxima):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    monkeypatch.setenv("LMZIP_CACHE_DIR", str(blocker))
    assert same(cc.cached_maxima(tiny_lm, shape_of(tiny_lm), lambda: maxima), maxima)


def test_the_codec_makes_a_pinned_model_anew_from_a_cache_with_other_maxima(cache_dir, monkeypatch, maxima):
    """A cache file whose digest holds but whose maxima are not the model's (edited, or a bug) must
    not move the arithmetic: where the fingerprint is pinned, the model is made from a fresh pass."""
    lm = load_model(TINY_MODEL, device="cpu")
    other = smoothing.Maxima([m * 64 for m in maxima.attn], maxima.mlp, maxima.down, maxima.head)
    cc.write(cc.cache_file(lm), other)
    assert ExactModel.from_loaded(lm, 3, cache="use").fingerprint.hex() != TINY_FINGERPRINT_3  # it would
    monkeypatch.setattr(lm_kind, "pinned", lambda lm, arithmetic: TINY_FINGERPRINT_3 if arithmetic == 3 else None)
    assert lm_kind.exact_model(lm, 3).fingerprint.hex() == TINY_FINGERPRINT_3
    assert same(cc.read(cc.cache_file(lm), shape_of(lm)), maxima)  # and the cache is right again
