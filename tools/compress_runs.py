"""Benchmark `lmzip compress` as a user runs it: throughput with --workers, and resuming after kill -9.

throughput: runs `lmzip compress FILE --workers N` for each N for a fixed
wall-clock time, kills it, and counts the tokens of the memory segments its
resume journal holds: tokens verified per wall-clock second, model loading
included. resume: times a fresh run to the end, then a run killed with
SIGKILL at --fraction of that time, then the rerun that finishes it from the
journal, and checks that the archive decodes to the input.

    python tools/compress_runs.py throughput text.txt --workers 1 2 --seconds 600
    python tools/compress_runs.py resume text.txt --fraction 0.5
    python tools/compress_runs.py resume text.txt --options "--method lm"
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmzip.container import KIND_MEMORY  # noqa: E402
from lmzip.kinds import lm, lm_long  # noqa: E402


def lmzip(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *args]


def journal_tokens(journal: Path) -> tuple[int, int]:
    """(tokens, segments) of the memory segments, or lm chunks, in a journal's segment files."""
    tokens = segments = 0
    for path in journal.glob("*.seg"):
        head = json.loads(path.read_bytes().partition(b"\n")[0])
        if head["kind"] in (KIND_MEMORY, lm.KIND, lm_long.KIND):
            tokens += head["token_count"]
            segments += 1
    return tokens, segments


def check_states(journal: Path) -> str:
    """The lm check's outcomes and states under way that a journal holds, for the report."""
    done = sorted(p.stem for p in journal.glob("check.*.note"))
    going = {p.stem: json.loads(p.read_bytes()).get("tokens") for p in journal.glob("checking.*.note")}
    return f"; checks done: {done}, under way (tokens): {going}" if done or going else ""


def run_for(cmd: list[str], seconds: float | None) -> tuple[float, bool]:
    """Run cmd; kill -9 it after `seconds` (None: let it finish). (wall seconds, finished)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too
        proc.wait()
        return time.perf_counter() - started, False
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode(errors='replace')}")
    return time.perf_counter() - started, True


def throughput(args, work: Path) -> None:
    for n in args.workers:
        out = work / f"w{n}.lmz"
        seconds, finished = run_for(lmzip("compress", args.file, "-o", str(out), "-f", "--workers", str(n),
                                          *args.extra), args.seconds)
        tokens, segments = journal_tokens(Path(f"{out}.journal")) if not finished else (None, None)
        if finished:
            print(f"--workers {n}: finished in {seconds:.0f} s before the window closed; use a longer text")
            continue
        print(f"--workers {n}: {tokens} tokens in {segments} verified memory segments in {seconds:.0f} s: "
              f"{tokens / seconds:.3f} tokens verified per second", flush=True)
        shutil.rmtree(f"{out}.journal", ignore_errors=True)


def resume(args, work: Path) -> None:
    out = work / "r.lmz"
    cmd = lmzip("compress", args.file, "-o", str(out), "-f", *args.extra)
    fresh, _ = run_for(cmd, None)
    print(f"fresh run: {fresh:.1f} s", flush=True)
    out.unlink()
    killed_at, finished = run_for(cmd, fresh * args.fraction)
    tokens, segments = journal_tokens(Path(f"{out}.journal"))
    print(f"killed with SIGKILL after {killed_at:.1f} s ({finished=}): the journal holds {segments} memory "
          f"segments or lm chunks, {tokens} tokens{check_states(Path(f'{out}.journal'))}", flush=True)
    rerun, _ = run_for(cmd, None)
    decoded = work / "r.txt"
    subprocess.run(lmzip("decompress", str(out), "-o", str(decoded), "-f"), check=True)
    same = filecmp.cmp(decoded, args.file, shallow=False)
    print(f"rerun: {rerun:.1f} s = {rerun / fresh:.0%} of the fresh run; decodes to the input: {same}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("file")
    t.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    t.add_argument("--seconds", type=float, default=600)
    r = sub.add_parser("resume")
    r.add_argument("file")
    r.add_argument("--fraction", type=float, default=0.5)
    for p in (t, r):
        p.add_argument("--options", default="", help="more options for compress, as one string")
    args = parser.parse_args(argv)
    args.extra = shlex.split(args.options)
    with tempfile.TemporaryDirectory() as tmp:
        (throughput if args.command == "throughput" else resume)(args, Path(tmp))


if __name__ == "__main__":
    main()
