"""Memory segments with the tiny test model: fit, verify, decode exactly."""

import copy
import io
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lmzip
from lmzip import container, segmenting
from lmzip.generate import greedy_decode
from lmzip.models import weights_fingerprint

from archive_edit import kinds
from conftest import TINY_MODEL, TINY_OPTIONS

SENTENCE = "Alice was beginning to get very tired of sitting by her sister on the bank."


@pytest.fixture(scope="module")
def sentence_archive(codec):
    return codec.encode(SENTENCE, **TINY_OPTIONS)


def test_text_goes_to_memory_and_comes_back(codec, sentence_archive):
    assert set(kinds(sentence_archive)) == {"memory"}
    assert codec.decode(sentence_archive) == SENTENCE.encode()
    info = lmzip.inspect(sentence_archive)
    # a local model is named by its directory's name, never its path
    assert info["model_id"] == "tiny-llama" and info["model_source"] == "local" and info["hidden_size"] == 128
    assert sum(s["token_count"] for s in info["segments"]) == len(SENTENCE)  # byte-level tokenizer


def test_bf16_fitting_still_verifies_in_float32(codec):
    blob = codec.encode(SENTENCE[:24], **{**TINY_OPTIONS, "bf16": True})
    assert "memory" in kinds(blob)
    assert codec.decode(blob) == SENTENCE[:24].encode()


def test_fitting_copy_computes_what_autocast_computes_and_leaves_the_decoder_alone(tiny):
    """The fit runs on a copy with bfloat16 Linear weights to skip autocast's per-step casts;
    with the same attention, its logits and gradient to the vectors are exactly those of
    autocast over the float32 model."""

    def logits_and_grad(model):
        gen = torch.Generator().manual_seed(7)
        x = (0.1 * torch.randn(2, 12, tiny.hidden_size, generator=gen)).requires_grad_(True)
        target = torch.randint(0, tiny.vocab_size, (2, 10), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.base_model(inputs_embeds=x, use_cache=False).last_hidden_state
            logits = model.get_output_embeddings()(hidden[:, 1:11]).float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target)
        return logits.detach(), torch.autograd.grad(loss, x)[0]

    fitting = tiny.fitting_copy()
    assert fitting is tiny.fitting_copy()  # made once
    assert fitting.get_output_embeddings().weight.dtype == torch.bfloat16
    assert fitting.config._attn_implementation == "eager"  # on the CPU
    # The decoder's model is untouched: the weights it was loaded with (tied ones too, in
    # float32), its own attention.
    assert all(p.dtype == torch.float32 for p in tiny.model.parameters())
    assert tiny.model.get_output_embeddings().weight.dtype == torch.float32
    assert weights_fingerprint(tiny.model) == tiny.legacy_weights_sha256
    assert tiny.model.config._attn_implementation == "sdpa"
    reference = copy.deepcopy(tiny.model)
    reference.set_attn_implementation("eager")
    for want, got in zip(logits_and_grad(reference), logits_and_grad(fitting)):
        assert torch.equal(want, got)


def test_invalid_utf8_and_exhausted_budget_go_to_zstd(codec):
    data = b"plain text here \xff\xfe\xfd more plain text"
    blob = codec.encode(data, **TINY_OPTIONS)
    assert "memory" in kinds(blob) and "zstd" in kinds(blob)
    assert codec.decode(blob) == data
    no_budget = codec.encode(data, **{**TINY_OPTIONS, "max_steps": 0})
    assert kinds(no_budget) == ["zstd"]  # the runs of zstd pieces merge into one frame
    assert codec.decode(no_budget) == data


def test_a_segment_out_of_steps_retries_with_more_vectors(codec):
    text = "The rabbit hole "  # 16 byte tokens: one vector cannot hold them in 40 steps
    options = {**TINY_OPTIONS, "tokens_per_segment": 16, "max_steps": 40}
    assert kinds(codec.encode(text, **options)) == ["zstd"]
    blob = codec.encode(text, **{**options, "max_vectors": 2})
    segments = lmzip.inspect(blob)["segments"]
    assert [(s["kind"], s["vector_count"]) for s in segments] == [("memory", 2)]
    assert lmzip.inspect(blob)["vectors_per_segment"] == 1  # what it started with
    assert codec.decode(blob) == text.encode()


