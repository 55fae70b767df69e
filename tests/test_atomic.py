"""Temporary files of outputs: a killed run's are removed by the next run to the same target,
a live run's never (lmzip/part_files.py, through lmzip/atomic.py)."""

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lmzip import atomic, part_files

from conftest import ROOT, TINY_MODEL

OLD = time.time() - 10 * part_files.STALE_AFTER_S


def parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def make_part(folder: Path, name: str, mtime: float = OLD) -> Path:
    part = folder / name
    part.write_bytes(b"half an archive")
    os.utime(part, (mtime, mtime))
    return part


def test_an_old_unlocked_part_of_the_target_is_removed(tmp_path):
    make_part(tmp_path, ".doc.lmz.a1b2_c3d.part")
    with atomic.atomic_output(tmp_path / "doc.lmz") as f:
        f.write(b"whole")
    assert sorted(os.listdir(tmp_path)) == ["doc.lmz"]


def test_parts_of_live_runs_other_targets_and_recent_ones_stay(tmp_path):
    locked = make_part(tmp_path, ".doc.lmz.lockedxx.part")
    fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a live run holds its own
    try:
        kept = [locked.name, make_part(tmp_path, ".doc.lmz.recentxx.part", time.time()).name,
                make_part(tmp_path, ".doc.lmz.x.part").name,            # not mkstemp's name
                make_part(tmp_path, ".doc.lmz.old.lmz.a1b2c3d4.part").name,  # another target's
                make_part(tmp_path, ".other.lmz.a1b2c3d4.part").name]
        part_files.remove_stale(tmp_path / "doc.lmz")
        assert parts(tmp_path) == sorted(kept)
    finally:
        os.close(fd)


def test_only_regular_files_of_this_user_are_removed(tmp_path):
    (tmp_path / ".doc.lmz.folder00.part").mkdir()
    os.mkfifo(tmp_path / ".doc.lmz.fifo0000.part")
    os.utime(tmp_path / ".doc.lmz.fifo0000.part", (OLD, OLD))
    target = make_part(tmp_path, "elsewhere")
    os.symlink(target, tmp_path / ".doc.lmz.symlink0.part")
    foreign = make_part(tmp_path, ".doc.lmz.foreign0.part")
    if os.getuid() == 0:
        os.chown(foreign, 12345, 12345)
    else:
        foreign.unlink()
    before = sorted(os.listdir(tmp_path))
    part_files.remove_stale(tmp_path / "doc.lmz")
    assert sorted(os.listdir(tmp_path)) == before


def test_a_run_holds_its_part_until_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "doc.lmz"
    old_input = make_part(tmp_path, "input.txt")
    utime = os.utime

    def another_run_between_close_and_rename(path, *args, **kwargs):
        utime(path, *args, **kwargs)  # the part now has the input's old times, and is closed
        part_files.remove_stale(target)

    with atomic.atomic_output(target, like=os.stat(old_input)) as f:
        f.write(b"whole")
        [mine] = parts(tmp_path)
        os.utime(tmp_path / mine, (OLD, OLD))  # as old as a killed run's
        part_files.remove_stale(target)
        assert parts(tmp_path) == [mine], "a live run's temporary file was removed"
        monkeypatch.setattr(os, "utime", another_run_between_close_and_rename)
    assert target.read_bytes() == b"whole"


def test_a_part_removed_by_someone_else_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="temporary file vanished") as caught:
        with atomic.atomic_output(tmp_path / "doc.lmz") as f:
            [mine] = parts(tmp_path)
            os.unlink(tmp_path / mine)
    assert caught.value.filename == str(tmp_path / mine)


def test_kill_9_leaves_a_part_that_the_next_run_removes(tmp_path):
    src = tmp_path / "long.txt"
    src.write_text("A long text that takes a while to fit. " * 200)
    proc = subprocess.Popen([sys.executable, "-m", "lmzip", "compress", "--model", TINY_MODEL, "--no-journal",
                             "--tokens", "8", "--max-steps", "100000", "--margin", "1000", str(src)],
                            stderr=subprocess.PIPE, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not parts(tmp_path) and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert len(parts(tmp_path)) == 1, proc.stderr.read().decode()
    os.utime(tmp_path / parts(tmp_path)[0], (OLD, OLD))
    done = subprocess.run([sys.executable, "-m", "lmzip", "compress", "--method", "zstd", str(src)],
                          capture_output=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["long.txt", "long.txt.lmz"]


def test_mkstemp_names_are_recognised(tmp_path):
    for _ in range(20):
        fd, name = tempfile.mkstemp(prefix=part_files.prefix(tmp_path / "doc.lmz"), suffix=part_files.SUFFIX,
                                    dir=tmp_path)
        os.close(fd)
        assert part_files.is_ours(os.path.basename(name), tmp_path / "doc.lmz")
        assert not part_files.is_ours(os.path.basename(name), tmp_path / "doc")
