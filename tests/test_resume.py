"""Resumable runs (a journal beside the output) and fitting in several worker processes."""

import io
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import psutil
import pytest

import lmzip
from lmzip import fit as fit_module
from lmzip import journal as journal_module
from lmzip.kinds import lm as lm_kind

from archive_edit import kinds
from conftest import ROOT, TINY_MODEL, TINY_OPTIONS

TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, "
        "and of having nothing to do: once or twice she had peeped into the book.")
OPTIONS = {**TINY_OPTIONS, "tokens_per_segment": None, "start_tokens": 12, "grow_tokens": 8, "max_steps": 60}


def counting_fits(monkeypatch):
    """Count the segments the fitter closes (journaled ones are not fitted again)."""
    closed = []
    real = fit_module.fit_regions

    def counted(lm, regions, cfg):
        for key, segment in real(lm, regions, cfg):
            closed.append(len(segment.data))
            yield key, segment

    monkeypatch.setattr("lmzip.codec.fit_regions", counted)
    return closed


def test_a_rerun_after_a_crash_fits_only_what_is_missing(codec, tmp_path, monkeypatch):
    journal = tmp_path / "doc.lmz.journal"
    closed = counting_fits(monkeypatch)
    fresh = codec.encode(TEXT, **OPTIONS)
    fresh_count = len(closed)
    assert fresh_count >= 3 and "memory" in kinds(fresh)

    closed.clear()
    real = fit_module.fit_regions

    def crashing(lm, regions, cfg):  # dies after two segments, as a kill would
        for n, item in enumerate(real(lm, regions, cfg)):
            if n == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr("lmzip.codec.fit_regions", crashing)
    with pytest.raises(KeyboardInterrupt):
        codec.encode(TEXT, journal=journal, **OPTIONS)
    assert len(list(journal.glob("*.seg"))) == 2

    closed = counting_fits(monkeypatch)
    out = io.BytesIO()
    assert codec.encode_to(TEXT, out, journal=journal, **OPTIONS).resumed == 2
    blob = out.getvalue()
    assert len(closed) < fresh_count  # the two journaled segments were not fitted again
    assert codec.decode(blob) == TEXT.encode()
    assert "memory" in kinds(blob)


def test_a_journal_of_other_input_or_options_is_refused(codec, tmp_path):
    journal = tmp_path / "j"
    codec.encode(TEXT, journal=journal, **{**OPTIONS, "max_steps": 0})
    with pytest.raises(lmzip.JournalError, match="another compression \\(its input, regions differ"):
        codec.encode(TEXT + "!", journal=journal, **{**OPTIONS, "max_steps": 0})
    with pytest.raises(lmzip.JournalError, match="its fitting options differ"):
        codec.encode(TEXT, journal=journal, **{**OPTIONS, "max_steps": 0, "lr": 0.3})
    manifest = journal / journal_module.MANIFEST
    manifest.write_text(manifest.read_text().replace(f'"lmzip": "{lmzip.__version__}"', '"lmzip": "0.0.1"'))
    with pytest.raises(lmzip.JournalError, match="its lmzip version differ"):  # it may have coded otherwise
        codec.encode(TEXT, journal=journal, **{**OPTIONS, "max_steps": 0})
    (tmp_path / "not-a-journal").mkdir()
    (tmp_path / "not-a-journal" / "x").write_text("x")
    with pytest.raises(lmzip.JournalError, match="is not a journal"):
        codec.encode(TEXT, journal=tmp_path / "not-a-journal", **OPTIONS)


def test_a_damaged_segment_file_is_refitted_from_there(codec, tmp_path, monkeypatch):
    journal = tmp_path / "j"
    codec.encode(TEXT, journal=journal, **OPTIONS)
    files = sorted(journal.glob("*.seg"))
    assert len(files) >= 3
    files[1].write_bytes(files[1].read_bytes()[:-1])  # truncated: the segments from it on are refitted
    closed = counting_fits(monkeypatch)
    blob = codec.encode(TEXT, journal=journal, **OPTIONS)
    assert codec.decode(blob) == TEXT.encode() and len(closed) >= 1


