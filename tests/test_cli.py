"""The lmzip command, through click's CliRunner and through the installed entry point."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import lmzip
from lmzip import cli, progress_line

from conftest import FORMATS, ROOT, TINY_MODEL

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
    assert run("decompress", "--model", TINY_MODEL, "doc.txt.lmz").exit_code == 0
    assert Path("doc.txt").read_bytes() == TEXT


def test_verbose_compress_names_the_kind_of_segments(workdir):
    r = run("-v", "compress", *TINY_ARGS, "doc.txt")
    assert "memory segments (" in r.stderr and "vectors)" in r.stderr
    r = run("-v", "compress", "-f", "--method", "lm", "--model", TINY_MODEL, "doc.txt")
    assert r.exit_code == 0, r.output
    assert "1 lm segment (" in r.stderr and "memory" not in r.stderr and "vectors" not in r.stderr


def test_head_sets_the_lm_kind_and_is_only_for_method_lm(workdir):
    Path("long.txt").write_bytes(TEXT * 6)
    kinds = {}
    for head in ("0", "5"):
        r = run("compress", "-f", "--method", "lm", "--tokens", "8", "--head", head, "--model", TINY_MODEL,
                "long.txt")
        assert r.exit_code == 0, r.output
        kinds[head] = {s["kind"] for s in lmzip.inspect(Path("long.txt.lmz").read_bytes())["segments"]}
        os.rename("long.txt.lmz", f"long{head}.txt.lmz")
        assert run("decompress", "-c", "--model", TINY_MODEL, f"long{head}.txt.lmz").stdout_bytes == TEXT * 6
    assert kinds == {"0": {"lm3-group"}, "5": {"lm3-head"}}
    r = run("compress", "-f", "--method", "zstd", "--head", "5", "doc.txt")
    assert r.exit_code == 2 and "--head is for --method lm" in r.stderr


def test_keep_lines_writes_kind_7_for_a_crlf_text_and_is_only_for_method_lm(workdir):
    text = TEXT.replace(b"\n", b"\r\n") * 2
    assert b"\r\n" in text
    Path("crlf.txt").write_bytes(text)
    kinds = {}
    for flags in ((), ("--keep-lines",)):
        r = run("compress", "-f", "--method", "lm", "--tokens", "8", *flags, "--model", TINY_MODEL, "crlf.txt")
        assert r.exit_code == 0, r.output
        kinds[flags] = {s["kind"] for s in lmzip.inspect(Path("crlf.txt.lmz").read_bytes())["segments"]}
        assert run("decompress", "-c", "--model", TINY_MODEL, "crlf.txt.lmz").stdout_bytes == text
    assert kinds == {(): {"lm3-text"}, ("--keep-lines",): {"lm3-head"}}
    r = run("compress", "-f", "--method", "zstd", "--keep-lines", "doc.txt")
    assert r.exit_code == 2 and "--keep-lines is for --method lm" in r.stderr


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
    assert info["original_size"] == len(TEXT) and info["model_id"] == "tiny-llama"
    assert {s["kind"] for s in info["segments"]} == {"memory"}
    r = run("info", "doc.txt.lmz")
    assert "memory" in r.stdout and "lmz format v3" in r.stdout
    r = run("test", "doc.txt.lmz")
    assert r.exit_code == 1 and "local model 'tiny-llama'" in r.stderr and "pass --model" in r.stderr
    r = run("test", "--model", TINY_MODEL, "doc.txt.lmz")
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
    # As from a terminal: a shell's background job (as CI may run us) starts with SIGINT ignored,
    # and a program that inherits that rightly keeps ignoring it.
    proc = subprocess.Popen([sys.executable, "-m", "lmzip", "compress", *TINY_ARGS, "--max-steps", "100000",
                             "--margin", "1000", str(src)], stderr=subprocess.PIPE, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(p.name.endswith(".part") for p in tmp_path.iterdir()):
            time.sleep(0.2)  # wait until it is writing
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=60)
    finally:
        proc.kill()  # never left fitting for the rest of the run
    stderr = proc.stderr.read().decode()
    assert status == 130 and "interrupted" in stderr, stderr
    assert [p.name for p in tmp_path.iterdir()] == ["long.txt"]


def test_python_m_lmzip_and_the_checkout_script(tmp_path):
    for command in ([sys.executable, "-m", "lmzip"], [sys.executable, "cli.py"]):
        done = subprocess.run([*command, "-l", str(FORMATS / "good-zstd-text.lmz")], capture_output=True, cwd=ROOT)
        assert done.returncode == 0 and b"1 segments" in done.stdout, (command, done.stderr)


def test_xz_style_short_forms(workdir):
    assert run("--method", "zstd", "doc.txt").exit_code == 0  # lmzip FILE compresses
    assert Path("doc.txt.lmz").read_bytes()[:4] == b"\x89LMZ"
    r = run("-dc", "doc.txt.lmz")
    assert r.exit_code == 0 and r.stdout_bytes == TEXT
    r = run("doc.txt.lmz", "--decompress", "-c")  # the mode flag may follow the file, as in xz
    assert r.exit_code == 0 and r.stdout_bytes == TEXT
    r = run("-t", "doc.txt.lmz")
    assert r.exit_code == 0 and r.stderr == "doc.txt.lmz: OK\n"
    r = run("-l", "--json", "doc.txt.lmz")
    assert json.loads(r.stdout)["original_size"] == len(TEXT)
    os.rename("doc.txt", "orig.txt")
    assert run("-d", "doc.txt.lmz").exit_code == 0 and Path("doc.txt").read_bytes() == TEXT
    assert run("-zf", "--method", "zstd", "doc.txt").exit_code == 0
    Path("test").write_bytes(TEXT)  # a file named like a command: after --
    assert run("--method", "zstd", "--", "test").exit_code == 0 and Path("test.lmz").exists()


@pytest.mark.parametrize("before", [True, False])
def test_common_flags_before_or_after_the_command(workdir, before):
    def lmzip_(command, flags, *rest):
        return run(*flags, command, *rest) if before else run(command, *flags, *rest)

    r = lmzip_("compress", ["-v"], "--method", "zstd", "doc.txt")
    assert r.exit_code == 0 and r.stderr.startswith("doc.txt: 25 -> ")
    r = lmzip_("compress", ["-q", "-f", "-k"], "--method", "zstd", "doc.txt")
    assert r.exit_code == 0 and r.stderr == ""
    r = lmzip_("test", ["-q"], "doc.txt.lmz")
    assert r.exit_code == 0 and r.stderr == ""
    r = lmzip_("compress", ["-qc"], "--method", "zstd", "doc.txt")
    assert r.exit_code == 0 and r.stdout_bytes[:4] == b"\x89LMZ"
    r = lmzip_("decompress", ["-o", "back.txt"], "doc.txt.lmz")
    assert r.exit_code == 0 and Path("back.txt").read_bytes() == TEXT


def test_ambiguous_command_lines_are_usage_errors(workdir):
    for args, message in [(["-d", "-t", "doc.txt"], "-d and -t exclude each other"),
                          (["-d", "compress", "doc.txt"], "-d and the command name 'compress' exclude"),
                          (["nothere.txt"], "no command or file named 'nothere.txt'"),
                          (["-q"], "Missing argument"),
                          (["doc.txt", "-x"], "No such option '-x'")]:
        r = run(*args)
        assert r.exit_code == 2 and message in r.stderr, (args, r.stderr)
    assert os.listdir() == ["doc.txt"]


def test_outputs_keep_the_inputs_mode_and_times(workdir):
    times = (1_500_000_000_123_456_789, 1_600_000_000_987_654_321)
    os.chmod("doc.txt", 0o640)
    os.utime("doc.txt", ns=times)
    assert run("compress", "--method", "zstd", "doc.txt").exit_code == 0
    st = os.stat("doc.txt.lmz")
    assert (stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns) == (0o640, *times)
    os.rename("doc.txt", "orig.txt")
    os.chmod("doc.txt.lmz", 0o604)
    assert run("decompress", "doc.txt.lmz").exit_code == 0
    st = os.stat("doc.txt")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o604, times[1])
    r = CliRunner().invoke(cli.main, ["compress", "--method", "zstd", "-o", "piped.lmz", "-"], input=TEXT)
    mask = os.umask(0)
    os.umask(mask)
    assert r.exit_code == 0 and stat.S_IMODE(os.stat("piped.lmz").st_mode) == 0o666 & ~mask


def test_progress_only_on_a_terminal_and_not_under_q(workdir, monkeypatch):
    r = run("compress", "--method", "zstd", "doc.txt")
    assert r.exit_code == 0 and r.stderr == ""  # CliRunner's stderr is not a terminal
    monkeypatch.setattr(cli, "_stderr_is_terminal", lambda: True)
    r = run("compress", "--method", "zstd", "-f", "doc.txt")
    assert "\rdoc.txt: 100% of 25 bytes, 1 segments (0 memory, 1 zstd), 0 tokens fitted, done" in r.stderr
    assert r.stderr.endswith("\r\x1b[K")  # erased when done
    r = run("test", "doc.txt.lmz")
    assert "\rdoc.txt.lmz: segment 1/1 (0 memory, 1 zstd), done in " in r.stderr
    assert run("-q", "compress", "--method", "zstd", "-f", "doc.txt").stderr == ""


def test_progress_line_counts_segments_tokens_and_eta():
    p = SimpleNamespace(done=50, total=200, memory=3, zstd=1, tokens=812)
    assert progress_line.describe("doc.txt", p, 30.0, "bytes") == (
        "doc.txt: 25% of 200 bytes, 4 segments (3 memory, 1 zstd), 812 tokens fitted, ETA 1:30")
    p = SimpleNamespace(done=0, total=10, memory=0, zstd=0)
    assert progress_line.describe("a.lmz", p, 0.0, "segments") == "a.lmz: segment 0/10 (0 memory, 0 zstd), ETA -:--"
    assert progress_line.clock_text(3725) == "1:02:05"
    p = SimpleNamespace(done=100, total=200, memory=0, zstd=1, tokens=40, lm=1)
    assert progress_line.describe("doc.txt", p, 30.0, "bytes") == (
        "doc.txt: 50% of 200 bytes, 2 segments (1 lm, 1 zstd), 40 tokens coded, ETA 0:30")

    class Terminal(list):
        def write(self, text):
            self.append(text)

        def flush(self):
            pass

    now = [0.0]
    screen = Terminal()
    line = progress_line.ProgressLine("x", screen, "segments", clock=lambda: now[0])
    for t, done in [(0.0, 0), (0.1, 1), (0.3, 2), (0.35, 4)]:
        now[0] = t
        line(SimpleNamespace(done=done, total=4, memory=done, zstd=0))
    assert [s.split(",")[0] for s in screen] == ["\rx: segment 0/4 (0 memory", "\rx: segment 2/4 (2 memory",
                                                 "\rx: segment 4/4 (4 memory"]  # 0.1 s: too soon
    line.close()
    assert screen[-1] == "\r\x1b[K"


def broken(exception):
    def encode_to(*args, **kwargs):
        raise exception
    return encode_to


def test_an_internal_error_is_one_line_and_v_shows_the_traceback(workdir, monkeypatch):
    monkeypatch.setattr(lmzip.Codec, "encode_to", broken(ValueError("bad\nthing")))
    r = run("compress", "--method", "zstd", "doc.txt")
    assert r.exit_code == 1
    assert r.stderr == ("lmzip: doc.txt: internal error: ValueError: bad thing "
                        "(rerun with -v for the traceback)\n")
    r = run("-v", "compress", "--method", "zstd", "doc.txt")
    assert r.exit_code == 1 and r.stderr.startswith("Traceback (most recent call last):")
    assert r.stderr.endswith("\nlmzip: doc.txt: internal error: ValueError: bad thing\n")
    assert os.listdir() == ["doc.txt"]


def test_option_errors_exit_2_and_other_lmz_errors_1(workdir, monkeypatch):
    monkeypatch.setattr(lmzip.Codec, "encode_to", broken(lmzip.OptionError("margin must be a number")))
    r = run("compress", "--method", "zstd", "doc.txt")
    assert r.exit_code == 2 and "Error: margin must be a number" in r.stderr
    monkeypatch.setattr(lmzip.Codec, "encode_to", broken(lmzip.InputError("unusable")))
    r = run("compress", "--method", "zstd", "doc.txt")
    assert r.exit_code == 1 and r.stderr == "lmzip: doc.txt: unusable\n"


def test_ctrl_c_in_process_exits_130_and_leaves_nothing(workdir, monkeypatch):
    def interrupted(self, data, out, **options):
        out.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(lmzip.Codec, "encode_to", interrupted)
    r = run("compress", "--method", "zstd", "doc.txt", "doc.txt")
    assert r.exit_code == 130 and r.stderr == "lmzip: interrupted\n"
    assert os.listdir() == ["doc.txt"]


def _library_raises_option_error() -> bool:
    try:
        lmzip.encode(b"x", method="zstd", zstd_level=0)
    except lmzip.OptionError:
        return True
    except lmzip.InputError:
        return False
    return False


@pytest.mark.skipif(not _library_raises_option_error(), reason="until the library raises OptionError (issue 18)")
def test_inconsistent_options_exit_2(workdir):
    r = run("compress", "--start-tokens", "50", "--max-tokens", "10", "doc.txt")
    assert r.exit_code == 2 and "start tokens" in r.stderr
    assert run("compress", "--method", "zstd", "--level", "0", "doc.txt").exit_code == 2  # click's range


def test_test_without_the_model_checks_every_payload(workdir):
    shutil.copy(FORMATS / "good-memory-tiny.lmz", "a.lmz")
    r = run("test", "--no-model", "a.lmz")
    assert r.exit_code == 0 and "a.lmz: OK, payloads intact; content not decoded" in r.stderr
    shutil.copy(FORMATS / "bad-payload-checksum.lmz", "b.lmz")
    r = run("test", "--no-model", "b.lmz")
    assert r.exit_code == 1 and "payload checksum mismatch" in r.stderr


def test_work_limit_and_download_flags(workdir):
    shutil.copy(FORMATS / "good-memory-tiny.lmz", "a.lmz")
    r = run("test", "--model", TINY_MODEL, "--work-limit", "3", "a.lmz")
    assert r.exit_code == 1 and "over the limit of 3" in r.stderr and "--work-limit" in r.stderr
    r = run("decompress", "--model", TINY_MODEL, "--work-limit", "100000", "--allow-download", "a.lmz")
    assert r.exit_code == 0 and Path("a").read_bytes() == (FORMATS / "good-memory-tiny.out").read_bytes()


def test_the_journal_is_removed_after_success_and_workers_are_checked(workdir):
    r = run("compress", *TINY_ARGS, "--workers", "1", "doc.txt")
    assert r.exit_code == 0 and sorted(os.listdir()) == ["doc.txt", "doc.txt.lmz"]
    r = run("compress", *TINY_ARGS, "--workers", "none", "-f", "doc.txt")
    assert r.exit_code == 2 and "--workers" in r.output


def test_a_stale_journal_of_other_input_is_refused(workdir):
    os.mkdir("doc.txt.lmz.journal")
    Path("doc.txt.lmz.journal/manifest.json").write_text('{"journal_version": 1, "input_sha256": "00"}')
    r = run("compress", *TINY_ARGS, "--workers", "1", "doc.txt")
    assert r.exit_code == 1 and "of another compression" in r.stderr and "remove it" in r.stderr
    assert not Path("doc.txt.lmz").exists()


def imported_modules(*args) -> tuple[int, set[str]]:
    """Run `python -m lmzip ARGS` under -X importtime: its exit status and every module it imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "lmzip", *args], capture_output=True,
                          cwd=ROOT, timeout=120)
    return done.returncode, {line.rsplit("|", 1)[-1].strip() for line in done.stderr.decode().splitlines()
                             if line.startswith("import time:")}


@pytest.mark.parametrize("args, status", [
    (["--help"], 0),
    (["--version"], 0),
    (["compress", "--help"], 0),
    (["info", "formats/good-memory-tiny.lmz"], 0),
    (["-l", "formats/good-lm-tiny.lmz"], 0),
    (["test", "--no-model", "formats/good-memory-tiny.lmz"], 0),
    (["info", "--json", "formats/good-lm-packed-tiny.lmz"], 0),
    (["-lv", "formats/bad-magic.lmz"], 1),
    (["export", "-c", "formats/good-memory-tiny.lmz"], 0),
])
def test_commands_that_read_only_the_table_start_without_torch(args, status):
    # torch takes about 1.5 s to import; `info` and `--help` should answer at once
    code, modules = imported_modules(*args)
    assert code == status
    assert "lmzip.container" in modules  # the log was read
    assert "torch" not in modules


def test_the_library_reads_an_archive_table_without_torch():
    script = ("import sys, lmzip; blob = open('formats/good-memory-tiny.lmz', 'rb').read(); "
              "assert lmzip.inspect(blob)['segments']; assert 'torch' not in sys.modules; "
              "assert lmzip.Codec().check(blob).segments; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120)
