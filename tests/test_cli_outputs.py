"""Where the lmzip command writes: devices and pipes, folders, standard output, journals."""

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmzip import cli

from conftest import FORMATS, ROOT, TINY_MODEL

ZSTD = FORMATS / "good-zstd-text.lmz"
ZSTD_TEXT = (FORMATS / "good-zstd-text.out").read_bytes()


def run(*args, input=None):
    return CliRunner().invoke(cli.main, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ZSTD, "a.lmz")
    return tmp_path


def test_a_fifo_output_is_written_into_not_replaced(workdir):
    os.mkfifo("pipe")
    reader = os.open("pipe", os.O_RDONLY | os.O_NONBLOCK)  # so that the writer's open() does not wait
    try:
        r = run("decompress", "-f", "-o", "pipe", "a.lmz")
        assert r.exit_code == 0, r.stderr
        assert stat.S_ISFIFO(os.stat("pipe").st_mode), "the FIFO was replaced by a file"
        assert os.read(reader, 1 << 16) == ZSTD_TEXT
    finally:
        os.close(reader)


def test_dev_null_needs_no_force_and_stays_a_device(workdir):
    r = run("decompress", "-o", os.devnull, "a.lmz")
    assert r.exit_code == 0, r.stderr
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_rm_keeps_the_input_when_the_output_is_a_device(workdir):
    Path("doc.txt").write_bytes(b"precious")
    r = run("compress", "--method", "zstd", "--rm", "-o", os.devnull, "doc.txt")
    assert r.exit_code == 0, r.stderr
    r = run("decompress", "--rm", "-o", os.devnull, "a.lmz")
    assert r.exit_code == 0, r.stderr
    assert sorted(os.listdir()) == ["a.lmz", "doc.txt"]


def test_the_last_of_keep_and_rm_wins(workdir):
    Path("doc.txt").write_bytes(b"precious")
    assert run("compress", "--method", "zstd", "--rm", "-k", "doc.txt").exit_code == 0
    assert Path("doc.txt").exists(), "-k after --rm keeps the input"
    assert run("-k", "--rm", "--method", "zstd", "-f", "doc.txt").exit_code == 0  # the xz-style form
    assert not Path("doc.txt").exists(), "--rm after -k removes the input"
    assert run("-d", "--rm", "-k", "doc.txt.lmz").exit_code == 0
    assert sorted(os.listdir()) == ["a.lmz", "doc.txt", "doc.txt.lmz"]
    assert run("-d", "-f", "--rm", "-k", "--rm", "doc.txt.lmz").exit_code == 0  # a repeated flag counts too
    assert sorted(os.listdir()) == ["a.lmz", "doc.txt"]


@pytest.mark.parametrize("method", ["lm", "zstd"])
@pytest.mark.parametrize("option", [["--workers", "2"], ["--workers", "auto"], ["--ray", "local"]])
def test_fitting_options_are_refused_where_nothing_is_fitted(workdir, method, option):
    Path("doc.txt").write_bytes(b"text")
    r = run("compress", "--method", method, *option, "doc.txt")
    assert r.exit_code == 2 and f"{option[0]} fits memory segments; --method {method}" in r.stderr
    assert sorted(os.listdir()) == ["a.lmz", "doc.txt"]


def test_an_existing_fifo_needs_force(workdir):
    os.mkfifo("pipe")
    r = run("decompress", "-o", "pipe", "a.lmz")
    assert r.exit_code == 1 and "pipe already exists (use -f to overwrite)" in r.stderr


@pytest.mark.parametrize("name", ["newdir/", "newdir/."])
def test_an_output_name_of_a_folder_is_refused(workdir, name):
    r = run("decompress", "-o", name, "a.lmz")
    assert r.exit_code == 1 and f"{name}: names a folder, not a file" in r.stderr
    assert sorted(os.listdir()) == ["a.lmz"]


@pytest.mark.parametrize("option, name, problem", [("--json", "nodir/b.json", "nodir: no such folder"),
                                                   ("--archive", "out/", "out/ names a folder")])
