"""Archives from strangers: bounded work, no downloads, pinned arithmetic, integrity without a model."""

from pathlib import Path

import pytest
import torch

import lmzip
from lmzip import container, segmenting
from lmzip.precision import exact_float32

from archive_edit import edit_entry, edit_header, entries
from conftest import FORMATS, TINY_MODEL, TINY_OPTIONS

MEMORY = (FORMATS / "good-memory-tiny.lmz").read_bytes()


def test_work_is_counted_from_the_table_and_bounded_before_any_model_runs(tmp_path):
    work = lmzip.inspect(MEMORY)["decode_work"]
    assert work == sum(e["token_count"] for e in entries(MEMORY)) > 0
    nowhere = lmzip.Codec(model=str(tmp_path / "no-model-here"))  # a model load would fail
    with pytest.raises(lmzip.WorkLimitError, match=f"needs {work} model steps, over the limit of {work - 1}"):
        nowhere.decode(MEMORY, work_limit=work - 1)
    with pytest.raises(lmzip.ModelUnavailableError):
        nowhere.decode(MEMORY, work_limit=work)  # at the limit it goes on, to the model


def test_the_work_limit_comes_from_the_environment(codec, monkeypatch):
    monkeypatch.setenv("LMZIP_WORK_LIMIT", "3")
    with pytest.raises(lmzip.WorkLimitError):
        codec.decode(MEMORY)
    monkeypatch.setenv("LMZIP_WORK_LIMIT", "lots")
    with pytest.raises(lmzip.OptionError, match="LMZIP_WORK_LIMIT"):
        codec.decode(MEMORY)


