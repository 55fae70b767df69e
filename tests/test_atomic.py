"""Temporary files of outputs: a killed run's are removed by the next run to the same target,
a live run's never."""

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmzip import atomic

from conftest import ROOT, TINY_MODEL

OLD = time.time() - 10 * atomic.STALE_AFTER_S


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
        atomic.remove_stale_parts(tmp_path / "doc.lmz")
        assert parts(tmp_path) == sorted(kept)
    finally:
        os.close(fd)


def test_a_run_holds_its_part_until_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "doc.lmz"
    old_input = make_part(tmp_path, "input.txt")
    utime = os.utime

    def another_run_between_close_and_rename(path, *args, **kwargs):
        utime(path, *args, **kwargs)  # the part now has the input's old times, and is closed
        atomic.remove_stale_parts(target)

    with atomic.atomic_output(target, like=os.stat(old_input)) as f:
        f.write(b"whole")
        [mine] = parts(tmp_path)
        os.utime(tmp_path / mine, (OLD, OLD))  # as old as a killed run's
        atomic.remove_stale_parts(target)
        assert parts(tmp_path) == [mine], "a live run's temporary file was removed"
        monkeypatch.setattr(os, "utime", another_run_between_close_and_rename)
    assert target.read_bytes() == b"whole"


def test_kill_9_leaves_a_part_that_the_next_run_removes(tmp_path):
    src = tmp_path / "long.txt"
    src.write_text("A long text that takes a while to fit. " * 200)
    proc = subprocess.Popen([sys.executable, "-m", "lmzip", "compress", "--model", TINY_MODEL, "--no-journal",
                             "--tokens", "8", "--max-steps", "100000", "--margin", "1000", str(src)],
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not parts(tmp_path):
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    [left] = parts(tmp_path)
    os.utime(tmp_path / left, (OLD, OLD))
    done = subprocess.run([sys.executable, "-m", "lmzip", "compress", "--method", "zstd", str(src)],
                          capture_output=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["long.txt", "long.txt.lmz"]


@pytest.mark.parametrize("name", [".doc.lmz.abcdefgh.part", ".doc.lmz.a_b_c_d_.part"])
def test_mkstemp_names_are_recognised(name):
    assert atomic._is_our_part(name, "doc.lmz")
    assert not atomic._is_our_part(name, "doc")
