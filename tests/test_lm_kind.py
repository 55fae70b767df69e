"""The lm segment kind through the codec: range-coded tokens under the exact model (tiny model)."""

import os
import time

import pytest

import lmzip
from lmzip import container
from lmzip.kinds import lm as lm_kind
from lmzip.kinds import lm_long
from lmzip.sharding import can_fork

from archive_edit import edit_entry, entries, flip, kinds
from conftest import TINY_MODEL

TEXT = b"Alice was beginning to get very tired of sitting by her sister on the bank. \xff\xfe binary " * 3


@pytest.fixture(scope="module")
def lm_archive(codec):
    """One segment per chunk under arithmetic /2, as before lm-packed (test_lm_packed.py packs them,
    test_lm3.py codes under /3)."""
    return codec.encode(TEXT, method="lm", model=TINY_MODEL, tokens_per_segment=24, pack_lm=False, lm_arithmetic=2)


def test_text_goes_to_lm_segments_and_comes_back(codec, lm_archive):
    assert set(kinds(lm_archive)) == {"lm", "zstd"}  # the invalid UTF-8 runs go to zstd
    assert all(s["vector_count"] == 0 for s in lmzip.inspect(lm_archive)["segments"])
    assert codec.decode(lm_archive, model=TINY_MODEL) == TEXT


@pytest.mark.parametrize("batch_size", [1, 2, 7, 64])
def test_the_same_bytes_at_any_batch_size(codec, lm_archive, batch_size):
    assert codec.decode(lm_archive, model=TINY_MODEL, batch_size=batch_size) == TEXT


def test_a_damaged_lm_payload_is_a_damaged_segment(codec, lm_archive):
    first = kinds(lm_archive).index("lm")
    e = entries(lm_archive)[first]
    damaged = flip(lm_archive, e["payload_offset"] + 1, 0x40)
    damaged = edit_entry(damaged, first, payload_crc32=container.crc32(
        damaged[e["payload_offset"]: e["payload_offset"] + e["payload_length"]]))
    with pytest.raises(lmzip.SegmentError, match=f"damaged segment {first}"):
        codec.decode(damaged, model=TINY_MODEL)


def test_lm_entries_are_bounded(lm_archive):
    first = kinds(lm_archive).index("lm")
    header = container.parse(lm_archive).header
    entry = container.Segment(lm_kind.KIND, original_length=100, payload_length=8 * 10 + 17, payload_offset=0,
                              crc32=0, token_count=10)
    assert "too long" in lm_kind.check_entry(entry, header)
    assert lm_kind.check_entry(container.Segment(**{**entry.__dict__, "payload_length": 96}), header) is None
    with pytest.raises(lmzip.SegmentTableError, match="vector count"):
        lmzip.inspect(edit_entry(lm_archive, first, vector_count=1))


def test_lm_token_counts_are_bounded_by_each_kinds_positions(lm_archive):
    header = container.parse(lm_archive).header  # one prefix token

    def entry(kind, tokens):
        return container.Segment(kind, original_length=10_000, payload_length=100, payload_offset=0, crc32=0,
                                 token_count=tokens)

    assert lm_kind.check_entry(entry(2, 2047), header) is None
    assert "2048 positions" in lm_kind.check_entry(entry(2, 2048), header)
    assert lm_long.check_entry(entry(3, 2048), header) is None
    assert lm_long.check_entry(entry(3, 8191), header) is None
    assert "8192 positions" in lm_long.check_entry(entry(3, 8192), header)


def test_a_chunk_that_does_not_decode_back_goes_to_zstd(codec, monkeypatch):
    import lmzip.exact

    real = lmzip.exact.check_chunks
    monkeypatch.setattr(lmzip.exact, "check_chunks", lambda exact, chunks, payloads, prefix, **kw:
                        real(exact, [[0] * len(c) for c in chunks], payloads, prefix, **kw))  # other tokens
    blob = codec.encode(TEXT[:60], method="lm", model=TINY_MODEL, tokens_per_segment=24, pack_lm=False,
                        lm_arithmetic=2)
    monkeypatch.setattr(lmzip.exact, "check_chunks", real)
    # the first chunk is in the checked sample and fails: zstd; the others were not checked
    assert kinds(blob)[0] == "zstd" and "lm" in kinds(blob)
    assert codec.decode(blob, model=TINY_MODEL) == TEXT[:60]