def test_a_segment_is_fitted_only_if_its_largest_vector_count_fits_the_positions(codec, tiny):
    text = "a" * 1020  # the tiny model has 1024 positions: 1 prefix token + K vectors + 1020 tokens
    assert len(tiny.tokenizer(text, add_special_tokens=False)["input_ids"]) == 1020
    options = {**TINY_OPTIONS, "tokens_per_segment": 1020, "max_steps": 1}
    report = codec.encode_to(text, io.BytesIO(), **options)  # K may reach 1: fitted
    assert [f.region for f in report.fits] == [0]
    report = codec.encode_to(text, io.BytesIO(), **{**options, "max_vectors": 4})  # K may reach 4: not
    assert report.fits == [] and report.zstd_pieces == 1


def test_prefix_tokens_are_recorded_and_used(codec, sentence_archive, tiny):
    info = lmzip.inspect(sentence_archive)
    assert info["prefix_tokens"] == [256]  # the tiny tokenizer's end-of-text token
    archive = container.parse(sentence_archive)
    segment = archive.segments[0]
    vectors = np.frombuffer(archive.payload(0), dtype="<f2").reshape(segment.vector_count, -1)
    vectors = torch.from_numpy(vectors.astype(np.float32))
    with_prefix = greedy_decode(tiny, vectors, segment.token_count, (256,)).ids
    without = greedy_decode(tiny, vectors, segment.token_count).ids
    expected = tiny.tokenizer(SENTENCE, add_special_tokens=False)["input_ids"][: segment.token_count]
    assert with_prefix == expected and without != expected


GUARDED = "Rabbit hole"  # 11 byte tokens: memory-coded at a reachable margin


def test_margin_guard_control_reachable_margin_goes_to_memory(codec):
    blob = codec.encode(GUARDED, **{**TINY_OPTIONS, "tokens_per_segment": 16})
    assert kinds(blob) == ["memory"] and codec.decode(blob) == GUARDED.encode()


def test_margin_guard_in_greedy_verification_alone_sends_unreachable_margins_to_zstd(codec, monkeypatch):
    """With the float32 screen told that everything holds, only `verify`'s guard stands between
    an unreachable margin and a stored segment."""
    from lmzip import fit

    monkeypatch.setattr(fit, "_holding", lambda lm, candidates, margin, prefix: [len(ids) for _, ids in candidates])
    blob = codec.encode(GUARDED, **{**TINY_OPTIONS, "tokens_per_segment": 16, "margin": 60000.0,
                                    "max_steps": 20})
    assert kinds(blob) == ["zstd"]
    assert lmzip.inspect(blob)["margin"] == 60000.0


def test_verify_needs_every_token_and_every_gap(tiny, sentence_archive):
    from lmzip.fit import verify

    vectors, n = next(memory_segments(sentence_archive))
    prefix = (256,)
    ids = greedy_decode(tiny, vectors, n, prefix).ids
    decoded = greedy_decode(tiny, vectors, n, prefix)
    vectors16 = vectors.half()
    assert verify(tiny, vectors16, ids, decoded.min_margin, prefix) == (True, decoded.min_margin)
    assert verify(tiny, vectors16, ids, decoded.min_margin + 1e-3, prefix)[0] is False  # the guard
    wrong = ids[:-1] + [(ids[-1] + 1) % tiny.vocab_size]
    assert verify(tiny, vectors16, wrong, 0.0, prefix)[0] is False
    assert verify(tiny, vectors16, ids[:-1], 0.0, prefix)[0] is True  # a prefix of what it holds


@given(st.text(max_size=24))
@settings(max_examples=10)
def test_round_trip_any_text_through_the_memory_method(codec, text):
    blob = codec.encode(text, **TINY_OPTIONS)
    assert codec.decode(blob) == text.encode()


@given(st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=8, max_size=24))
@settings(max_examples=8)
def test_round_trip_printable_text_through_memory_segments(codec, text):
    blob = codec.encode(text, **{**TINY_OPTIONS, "max_vectors": 4})
    assert "memory" in kinds(blob)  # printable runs of 8 tokens and more are fitted
    assert codec.decode(blob) == text.encode()


def memory_segments(blob):
    archive = container.parse(blob)
    for i, s in enumerate(archive.segments):
        if s.kind == container.KIND_MEMORY:
            vectors = np.frombuffer(archive.payload(i), "<f2").reshape(s.vector_count, -1)
            yield torch.from_numpy(vectors.astype(np.float32)), s.token_count