KILLED = """
import sys, lmzip
codec = lmzip.Codec(model=sys.argv[1], device="cpu")
options = dict(tokens_per_segment=None, start_tokens=12, grow_tokens=8, max_steps=60, vectors=1, max_vectors=1,
               lr=0.1, margin=0.5, batch_size=8, hinge=1.0, bf16=False)
with open(sys.argv[3], "wb") as out:
    codec.encode_to(sys.argv[2], out, journal=sys.argv[4], **options)
"""


def test_kill_9_half_way_then_rerun(codec, tmp_path, monkeypatch):
    journal = tmp_path / "doc.lmz.journal"
    child = subprocess.Popen([sys.executable, "-c", KILLED, TINY_MODEL, TEXT, str(tmp_path / "doc.lmz"),
                              str(journal)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while len(list(journal.glob("*.seg"))) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    kept = len(list(journal.glob("*.seg")))
    assert kept >= 2 and not list(journal.glob(".*.part"))  # whole segments only
    closed = counting_fits(monkeypatch)
    blob = codec.encode(TEXT, journal=journal, **OPTIONS)
    assert codec.decode(blob) == TEXT.encode()
    assert len(closed) + kept >= 3


LM = dict(method="lm", model=TINY_MODEL, tokens_per_segment=24)
LM_TEXT = TEXT * 3  # over 16 chunks of 24 byte tokens: two of the codec's batches of 16
REAL_CODE = lm_kind.code


def coded_chunks(monkeypatch, crash_on_call: int | None = None, crash_after_chunks: int | None = None) -> list[int]:
    """Count the chunks the lm kind codes, call by call. With `crash_on_call`, that call dies as a
    kill would; with `crash_after_chunks`, the run dies once that many chunks are journaled."""
    counts = []
    journaled = []

    def counted(lm, pieces, prefix, done=None, threads=None, arithmetic=2, contexts=None, heads=None):
        if len(counts) + 1 == crash_on_call:
            raise KeyboardInterrupt

        def kept(i, payload):
            done(i, payload)
            journaled.append(i)
            if len(journaled) == crash_after_chunks:
                raise KeyboardInterrupt

        counts.append(len(pieces))
        return REAL_CODE(lm, pieces, prefix, done=kept if done else None, threads=threads, arithmetic=arithmetic,
                         contexts=contexts, heads=heads)

    monkeypatch.setattr(lm_kind, "code", counted)
    return counts


def test_an_lm_rerun_codes_only_the_chunks_the_journal_lacks(codec, tmp_path, monkeypatch):
    journal = tmp_path / "doc.lmz.journal"
    counts = coded_chunks(monkeypatch)
    fresh = codec.encode(LM_TEXT, **LM)
    chunks = sum(counts)
    assert chunks > 16
    coded_chunks(monkeypatch, crash_after_chunks=8)  # before the last batch of 16
    with pytest.raises(KeyboardInterrupt):
        codec.encode(LM_TEXT, journal=journal, **LM)
    kept = len(list(journal.glob("*.seg")))
    assert 8 <= kept < 16  # chunk by chunk, not batch by batch (other shards finish their own)
    counts = coded_chunks(monkeypatch)
    out = io.BytesIO()
    report = codec.encode_to(LM_TEXT, out, journal=journal, **LM)
    assert out.getvalue() == fresh  # the same archive, byte for byte
    assert sum(counts) == chunks - kept and report.resumed == kept


def test_an_lm_journal_is_refused_for_other_options_and_checked_chunk_by_chunk(codec, tmp_path, monkeypatch):
    journal = tmp_path / "j"
    coded_chunks(monkeypatch, crash_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        codec.encode(LM_TEXT, journal=journal, **LM)
    coded_chunks(monkeypatch)  # no more crashes
    with pytest.raises(lmzip.JournalError, match="its --tokens, chunks differ"):
        codec.encode(LM_TEXT, journal=journal, **{**LM, "tokens_per_segment": 25})
    with pytest.raises(lmzip.JournalError, match="its --method differ"):
        codec.encode(LM_TEXT, journal=journal, **OPTIONS)
    with pytest.raises(lmzip.JournalError, match=r"its head \(kind 7\), lm arithmetic, shared counts"):  # /3 and kind 7, not /2
        codec.encode(LM_TEXT, journal=journal, lm_arithmetic=2, **LM)
    with pytest.raises(lmzip.JournalError, match=r"its head \(kind 7\), shared counts \(kind 6\) differ"):  # not kind 5
        codec.encode(LM_TEXT, journal=journal, lm_mix=False, **LM)
    first = sorted(journal.glob("*.seg"))[0]
    good = first.read_bytes()
    kept = journal_module._decode_segment(good)
    for tampered in (replace(kept, data=kept.data.upper()), replace(kept, stats={"ids_sha256": "0" * 64}),
                     replace(kept, payload=kept.payload + bytes(8 * kept.token_count + 17))):
        first.write_bytes(journal_module._encode_segment(tampered))  # with a sha256 that matches
        with pytest.raises(lmzip.JournalError, match="holds a chunk 0 that is not the input's"):
            codec.encode(LM_TEXT, journal=journal, **LM)
    first.write_bytes(good)
    assert codec.decode(codec.encode(LM_TEXT, journal=journal, **LM)) == LM_TEXT.encode()


def test_an_lm_rerun_takes_the_check_outcomes_the_journal_holds(codec, tmp_path, monkeypatch):
    """Each sampled chunk's check is journaled, tied to the payload it decoded: a rerun decodes a
    sampled chunk again only if its outcome is missing or of another payload."""
    import json
    import shutil

    import lmzip.exact

    real, checked = lmzip.exact.check_chunks, []

    def counting(exact, chunks, payloads, prefix, **kw):
        checked.append(len(chunks))
        return real(exact, chunks, payloads, prefix, **kw)

    monkeypatch.setattr(lmzip.exact, "check_chunks", counting)
    monkeypatch.setattr(lm_kind, "check_shards", lambda *a: [])  # checked here, before the rest is coded
    fresh = codec.encode(LM_TEXT, **LM)
    coded_chunks(monkeypatch, crash_on_call=2)  # the sample is coded and checked; the rest dies
    journal = tmp_path / "j"
    with pytest.raises(KeyboardInterrupt):
        codec.encode(LM_TEXT, journal=journal, **LM)
    assert sorted(p.name for p in journal.glob("*.note")) == ["check.0.note", "check.16.note"]
    for name in ("failed", "other"):
        shutil.copytree(journal, tmp_path / name)
    coded_chunks(monkeypatch)
    checked.clear()
    assert codec.encode(LM_TEXT, journal=journal, **LM) == fresh and checked == []

    note = tmp_path / "failed" / "check.0.note"
    note.write_text(note.read_text().replace('"ok": true', '"ok": false'))
    blob = codec.encode(LM_TEXT, journal=tmp_path / "failed", **LM)
    assert checked == [] and kinds(blob)[0] == "zstd" and codec.decode(blob) == LM_TEXT.encode()

    note = tmp_path / "other" / "check.16.note"
    note.write_text(json.dumps({**json.loads(note.read_text()), "payload_sha256": "0" * 64}))
    checked.clear()
    assert codec.encode(LM_TEXT, journal=tmp_path / "other", **LM) == fresh and checked == [1]


@pytest.mark.parametrize("mix", [False, True, "head"])
def test_an_lm_rerun_goes_on_with_the_check_a_kill_cut_short(codec, tmp_path, monkeypatch, mix):
    """A check under way journals each row's state; killed there, the rerun rebuilds that state
    (kind 6: with its shared counts) and decodes only the rest of the sample, and the archive is
    the same."""
    import torch

    from lmzip.exact import coding

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the sample's two rows in one batch, in this process
    try:
        _rerun_goes_on_with_the_check(codec, tmp_path, monkeypatch, coding, mix)
    finally:
        torch.set_num_threads(saved)


def _rerun_goes_on_with_the_check(codec, tmp_path, monkeypatch, coding, mix):
    import json
    import shutil

    LM_RUN = {**LM, **({"lm_mix": False} if mix is False else {"lm_head": 0} if mix is True else {})}
    monkeypatch.setattr(coding, "CHECK_NOTE_STEPS", 4)
    monkeypatch.setattr(lm_kind, "check_shards", lambda *a: [])  # checked here, before the rest is coded
    fresh = codec.encode(LM_TEXT, **LM_RUN)
    real_next, steps, resumed = coding.next_symbols, [], []

    # kind 7: chunk 16 follows its group's head, fed for its first 23 steps; the kill comes once it
    # has 9 tokens of its own (chunk 0 has 20 by then)
    kill, tokens = (34, {0: 20, 1: 9}) if mix == "head" else (10, {0: 8, 1: 8})

    def dies_at_step_10(*args):
        steps.append(1)
        if len(steps) == kill and not resumed:
            raise KeyboardInterrupt  # as a kill would, between two journaled states
        return real_next(*args)

    monkeypatch.setattr(coding, "next_symbols", dies_at_step_10)
    journal = tmp_path / "j"
    with pytest.raises(KeyboardInterrupt):
        codec.encode(LM_TEXT, journal=journal, **LM_RUN)
    assert sorted(p.name for p in journal.glob("*.note")) == ["checking.0.note", "checking.16.note"]
    shutil.copytree(journal, tmp_path / "other")
    note = tmp_path / "other" / "checking.16.note"
    note.write_text(json.dumps({**json.loads(note.read_text()), "payload_sha256": "0" * 64}))

    real_check = coding.check_chunks
    monkeypatch.setattr(lmzip.exact, "check_chunks", lambda exact, chunks, *a, **kw:
                        resumed.append((kw["resume"], list(map(len, chunks)))) or real_check(exact, chunks, *a, **kw))
    steps.clear()
    assert codec.encode(LM_TEXT, journal=journal, **LM_RUN) == fresh
    assert [{j: t for j, (t, _) in r.items()} for r, _ in resumed] == [tokens]
    lengths = resumed[0][1]
    if mix == "head":  # at other positions in head and chunk: one batch after the other
        assert len(steps) == sum(lengths[j] - t for j, t in tokens.items())
    else:  # one batch, from the token after the states on
        assert len(steps) == max(lengths) - 8
    resumed.clear()  # a state of another payload is not taken up
    assert codec.encode(LM_TEXT, journal=tmp_path / "other", **LM_RUN) == fresh
    assert [{j: t for j, (t, _) in r.items()} for r, _ in resumed] == [{0: tokens[0]}]


def test_a_check_state_that_cannot_be_journaled_costs_only_that_state(tmp_path, monkeypatch):
    from lmzip import lm_journal
    from lmzip.journal import Journal

    book = Journal(tmp_path / "j", {"input": "x"})
    book.open()
    keep = lm_journal.keep_check_states(book, {3: b"payload"})
    keep(3, 128, "0" * 64)
    assert lm_journal.check_states(book, {3: b"payload"}) == {3: (128, "0" * 64)}
    assert lm_journal.check_states(book, {3: b"other"}) == {}

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(book, "note", full)
    keep(3, 256, "1" * 64)  # no error


def test_a_check_note_of_another_shape_is_not_taken_up(tmp_path):
    """A damaged or hand-edited note is ignored (that work is done again), never an error mid-run."""
    from lmzip import lm_journal
    from lmzip.journal import Journal

    book = Journal(tmp_path / "j", {"input": "x"})
    book.open()
    payloads = {i: b"payload" for i in range(5)}
    sha = lm_journal._payload_sha256(b"payload")
    for i, tokens, digest in [(0, "128", "0" * 64), (1, 0, "0" * 64), (2, -128, "0" * 64), (3, 128, None),
                              (4, 128, "0" * 64)]:
        book.note(f"checking.{i}", {"payload_sha256": sha, "tokens": tokens, "state_sha256": digest})
    assert lm_journal.check_states(book, payloads) == {4: (128, "0" * 64)}
    book.note("check.0", {"payload_sha256": sha, "ok": "false"})
    book.note("check.1", {"payload_sha256": sha, "ok": False})
    assert lm_journal.checks(book, payloads) == {1: False}


def test_two_workers_fit_and_the_archive_is_in_order(codec):
    text = TEXT * 2
    blob = codec.encode(text, workers=2, **OPTIONS)
    assert codec.decode(blob) == text.encode()
    assert "memory" in kinds(blob)


def test_workers_must_be_positive(codec):
    with pytest.raises(lmzip.OptionError, match="workers"):
        codec.encode(TEXT, workers=0, **OPTIONS)


ENDLESS = """
import sys, lmzip
codec = lmzip.Codec(model=sys.argv[1], device="cpu")
codec.encode(sys.argv[2] * 4, workers=2, tokens_per_segment=8, vectors=1, max_vectors=1, max_steps=10**6,
             lr=0.1, margin=1000.0, bf16=False)
"""


def test_workers_stop_when_their_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", ENDLESS, TINY_MODEL, TEXT], cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and parent.poll() is None:
            workers = [p for p in psutil.Process(parent.pid).children() if "spawn_main" in " ".join(p.cmdline())]
            if len(workers) == 2:
                break
            time.sleep(0.2)
        assert len(workers) == 2, "the two workers never started"
        time.sleep(2)  # fitting by now
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, "workers outlived their killed parent"
    finally:
        parent.kill()
        for p in workers:  # a failing run must not leave them fitting for the rest of the suite
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def test_a_journaled_chunk_matches_only_its_own_piece():
    from lmzip import lm_journal
    from lmzip.kinds import CodedSegment
    from lmzip.segmenting import Piece

    piece = Piece(b"abc", (97, 98, 99))
    good = CodedSegment(lm_kind.KIND, b"abc", b"\x01\x02", token_count=3,
                        stats={"ids_sha256": lm_journal.ids_sha256((97, 98, 99))})
    assert lm_journal.matches(good, piece)
    assert not lm_journal.matches(good, None)
    assert not lm_journal.matches(good, Piece(b"abc", None))  # a piece stored raw
    assert not lm_journal.matches(good, Piece(b"abd", (97, 98, 100)))
    assert not lm_journal.matches(good, Piece(b"abc", (97, 98, 100)))  # same bytes, other ids
    assert not lm_journal.matches(replace(good, payload=None), piece)
    assert not lm_journal.matches(replace(good, payload=bytes(8 * 3 + 17)), piece)
    assert lm_journal.matches(replace(good, payload=bytes(8 * 3 + 16)), piece)


def test_a_journal_note_is_named_within_the_journal(tmp_path):
    book = journal_module.Journal(tmp_path / "j", {})
    book.open()
    with pytest.raises(ValueError, match="letters, digits and dots"):
        book.note("../outside", {"ok": True})
    book.note("check.3", {"ok": True})
    assert book.notes() == {"check.3": {"ok": True}} and not (tmp_path / "outside.note").exists()


def test_a_worker_out_of_device_memory_is_reported_as_such(monkeypatch):
    import queue

    import torch

    import lmzip.fit
    import lmzip.models
    import lmzip.workers
    from lmzip.errors import fitting_out_of_memory

    def fit_regions(lm, regions, cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(lmzip.workers, "exit_with_parent", lambda: None)  # this is the test process
    monkeypatch.setattr(lmzip.models, "load_model", lambda *a, **k: None)
    monkeypatch.setattr(lmzip.fit, "fit_regions", fit_regions)
    out = queue.Queue()
    lmzip.workers._work(0, 1, None, [], lmzip.FitConfig(), out)
    _, report = out.get_nowait()
    memory, device, text = report
    assert memory and device == lmzip.workers._device_for(0) and "OutOfMemoryError" in text
    failure = lmzip.workers._worker_failure(report, lmzip.FitConfig(batch_size=8))
    assert isinstance(failure, lmzip.DeviceMemoryError) and "give a smaller --batch-size" in str(failure)
    assert "--max-tokens" in str(fitting_out_of_memory(device, 1))
    other = lmzip.workers._worker_failure((False, device, "worker 0: TypeError: no"), lmzip.FitConfig())
    assert type(other) is lmzip.LmzError and str(other) == "fitting failed in worker 0: TypeError: no"