def test_bench_checks_its_output_names_before_it_runs(workdir, monkeypatch, option, name, problem):
    from lmzip import bench

    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    r = CliRunner().invoke(cli.main, ["bench", option, name, "a.lmz"])
    assert r.exit_code == 2 and problem in r.stderr, r.stderr


def test_errors_name_the_output_not_a_temporary_file(workdir):
    r = run("decompress", "-o", "nodir/a.txt", "a.lmz")
    assert r.exit_code == 1
    assert r.stderr.strip() == "lmzip: a.lmz: nodir/a.txt: No such file or directory"


def test_an_output_that_is_a_folder_is_named_as_such(workdir):
    os.mkdir("a")
    for force in ([], ["-f"]):
        r = run("decompress", *force, "a.lmz")
        assert r.exit_code == 1 and r.stderr.strip() == "lmzip: a.lmz: a: is a directory", r.stderr


@pytest.mark.parametrize("command", [["compress", "--method", "zstd"], ["export"]])
def test_c_takes_one_input_where_the_output_holds_one_file(workdir, command):
    Path("b.txt").write_bytes(b"two")
    inputs = ["a.lmz", "a.lmz"] if command == ["export"] else ["b.txt", "b.txt"]
    r = CliRunner().invoke(cli.main, [*command, "-c", *inputs])
    assert r.exit_code == 2 and "-c takes one input file" in r.stderr
    assert r.stdout_bytes == b""


def test_c_decompresses_several_archives_one_after_another(workdir):
    r = run("decompress", "-c", "a.lmz", "a.lmz")
    assert r.exit_code == 0 and r.stdout_bytes == ZSTD_TEXT * 2


def test_the_progress_line_is_erased_before_the_text_is_written(workdir, monkeypatch):
    monkeypatch.setattr(cli, "_stderr_is_terminal", lambda: True)
    r = run("decompress", "-c", "a.lmz")
    assert r.exit_code == 0
    # what a terminal shows: stderr and stdout in the order they were written (CliRunner reads \r\n as \n)
    assert r.output.endswith("\r\x1b[K" + ZSTD_TEXT.decode().replace("\r\n", "\n")), repr(r.output[-80:])