def test_decoding_is_the_same_with_1_or_2_threads_and_without_kv_cache(codec, tiny, sentence_archive):
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for use_cache in (True, False):
                outputs.append([greedy_decode(tiny, v, n, use_cache=use_cache).ids
                                for v, n in memory_segments(sentence_archive)])
            assert codec.decode(sentence_archive) == SENTENCE.encode()
    finally:
        torch.set_num_threads(before)
    assert all(o == outputs[0] for o in outputs)


def test_another_model_is_refused_by_name_and_hash(codec, sentence_archive, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(TINY_MODEL, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(lmzip.ModelMismatchError, match="needs model 'tiny-llama' with weights sha256"):
        codec.decode(sentence_archive, model=str(other))


def test_missing_model_directory_is_a_clear_error(codec, tmp_path):
    with pytest.raises(lmzip.ModelUnavailableError, match="cannot load"):
        codec.encode("hello", **{**TINY_OPTIONS, "model": str(tmp_path / "nowhere")})


def test_zstd_archives_need_no_model(tmp_path):
    blob = lmzip.Codec(model=str(tmp_path / "nowhere")).encode(b"text", method="zstd")
    assert lmzip.Codec(model=str(tmp_path / "nowhere")).decode(blob) == b"text"


def test_bad_options_are_input_errors(codec):
    with pytest.raises(lmzip.InputError, match="unknown method"):
        codec.encode("x", method="gzip")
    with pytest.raises(lmzip.OptionError, match="^unknown encoder option: colour$"):
        codec.encode("x", **TINY_OPTIONS, colour="blue")
    with pytest.raises(lmzip.InputError, match="margin must be"):
        codec.encode("x", **{**TINY_OPTIONS, "margin": float("nan")})
    for bad in ({"lr": float("nan")}, {"lr": float("inf")}, {"hinge": float("nan")}):
        with pytest.raises(lmzip.OptionError, match="learning rate must be a positive number"):
            codec.encode("x", **{**TINY_OPTIONS, **bad})
    with pytest.raises(lmzip.InputError, match="batch size"):
        codec.encode("x", **{**TINY_OPTIONS, "batch_size": 0})
    with pytest.raises(lmzip.InputError, match="tokens per segment"):
        codec.encode("x", **{**TINY_OPTIONS, "tokens_per_segment": 0})
    with pytest.raises(lmzip.InputError, match="prefix must be"):
        codec.encode("x", **{**TINY_OPTIONS, "prefix": (10**6,)})
    with pytest.raises(lmzip.InputError, match="prefix must be"):
        codec.encode("x", **{**TINY_OPTIONS, "prefix": (1,) * 65})


def test_a_stream_offers_only_lengths_that_end_a_valid_piece(tiny):
    stream = segmenting.Stream(tiny.tokenizer, "aé b", max_tokens=64)
    assert len(stream.ids) == 5  # byte-level: "é" is two tokens
    assert stream.length_at_least(2) == 3  # 2 tokens would end inside "é"
    assert stream.length_at_most(2) == 1
    first = stream.take(3)
    assert first.data == "aé".encode() and first.ids == stream_ids(tiny, "aé")
    assert stream.ids == stream_ids(tiny, " b") and not stream.done
    with pytest.raises(ValueError):
        segmenting.Stream(tiny.tokenizer, "é", 64).take(1)
    assert stream.skip().data == b" b" and stream.done
    capped = segmenting.Stream(tiny.tokenizer, "ééx", max_tokens=3)
    assert capped.length_at_most(3) == 2 and capped.skip().data == "é".encode()  # 3 tokens end in "é"
    assert capped.text[capped.start :] == "éx"


def stream_ids(tiny, text):
    return tuple(tiny.tokenizer(text, add_special_tokens=False)["input_ids"])


GROWING = {**TINY_OPTIONS, "tokens_per_segment": None, "grow_tokens": 4}


def test_growing_segments_take_as_many_tokens_as_their_vectors_hold(codec):
    blob = codec.encode(SENTENCE, **{**GROWING, "start_tokens": 8, "max_steps": 100})
    lengths = [s["token_count"] for s in lmzip.inspect(blob)["segments"] if s["kind"] == "memory"]
    assert sum(lengths) == len(SENTENCE) and max(lengths) > 8  # some grew past the first length
    assert codec.decode(blob) == SENTENCE.encode()


def test_a_growing_segment_that_never_verifies_is_cut_shorter(codec):
    text = "The rabbit hole "  # 16 byte tokens: one vector cannot hold them in 40 steps
    blob = codec.encode(text, **{**GROWING, "start_tokens": 16, "max_steps": 40})
    segments = lmzip.inspect(blob)["segments"]
    assert len(segments) > 1 and all(s["kind"] == "memory" for s in segments)
    assert max(s["token_count"] for s in segments) < 16
    assert codec.decode(blob) == text.encode()


def test_growing_options_are_checked(codec):
    with pytest.raises(lmzip.InputError, match="start tokens"):
        codec.encode("x", **{**GROWING, "start_tokens": 300, "max_tokens": 256})


def test_growing_regions_give_a_batch_of_streams_to_mid_sized_texts():
    from lmzip.codec import region_tokens
    assert region_tokens(300, 8) == 128        # one region: nothing to fit beside it
    assert region_tokens(12_000, 8) == 375     # ~3,000 tokens: 8 regions, one per batch row
    assert region_tokens(5_000_000, 8) == 512  # long texts: long regions, fewer tails


def memory_entries(blob):
    return [s for s in lmzip.inspect(blob)["segments"] if s["kind"] == "memory"]


def test_a_segment_out_of_patience_keeps_the_longest_length_its_vectors_hold(codec):
    # Growing by 12 from 4, a segment could only close at 4 or at 16 and more (or at the end of
    # the text); one vector of the tiny model holds about 4 to 9 tokens, so a length in between
    # comes from what held when patience ran out.
    blob = codec.encode(SENTENCE, **{**GROWING, "start_tokens": 4, "grow_tokens": 12, "max_steps": 60})
    lengths = [s["token_count"] for s in memory_entries(blob)]
    assert any(4 < n < 16 for n in lengths[:-1])
    assert codec.decode(blob) == SENTENCE.encode()


@pytest.mark.parametrize("text, start_tokens", [
    ("The rabbit hole went", 12),  # 8 left: no more than the first length, so half of K
    ("The rabbit hole w", 4),      # 5 left: more than the first length, but the stream held 6 per vector
])
def test_a_grown_region_tail_gets_only_the_vectors_it_needs(codec, text, start_tokens):
    # byte tokens: the first segment is capped at 12 with 2 vectors
    blob = codec.encode(text, **{**GROWING, "vectors": 2, "start_tokens": start_tokens, "max_tokens": 12,
                                 "max_steps": 200})
    segments = memory_entries(blob)
    assert [(s["token_count"], s["vector_count"]) for s in segments] == [(12, 2), (len(text) - 12, 1)]
    assert codec.decode(blob) == text.encode()


def test_gap_to_runner_up_is_the_target_logit_minus_the_best_other():
    from lmzip.fit import _gap_to_runner_up
    logits = torch.tensor([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [2.0, 2.0, 0.0], [0.0, 5.0, 5.0]])
    target = torch.tensor([0, 2, 1, 0])
    assert _gap_to_runner_up(logits, target).tolist() == [1.0, -1.0, 0.0, -5.0]


def test_closing_segments_are_verified_together_and_alone_before_they_fail(tiny, sentence_archive, monkeypatch):
    from lmzip import fit

    (vectors, n), prefix = next(memory_segments(sentence_archive)), (256,)
    ids = greedy_decode(tiny, vectors, n, prefix).ids
    wrong = ids[:-1] + [(ids[-1] + 1) % tiny.vocab_size]
    good, bad = (vectors.half(), ids), (vectors.half(), wrong)
    assert [ok for ok, _ in fit.verify_all(tiny, [good, bad, good], 0.0, prefix)] == [True, False, True]
    batches = []
    real = fit.greedy_decode_batch

    def garbled(lm, jobs, prefix, batch_size):  # a batch that goes wrong: each row is verified alone
        batches.append(len(jobs))
        return [d.__class__([0] * len(d.ids), d.min_margin) for d in real(lm, jobs, prefix, batch_size=batch_size)]

    monkeypatch.setattr(fit, "greedy_decode_batch", garbled)
    assert [ok for ok, _ in fit.verify_all(tiny, [good, good], 0.0, prefix)] == [True, True]
    assert batches == [2]  # then each row alone, through greedy_decode, which held


def test_fitting_out_of_device_memory_names_the_batch_size(codec, monkeypatch):
    import torch

    import lmzip.codec

    def fit_regions(lm, items, fit):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        yield  # a generator, as the fitter is

    monkeypatch.setattr(lmzip.codec, "fit_regions", fit_regions)
    with pytest.raises(lmzip.DeviceMemoryError, match="fitting 8 segments at a time: give a smaller --batch-size"):
        codec.encode(SENTENCE, **TINY_OPTIONS)