@pytest.fixture
def two_cores():
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


forking = pytest.mark.skipif(not can_fork(), reason="the check runs beside the coding where it can fork")


@forking
def test_the_sample_is_coded_first_and_checked_in_one_call_beside_the_rest(codec, monkeypatch, tmp_path,
                                                                           two_cores):
    """Every 16th chunk of the whole text is coded first, then decoded in one batched call in a forked
    process while this one codes the rest (a chunk decoded alone is several times slower per token,
    and would leave the other core idle). Every sampled chunk fails here."""
    import os
    import time

    import lmzip.exact

    log = tmp_path / "events"  # written by both processes

    def event(line):
        with open(log, "a") as f:
            f.write(line + "\n")

    real_code = lm_kind.code

    def coding(lm, pieces, prefix, done=None, threads=None, arithmetic=2, contexts=None, heads=None):
        event(f"code {len(pieces)} {threads}")
        return real_code(lm, pieces, prefix, done=done, threads=threads, arithmetic=arithmetic, contexts=contexts,
                         heads=heads)

    def failing_check(exact, chunks, payloads, prefix, **kw):
        event(f"check {len(chunks)} {os.getpid()}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the parent codes a chunk beside this check
            events = log.read_text().splitlines()
            if any(e.startswith("code") for e in events[events.index(f"check {len(chunks)} {os.getpid()}"):]):
                event("checked beside the coding")
                break
            time.sleep(0.01)
        return set(range(len(chunks)))

    monkeypatch.setattr(lm_kind, "code", coding)
    monkeypatch.setattr(lmzip.exact, "check_chunks", failing_check)
    text = TEXT[:60] * 12
    blob = codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=4, pack_lm=False,
                        progress=lambda p: event(f"progress {p.done}"))
    monkeypatch.undo()
    found, events = kinds(blob), log.read_text().splitlines()
    done = [int(e.split()[1]) for e in events if e.startswith("progress")]
    sample = range(0, len(found), 16)
    checks = [e.split() for e in events if e.startswith("check ")]
    assert len(found) > 32 and len(checks) == 1 and checks[0][1] == str(len(sample))
    assert checks[0][2] != str(os.getpid())  # in a child
    assert [e for e in events if e.startswith("code")][0] == f"code {len(sample)} 2"  # the sample first, on both cores
    assert "checked beside the coding" in events and "code 1 1" in events  # the rest on the other core
    assert [i for i, kind in enumerate(found) if kind == "zstd"] == list(sample)
    assert done == sorted(done) and done[-1] == len(text)
    assert codec.decode(blob, model=TINY_MODEL) == text


def first_chunk_fails(real):
    """check_chunks that expects other tokens of the first chunk of each call (the sample's first)."""
    def check(exact, chunks, payloads, prefix, **kw):
        return real(exact, [[0] * len(chunks[0])] + list(chunks[1:]), payloads, prefix, **kw)
    return check


@pytest.mark.parametrize("options,kind", [({"lm_mix": False}, "lm3"), ({"lm_head": 0}, "lm3-group"),
                                          ({}, "lm3-head")])
def test_the_archive_is_the_same_with_the_check_beside_or_after(codec, two_cores, monkeypatch, options, kind):
    import torch

    import lmzip.exact

    text = TEXT[:60] * 12
    monkeypatch.setattr(lmzip.exact, "check_chunks", first_chunk_fails(lmzip.exact.check_chunks))
    beside = codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=4, **options)
    torch.set_num_threads(1)  # one core: the check runs here, before the rest is coded
    assert codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=4, **options) == beside
    monkeypatch.undo()
    assert kinds(beside)[:2] == ["zstd", kind] and codec.decode(beside, model=TINY_MODEL) == text


