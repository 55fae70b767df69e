"""The lmzip command, through click's CliRunner and through the installed entry point."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmzip import cli

from conftest import FORMATS, TINY_MODEL

TINY_ARGS = ["--model", TINY_MODEL, "--tokens", "8", "--vectors", "1", "--max-vectors", "1",
             "--lr", "0.1", "--margin", "0.5", "--no-bf16"]
TEXT = b"Hello, CLI!\nSecond line.\n"


def run(*args, input=None):
    return CliRunner().invoke(cli.main, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("doc.txt").write_bytes(TEXT)
    return tmp_path


def test_compress_decompress_round_trip(workdir):
    r = run("-v", "compress", *TINY_ARGS, "doc.txt")
    assert r.exit_code == 0, r.output
    assert "doc.txt: 25 ->" in r.stderr
    assert Path("doc.txt").exists(), "the input is kept by default"
    os.rename("doc.txt", "orig.txt")
    assert run("decompress", "doc.txt.lmz").exit_code == 0
    assert Path("doc.txt").read_bytes() == TEXT


def test_never_overwrites_without_force(workdir):
    Path("doc.txt.lmz").write_bytes(b"precious")
    r = run("compress", "--method", "zstd", "doc.txt")
    assert r.exit_code == 1
    assert "already exists (use -f to overwrite)" in r.stderr
    assert Path("doc.txt.lmz").read_bytes() == b"precious"
    assert run("compress", "--method", "zstd", "-f", "doc.txt").exit_code == 0
    assert Path("doc.txt.lmz").read_bytes()[:4] == b"\x89LMZ"


def test_rm_deletes_input_after_success(workdir):
    assert run("compress", "--method", "zstd", "--rm", "doc.txt").exit_code == 0
    assert not Path("doc.txt").exists()
    assert run("decompress", "--rm", "doc.txt.lmz").exit_code == 0
    assert Path("doc.txt").read_bytes() == TEXT and not Path("doc.txt.lmz").exists()


def test_rm_with_stdout_keeps_input_and_output_cannot_be_the_input(workdir):
    r = CliRunner().invoke(cli.main, ["compress", "--method", "zstd", "-c", "--rm", "doc.txt"])
    assert r.exit_code == 0 and Path("doc.txt").exists()
    r = run("compress", "--method", "zstd", "-f", "-o", "doc.txt", "doc.txt")
    assert r.exit_code == 1 and "is the input file" in r.stderr
    assert Path("doc.txt").read_bytes() == TEXT


def test_stdin_stdout_and_output_option(workdir):
    r = CliRunner().invoke(cli.main, ["compress", "--method", "zstd", "-"], input=TEXT)
    assert r.exit_code == 0
    archive = r.stdout_bytes
    r = CliRunner().invoke(cli.main, ["decompress", "-c", "-"], input=archive)
    assert r.exit_code == 0 and r.stdout_bytes == TEXT
    assert run("compress", "--method", "zstd", "-o", "named.lmz", "doc.txt").exit_code == 0
    assert run("decompress", "-o", "back.txt", "named.lmz").exit_code == 0
    assert Path("back.txt").read_bytes() == TEXT


def test_bad_data_exits_1_and_leaves_no_output(workdir):
    shutil.copy(FORMATS / "bad-payload-bit-flip.lmz", "bad.lmz")
    r = run("decompress", "bad.lmz")
    assert r.exit_code == 1
    assert r.stderr.startswith("lmzip: bad.lmz: damaged segment 0: ")
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir()) == ["bad.lmz", "doc.txt"]
    r = CliRunner().invoke(cli.main, ["decompress", "-c", "bad.lmz"])
    assert r.exit_code == 1 and r.stdout_bytes == b""


def test_missing_file_directory_and_wrong_suffix_exit_1(workdir):
    for args, message in [(["compress", "nothere.txt"], "nothere.txt: No such file or directory"),
                          (["compress", "--method", "zstd", "."], "is a directory"),
                          (["decompress", "doc.txt"], "unknown suffix")]:
        r = run(*args)
        assert r.exit_code == 1 and message in r.stderr, (args, r.stderr)


def test_usage_errors_exit_2(workdir):
    assert run("compress", "--bogus", "doc.txt").exit_code == 2
    assert run("compress").exit_code == 2
    assert run("compress", "-o", "x.lmz", "doc.txt", "doc.txt").exit_code == 2
    assert run("compress", "--method", "gzip", "doc.txt").exit_code == 2


def test_info_and_test(workdir):
    assert run("compress", *TINY_ARGS, "doc.txt").exit_code == 0
    r = run("info", "--json", "doc.txt.lmz")
    info = json.loads(r.stdout)
    assert info["original_size"] == len(TEXT) and info["model_id"] == TINY_MODEL
    assert {s["kind"] for s in info["segments"]} == {"memory"}
    r = run("info", "doc.txt.lmz")
    assert "memory" in r.stdout and "lmz format v2" in r.stdout
    r = run("test", "doc.txt.lmz")
    assert r.exit_code == 0 and "doc.txt.lmz: OK" in r.stderr
    assert sorted(os.listdir()) == ["doc.txt", "doc.txt.lmz"]
    shutil.copy(FORMATS / "bad-wrong-weights.lmz", "wrong.lmz")
    r = run("test", "--model", TINY_MODEL, "wrong.lmz")
    assert r.exit_code == 1 and "model mismatch" in r.stderr


def test_help_short_flag():
    r = run("-h")
    assert r.exit_code == 0 and "Exit status" in r.output
    assert run("compress", "-h").exit_code == 0


def installed_lmzip() -> str:
    exe = shutil.which("lmzip", path=os.path.dirname(sys.executable)) or shutil.which("lmzip")
    assert exe, "the lmzip console script is not installed"
    return exe


def test_installed_command(tmp_path):
    exe = installed_lmzip()
    src = tmp_path / "a.txt"
    src.write_bytes(TEXT)
    done = subprocess.run([exe, "compress", "--method", "zstd", str(src)], capture_output=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([exe, "decompress", "-c", str(src) + ".lmz"], capture_output=True)
    assert done.returncode == 0 and done.stdout == TEXT
    done = subprocess.run([exe, "decompress", str(FORMATS / "bad-magic.lmz"), "-c"], capture_output=True)
    assert done.returncode == 1
    assert done.stderr.decode().strip().endswith("not an lmzip archive (bad magic number)")
    done = subprocess.run([exe, "frobnicate"], capture_output=True)
    assert done.returncode == 2


def test_ctrl_c_leaves_no_output_and_exits_130(tmp_path):
    src = tmp_path / "long.txt"
    src.write_text("A long text that takes a while to fit. " * 200)
    proc = subprocess.Popen([installed_lmzip(), "compress", *TINY_ARGS, "--max-steps", "100000",
                             "--margin", "1000", str(src)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.name.endswith(".part") for p in tmp_path.iterdir()):
        time.sleep(0.2)  # wait until it is writing
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert "interrupted" in proc.stderr.read().decode()
    assert [p.name for p in tmp_path.iterdir()] == ["long.txt"]