def test_a_closed_stdout_is_an_io_error_not_a_bug(workdir):
    lmzip = shlex.join([sys.executable, "-m", "lmzip"])
    for command in ("-dc a.lmz >&-", "--method zstd - < a.lmz >&-", "info a.lmz >&-"):
        done = subprocess.run(["bash", "-c", f"{lmzip} {command}"], capture_output=True, text=True, cwd=workdir,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().endswith(": standard output is closed"), done.stderr
        assert "internal error" not in done.stderr


def test_verbose_decompress_and_test_say_what_they_did(workdir):
    r = run("-v", "decompress", "a.lmz")
    assert r.exit_code == 0
    assert r.stderr.strip() == f"a.lmz: {ZSTD.stat().st_size} -> {len(ZSTD_TEXT)} bytes, 1 segment (1 zstd) -> a"
    r = run("-v", "test", "a.lmz")
    assert r.stderr.strip() == "a.lmz: OK, 1 segment (1 zstd) decoded and checked"


def test_zstd_has_no_journal_and_leaves_one_alone(workdir):
    Path("doc.txt").write_bytes(b"Alice was beginning to get very tired.")
    os.mkdir("doc.txt.lmz.journal")
    Path("doc.txt.lmz.journal/manifest.json").write_text("{}")
    r = run("compress", "--method", "zstd", "doc.txt")
    assert r.exit_code == 0, r.stderr
    assert Path("doc.txt.lmz.journal/manifest.json").exists(), "another run's journal was removed"


def test_lm_refuses_another_runs_journal_and_removes_its_own(workdir):
    Path("doc.txt").write_bytes(b"Alice was beginning to get very tired.")
    os.mkdir("doc.txt.lmz.journal")
    Path("doc.txt.lmz.journal/manifest.json").write_text("{}")
    r = run("compress", "--method", "lm", "--model", TINY_MODEL, "doc.txt")
    assert r.exit_code == 1 and "is of another compression" in r.stderr
    assert Path("doc.txt.lmz.journal/manifest.json").exists(), "another run's journal was removed"
    shutil.rmtree("doc.txt.lmz.journal")
    r = run("compress", "--method", "lm", "--model", TINY_MODEL, "doc.txt")
    assert r.exit_code == 0, r.stderr
    assert sorted(os.listdir()) == ["a.lmz", "doc.txt", "doc.txt.lmz"]


def test_a_reader_that_stops_early_ends_the_command_quietly(workdir):
    Path("big.txt").write_bytes(b"line\n" * 200_000)  # more than a pipe holds
    assert run("compress", "--method", "zstd", "big.txt").exit_code == 0
    lmzip = shlex.join([sys.executable, "-m", "lmzip"])
    done = subprocess.run(["bash", "-c", f"{lmzip} -dc big.txt.lmz | head -c 10 > /dev/null; "
                           "echo ${PIPESTATUS[0]} >&2"], capture_output=True, text=True, cwd=workdir,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stderr.strip() == "141", done.stderr  # no message, the status gzip and zstd get


def test_compressing_an_archive_again_needs_force(workdir):
    r = run("compress", "--method", "zstd", "a.lmz")
    assert r.exit_code == 1
    assert "already has the .lmz suffix; skipped (-d decompresses it; -f compresses it again)" in r.stderr
    assert not Path("a.lmz.lmz").exists()
    assert run("compress", "--method", "zstd", "-f", "a.lmz").exit_code == 0 and Path("a.lmz.lmz").exists()


def test_export_says_when_there_is_nothing_to_export(workdir):
    r = run("export", "a.lmz")
    assert r.exit_code == 0 and "a.lmz: 0 memory segments -> a.safetensors (nothing to export" in r.stderr


def test_info_shows_the_source_the_content_hash_and_the_work(workdir):
    shutil.copy(FORMATS / "good-memory-tiny.lmz", "m.lmz")
    r = run("info", "m.lmz")
    lines = r.stdout.splitlines()
    assert lines[0].endswith(", 171 model steps to decode")
    assert lines[1] == "  content sha256 78786336a6b62404cb9a97e257227b9b9c61f85157659f59372b4feed0af218f"
    assert lines[2].startswith("  model tiny-llama (local; hidden size 128, float32, margin 0.5, prefix tokens 256)")


def test_lm_chunks_longer_than_the_arithmetic_allows_are_refused(workdir):
    Path("doc.txt").write_bytes(b"Alice was beginning to get very tired.")
    r = run("compress", "--method", "lm", "--model", TINY_MODEL, "--tokens", "9000", "doc.txt")
    assert r.exit_code == 2 and "the lm method takes chunks of at most 8191 tokens, not 9000" in r.stderr
    assert not Path("doc.txt.lmz").exists()


def test_o_dash_is_standard_output(workdir):
    r = run("decompress", "-o", "-", "a.lmz")
    assert r.exit_code == 0 and r.stdout_bytes == ZSTD_TEXT
    assert sorted(os.listdir()) == ["a.lmz"]


@pytest.mark.parametrize("method, said", [("memory", "; 3 segments from the journal"),
                                          ("lm", "; 1 chunk from the journal")])
def test_verbose_says_what_came_from_the_journal(workdir, monkeypatch, method, said):
    import lmzip

    resumed = 3 if method == "memory" else 1
    report = lmzip.EncodeReport(10, 20, 2, 1, 1, 5, 2, [], resumed=resumed)
    monkeypatch.setattr(lmzip.Codec, "encode_to", lambda self, data, out, **options: out.write(b"x") and report)
    Path("doc.txt").write_bytes(b"text")
    r = run("-v", "compress", "--method", method, "doc.txt")
    assert r.exit_code == 0 and r.stderr.strip().endswith(said), r.stderr