@forking
def test_a_check_process_that_dies_costs_its_time_not_the_run(codec, two_cores, monkeypatch, tmp_path):
    """The check runs here once the rest is coded, with the same outcome."""
    import os
    import signal

    import lmzip.exact

    text, parent, here = TEXT[:60] * 12, os.getpid(), []
    real = first_chunk_fails(lmzip.exact.check_chunks)
    killed = tmp_path / "killed"

    def killed_in_a_child(exact, chunks, payloads, prefix, **kw):
        if os.getpid() != parent:
            killed.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        here.append(len(chunks))
        return real(exact, chunks, payloads, prefix, **kw)

    monkeypatch.setattr(lmzip.exact, "check_chunks", killed_in_a_child)
    blob = codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=4, lm_mix=False)
    monkeypatch.undo()
    assert killed.exists() and here == [12] and kinds(blob)[:2] == ["zstd", "lm3"]
    assert codec.decode(blob, model=TINY_MODEL) == text


@forking
@pytest.mark.parametrize("fate", ["killed", "hung"])
def test_a_check_process_killed_or_hung_leaves_its_states_to_the_check_here(codec, two_cores, monkeypatch,
                                                                           tmp_path, fate):
    """A check process journals its rows' states as it goes. Killed (as the out-of-memory killer
    would), or hung (a lock a fork left held, say: stopped once it makes no progress), the check
    run here after the coding goes on from them, and the archive is the one a run without either
    makes."""
    import signal

    import lmzip.exact
    from lmzip import sharding
    from lmzip.exact import coding

    text, parent, resumed = TEXT[:60] * 12, os.getpid(), []
    monkeypatch.setattr(coding, "CHECK_NOTE_STEPS", 2)
    fresh = codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=4)
    real = lmzip.exact.check_chunks

    def cut_short_after_a_report(exact, chunks, payloads, prefix, progress=None, **kw):
        if os.getpid() == parent:
            resumed.append(kw["resume"])
            return real(exact, chunks, payloads, prefix, progress=progress, **kw)

        def report_then_stop(*args):
            progress(*args)
            if fate == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)

        return real(exact, chunks, payloads, prefix, progress=report_then_stop, **kw)

    monkeypatch.setattr(lmzip.exact, "check_chunks", cut_short_after_a_report)
    monkeypatch.setattr(sharding, "STALL_SECONDS", 2.0)
    start = time.monotonic()
    blob = codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=4, journal=tmp_path / "j")
    assert blob == fresh and len(resumed) == 1 and time.monotonic() - start < 120
    assert [tokens for tokens, _ in resumed[0].values()] == [2]  # the report the process made


@forking
def test_slow_decoding_steps_are_progress_not_a_hang(codec, two_cores, monkeypatch):
    """Each decoding step of a forked process reports progress: steps that take longer than the
    stall limit in all are not stopped (nor redone here)."""
    from lmzip import sharding
    from lmzip.exact import coding

    text = TEXT[:60] * 12
    blob = codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=40)
    real = coding.forward

    def slow(*args, **kwargs):
        time.sleep(0.1)
        return real(*args, **kwargs)

    monkeypatch.setattr(coding, "forward", slow)
    monkeypatch.setattr(sharding, "STALL_SECONDS", 1.5)
    monkeypatch.setattr(sharding, "_result_or_here", lambda child, run, indices: child.result())  # no redo
    assert codec.decode(blob, model=TINY_MODEL) == text  # 41 steps of 0.1 s in each process


def test_a_sampled_chunk_the_decoder_cannot_follow_fails_alone(codec, monkeypatch):
    """A payload whose range decoder stops in an error fails its own row; the batch goes on."""
    import lmzip.exact

    real, calls = lmzip.exact.check_chunks, []

    def first_damaged(exact, chunks, payloads, prefix, **kw):
        calls.append(len(chunks))
        return real(exact, chunks, [payloads[0] + b"\x07\x00\x01"] + list(payloads[1:]), prefix, **kw)

    text = TEXT[:60] * 12
    monkeypatch.setattr(lm_kind, "check_shards", lambda *a: [])  # the check here, where calls are seen
    monkeypatch.setattr(lmzip.exact, "check_chunks", first_damaged)
    blob = codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=4, lm_mix=False)
    monkeypatch.undo()
    assert calls == [12] and kinds(blob)[:2] == ["zstd", "lm3"]
    assert kinds(blob).count("zstd") == 1  # that chunk alone
    assert codec.decode(blob, model=TINY_MODEL) == text


