"""Awkward and bad inputs to compress: exact round trips, or one clear error and no output."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import lmzip
from lmzip import cli

from conftest import TINY_MODEL, TINY_OPTIONS

AWKWARD = {
    "empty": b"",
    "nul": b"a\x00b\x00\x00c",
    "crlf-and-lone-cr": b"one\r\ntwo\rthree\n\r",
    "bom": "\ufeffbyte order mark".encode(),
    "rtl-and-combining": "שלום, עולם; مرحبا; e\u0301 a\u0308 \u202eevil".encode(),
    "emoji": "family 👨‍👩‍👧 flag 🇫🇷 skin 👍🏽".encode(),
    "invalid-utf8": b"ok \xff\xfe\xc3\x28 \xed\xa0\x80 surrogate \xf4\x90\x80\x80 too big",
    "binary": bytes(range(256)),
    "long-line": b"x" * 3000,
}


# Inputs with a run of printable text of 8 tokens and more: memory segments, not only zstd.
TEXT_LIKE = {"crlf-and-lone-cr", "bom", "rtl-and-combining", "emoji", "invalid-utf8", "long-line"}


@pytest.mark.parametrize("name", sorted(AWKWARD))
def test_awkward_inputs_round_trip(codec, name):
    data = AWKWARD[name]
    options = {**TINY_OPTIONS, "max_steps": 40} if name == "long-line" else TINY_OPTIONS
    blob = codec.encode(data, **options)
    assert codec.decode(blob) == data
    kinds = {s["kind"] for s in lmzip.inspect(blob)["segments"]}
    assert ("memory" in kinds) == (name in TEXT_LIKE), kinds


def test_text_of_several_megabytes_is_cut_in_windows(codec, tiny):
    from lmzip import segmenting

    data = ("Line of text, number %d.\r\n" * 200_000 % tuple(range(200_000))).encode()  # ~5.4 MB
    pieces = list(segmenting.plan(data, tiny.tokenizer, 64))
    assert b"".join(p.data for p in pieces) == data
    assert max(len(p.ids) for p in pieces) <= 64 + 4
    blob = codec.encode(data, **{**TINY_OPTIONS, "max_steps": 0, "tokens_per_segment": 64})  # fitting 5 MB: days
    assert codec.decode(blob) == data


def test_the_tail_of_a_text_is_shared_evenly(tiny):
    from lmzip import segmenting

    text = "abcdefghij" * 4  # 40 byte-level tokens
    sizes = [len(p.ids) for p in segmenting.plan(text.encode(), tiny.tokenizer, 32)]
    assert sizes == [20, 20]  # not 32 + 8
    sizes = [len(p.ids) for p in segmenting.plan(text.encode(), tiny.tokenizer, 8)]
    assert sizes == [8] * 5


def invoke(*args):
    return CliRunner().invoke(cli.main, list(args))


def test_directory_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("adir")
    r = invoke("compress", "--method", "zstd", "adir")
    assert r.exit_code == 1 and r.stderr.strip() == "lmzip: adir: is a directory"
    r = invoke("compress", "--method", "zstd", "missing.txt")
    assert r.exit_code == 1 and r.stderr.strip() == "lmzip: missing.txt: No such file or directory"
    assert os.listdir() == ["adir"]


def test_an_unreadable_file_is_an_error(tmp_path, monkeypatch):
    """Root (CI) reads a mode-0 file anyway, so as root the kernel's refusal is stood in for."""
    monkeypatch.chdir(tmp_path)
    Path("secret.txt").write_text("x")
    os.chmod("secret.txt", 0)
    if os.geteuid() == 0:
        real = Path.read_bytes

        def refuse(self):
            if self.name == "secret.txt":
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", refuse)
    r = invoke("compress", "--method", "zstd", "secret.txt")
    assert r.exit_code == 1 and r.stderr.strip() == "lmzip: secret.txt: Permission denied"
    assert os.listdir() == ["secret.txt"]


def test_one_bad_file_does_not_stop_the_others(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("good.txt").write_text("good")
    r = invoke("compress", "--method", "zstd", "missing.txt", "good.txt")
    assert r.exit_code == 1
    assert Path("good.txt.lmz").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_on_stdout_is_an_error(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("some text")
    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-m", "lmzip", "compress", "--method", "zstd", "-c", str(src)],
                              stdout=full, stderr=subprocess.PIPE)
    assert done.returncode == 1
    assert done.stderr.decode().strip().splitlines()[0] == f"lmzip: {src}: No space left on device"


def test_full_disk_on_a_file_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.txt").write_text("some text")
    real_write = os.fsync

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    r = invoke("compress", "--method", "zstd", "a.txt")
    monkeypatch.setattr(os, "fsync", real_write)
    assert r.exit_code == 1 and "No space left on device" in r.stderr
    assert sorted(os.listdir()) == ["a.txt"]


def test_missing_model_says_how_to_get_it(tmp_path):
    blob = (Path(__file__).parent.parent / "formats" / "good-memory-tiny-v2.lmz").read_bytes()
    moved = lmzip.Codec(device="cpu")
    archive = tmp_path / "x.lmz"
    archive.write_bytes(blob)
    os.chdir(tmp_path)  # the archive names tests/data/tiny-llama, relative to the repository root
    try:
        with pytest.raises(lmzip.ModelUnavailableError, match="this archive needs model 'tests/data/tiny-llama'"
                           ".*install it, or pass --model"):
            moved.decode(blob)
        r = invoke("test", str(archive))
        assert r.exit_code == 1 and "pass --model" in r.stderr
        assert invoke("test", "--model", TINY_MODEL, str(archive)).exit_code == 0
    finally:
        os.chdir(Path(__file__).parent.parent)