def test_a_hub_model_is_never_fetched_unasked(monkeypatch):
    blob = edit_header(MEMORY, model_source=container.SOURCE_HUB)
    blob = blob.replace(b"tiny-llama", b"evil/model", 1)
    blob = edit_header(blob)  # the ID is the same length: just the checksum
    assert lmzip.inspect(blob)["model_id"] == "evil/model"
    seen = {}

    def fake_load(spec, device=None, *, allow_download=None, hub_only=False):
        assert hub_only, "a name read from an archive must never be taken as a local directory"
        seen.update(spec=spec, allow_download=allow_download)
        raise lmzip.ModelUnavailableError(f"'{spec}' is not in the local cache")

    monkeypatch.setattr("lmzip.codec.load_model", fake_load)
    monkeypatch.delenv("LMZIP_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(lmzip.ModelUnavailableError, match="needs model 'evil/model' \\(hub; weights sha256"):
        lmzip.Codec().decode(blob)
    assert seen == {"spec": "evil/model", "allow_download": False}
    monkeypatch.setenv("LMZIP_ALLOW_DOWNLOAD", "1")
    with pytest.raises(lmzip.ModelUnavailableError):
        lmzip.Codec().decode(blob)
    assert seen["allow_download"] is True
    with pytest.raises(lmzip.ModelUnavailableError):
        lmzip.Codec(allow_download=False).decode(blob)
    assert seen["allow_download"] is False


def test_a_local_model_must_be_given():
    with pytest.raises(lmzip.ModelUnavailableError, match="local model 'tiny-llama'.*pass --model"):
        lmzip.Codec().decode(MEMORY)


@pytest.mark.parametrize("sample", ["good-memory-tiny.lmz", "good-memory-tiny-v2.lmz", "good-memory-tiny-v1.lmz"])
def test_a_model_name_from_an_archive_is_never_a_local_directory(sample, monkeypatch):
    blob = (FORMATS / sample).read_bytes()
    if sample == "good-memory-tiny.lmz":  # v3 records a local model's source: call it a hub model
        blob = edit_header(blob, model_source=container.SOURCE_HUB)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LMZIP_ALLOW_DOWNLOAD", raising=False)
    model_dir = Path(TINY_MODEL)
    # where the name the archive gives ("tiny-llama", "tests/data/tiny-llama") is a model directory
    monkeypatch.chdir(model_dir.parent if sample == "good-memory-tiny.lmz" else model_dir.parents[2])
    assert Path(lmzip.inspect(blob)["model_id"]).is_dir()
    with pytest.raises(lmzip.ModelUnavailableError, match="cannot be loaded"):
        lmzip.Codec().decode(blob)
    assert lmzip.Codec().decode(blob, model=TINY_MODEL) == (FORMATS / sample.replace(".lmz", ".out")).read_bytes()


def test_export_and_memory_refuse_what_decoding_would():
    from lmzip import export

    for sample, problem in [("bad-payload-checksum.lmz", "payload checksum mismatch"),
                            ("bad-infinite-vector.lmz", "infinite or NaN")]:
        blob = (FORMATS / sample).read_bytes()
        for read in (lmzip.memory, export.to_safetensors, lmzip.Codec().check):
            with pytest.raises(lmzip.SegmentError, match=problem):
                read(blob)
    with pytest.raises(lmzip.InputError, match="as bytes, not str"):
        lmzip.memory(str(FORMATS / "good-memory-tiny.lmz"))


def test_no_absolute_path_is_stored(codec):
    blob = codec.encode("Alice was beginning", **TINY_OPTIONS)
    assert TINY_MODEL.encode() not in blob and lmzip.inspect(blob)["model_id"] == "tiny-llama"


def test_integrity_is_checked_without_the_model(tmp_path):
    archive = lmzip.Codec(model=str(tmp_path / "nowhere")).check(MEMORY)
    assert len(archive.segments) == len(entries(MEMORY))
    damaged = bytearray(MEMORY)
    damaged[entries(MEMORY)[0]["payload_offset"]] ^= 1
    with pytest.raises(lmzip.SegmentError, match="damaged segment 0: payload checksum mismatch"):
        lmzip.Codec().check(bytes(damaged))


def test_a_crc_that_fails_in_a_batch_is_decoded_alone_before_it_is_damage(codec, monkeypatch):
    from lmzip.kinds import memory

    calls = []
    real = memory.decode

    def flaky(jobs, ctx):
        calls.append(len(jobs))
        out = real(jobs, ctx)
        return [b"x" * len(d) for d in out] if len(jobs) > 1 else out  # a batch goes wrong

    monkeypatch.setattr(memory, "decode", flaky)
    expected = (FORMATS / "good-memory-tiny.out").read_bytes()
    assert codec.decode(MEMORY, model=TINY_MODEL) == expected
    memory_count = sum(e["kind"] == memory.KIND for e in entries(MEMORY))
    assert calls == [memory_count] + [1] * memory_count


def test_arithmetic_is_pinned_to_float32_and_restored(codec, monkeypatch):
    seen = []
    from lmzip.kinds import memory

    real = memory.decode
    monkeypatch.setattr(memory, "decode", lambda jobs, ctx: seen.append(
        (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)) or real(jobs, ctx))
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        codec.decode(MEMORY, model=TINY_MODEL)
        assert seen and set(seen) == {("highest", False)}
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
    with exact_float32():
        assert torch.get_float32_matmul_precision() == "highest"


def test_non_finite_vectors_are_damage_by_name(codec):
    with pytest.raises(lmzip.SegmentError, match="infinite or NaN"):
        codec.decode((FORMATS / "bad-infinite-vector.lmz").read_bytes(), model=TINY_MODEL)


def test_non_finite_vectors_are_refused_by_the_writer():
    from lmzip.kinds import memory

    with pytest.raises(ValueError, match="finite"):
        memory.vectors_payload(torch.tensor([[1.0, float("inf")]], dtype=torch.float16))


def test_the_writer_refuses_what_the_reader_would():
    import io

    from lmzip.kinds import CodedSegment

    writer = container.ArchiveWriter()
    writer.add(CodedSegment(container.KIND_MEMORY, b"abc", b"\0" * 8, token_count=9, vector_count=1))
    header = container.Header(3, bytes(32), 1, model_id="m", model_source=container.SOURCE_LOCAL, hidden_size=4,
                              compute_dtype=container.DTYPE_FLOAT32)
    with pytest.raises(lmzip.SegmentTableError, match="token count 9"):
        writer.finish(io.BytesIO(), header)
    with pytest.raises(lmzip.HeaderError):
        container.pack_header(container.Header(0, bytes(32), 0, model_id="m", hidden_size=4,
                                               compute_dtype=container.DTYPE_FLOAT32))  # source none


def test_decode_takes_bytes_only():
    with pytest.raises(lmzip.InputError, match="bytes"):
        lmzip.decode("text")


JUNK_SEED = 20261201


def junk(n: int) -> bytes:
    import random

    return random.Random(JUNK_SEED).randbytes(n)


def test_short_and_binary_runs_are_not_fitted(tiny):
    data = junk(1500) + b" The rabbit-hole went straight on like a tunnel for some way."
    pieces = list(segmenting.plan(data, tiny.tokenizer, 32))
    assert b"".join(p.data for p in pieces) == data
    fitted = [p for p in pieces if p.ids is not None]
    assert fitted and all(b"rabbit" in p.data or b"tunnel" in p.data for p in fitted)
    assert not segmenting.worth_fitting(tiny.tokenizer, "short")
    assert not segmenting.worth_fitting(tiny.tokenizer, "\x01\x02abc\x03\x04\x05\x06def\x07")
    assert segmenting.worth_fitting(tiny.tokenizer, "Eight chars or more")