def test_payloads_fit_the_bound(lm_archive):
    for e in entries(lm_archive):
        if e["kind"] == lm_kind.KIND:
            assert e["payload_length"] <= lm_kind.MAX_PAYLOAD_BYTES_PER_TOKEN * e["token_count"]


def test_a_host_that_lowered_float32_precision_still_gets_the_exact_arithmetic(codec):
    import torch

    torch.set_float32_matmul_precision("high")
    try:
        blob = codec.encode(TEXT[:60], method="lm", model=TINY_MODEL)
        assert codec.decode(blob, model=TINY_MODEL) == TEXT[:60]
        assert torch.get_float32_matmul_precision() == "high"  # the host's setting, given back
    finally:
        torch.set_float32_matmul_precision("highest")


def test_a_chunk_past_2048_positions_is_an_lm_long_segment(codec):
    text = b"Alice was beginning to get very tired of sitting by her sister on the bank. " * 28
    blob = codec.encode(text, method="lm", model=TINY_MODEL, tokens_per_segment=8191, lm_arithmetic=2)
    segments = lmzip.inspect(blob)["segments"]
    assert [s["kind"] for s in segments] == ["lm-long"] and segments[0]["token_count"] > 2047
    assert codec.decode(blob, model=TINY_MODEL) == text  # (what fits 2048 positions stays kind 2: above)


def test_decode_batches_fill_the_memory_bound():
    """Rows per decoding batch: the cache's budget of 16 x 2048 positions, at most 64 rows."""
    assert [lm_kind.decode_rows(p) for p in (8192, 2048, 1024, 513, 100)] == [4, 16, 32, 63, 64]


def test_an_empty_text_needs_no_check(codec):
    blob = codec.encode(b"", method="lm", model=TINY_MODEL)
    assert kinds(blob) == [] and codec.decode(blob, model=TINY_MODEL) == b""


@forking
def test_the_check_gets_a_process_per_batch_of_rows_on_all_cores_but_one(monkeypatch):
    from lmzip.segmenting import Piece

    pieces = [Piece(b"x", tuple(range(2047)))] * 40  # 16 decoding rows a batch at 2048 positions
    sample = list(range(40))
    for cores, processes in ((1, 0), (2, 1), (3, 2), (8, 3)):
        monkeypatch.setattr(lm_kind, "cores", lambda lm: cores)
        shards = lm_kind.check_shards(None, pieces, (0,), sample)
        assert len(shards) == processes
        assert sorted(i for shard in shards for i in shard) == (sample if processes else [])


def test_lm_chunks_decode_on_every_cpu_thread_when_the_model_is_on_a_gpu(codec, lm_archive, two_cores, monkeypatch):
    """On a GPU host the codec's context says one thread (memory segments' batches go to the GPU),
    but the lm kinds' exact arithmetic runs on the CPU: it must take every CPU thread."""
    import lmzip.exact

    asked = []
    real = lmzip.exact.decode_chunks
    monkeypatch.setattr(lmzip.exact, "decode_chunks", lambda *a, **k: asked.append(k["threads"]) or real(*a, **k))
    archive = container.parse(lm_archive)
    jobs = [lmzip.kinds.DecodeJob(i, s, bytes(archive.payload(i)))
            for i, s in enumerate(archive.segments) if s.kind == lm_kind.KIND]
    ctx = lmzip.kinds.DecodeContext(archive.header, codec.model(TINY_MODEL), batch_size=128, threads=1)
    decoded = lm_kind.decode(jobs, ctx)
    assert all(container.crc32(data) == job.entry.crc32 for data, job in zip(decoded, jobs))
    assert asked == [2]
