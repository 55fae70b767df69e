"""A resume journal: each finished segment of a long compression, kept safely beside the output.

A journal is a directory (`OUTPUT.journal`) with a manifest naming the input, the
options and the model, and one file per finished segment, each written to a
temporary name, flushed to disk and renamed, so that a crash or `kill -9` leaves
whole segments only. Rerunning the same command fits only what is missing; a
journal of other input or options is refused, never mixed in. The codec removes
the journal once the archive is written.

Segment files hold plain data (a JSON header line, the original bytes, the
payload), and note files small JSON records (lm's check outcomes); nothing in a
journal is unpickled or executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

from . import __version__
from .errors import JournalError
from .kinds import CodedSegment

MANIFEST = "manifest.json"
_WHAT = {"input_sha256": "input", "method": "--method", "tokens_per_segment": "--tokens", "zstd_level": "--level",
         "fit": "fitting options", "lmzip": "lmzip version", "arithmetic": "lm arithmetic", "chunks": "chunks", "shared_counts": "shared counts (kind 6)",
         "head_tokens": "head (kind 7)", "line_flags": "line breaks (kind 8)",
         "regions": "regions", "prefix": "prefix tokens", "model": "model", "journal_version": "journal format"}
JOURNAL_VERSION = 1


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def _encode_segment(segment: CodedSegment) -> bytes:
    head = {"kind": segment.kind, "token_count": segment.token_count, "vector_count": segment.vector_count,
            "data_length": len(segment.data),
            "payload_length": None if segment.payload is None else len(segment.payload),
            "sha256": hashlib.sha256(segment.data + (segment.payload or b"")).hexdigest(),
            "stats": segment.stats}
    return json.dumps(head, sort_keys=True).encode() + b"\n" + segment.data + (segment.payload or b"")


def _decode_segment(blob: bytes) -> CodedSegment:
    line, _, rest = blob.partition(b"\n")
    head = json.loads(line)
    n, m = head["data_length"], head["payload_length"]
    if len(rest) != n + (m or 0) or hashlib.sha256(rest).hexdigest() != head["sha256"]:
        raise ValueError("segment file is damaged")
    return CodedSegment(head["kind"], rest[:n], None if m is None else rest[n:], head["token_count"],
                        head["vector_count"], head["stats"])


def model_identity(lm) -> list[str]:
    """The model as a journal names it: its name and both fingerprints."""
    return [lm.model_id, lm.weights_sha256.hex(), lm.tokenizer_sha256.hex()]


class Journal:
    """The journal of one compression: `identity` names its input, options and model; the
    journal's format and lmzip's version are added (another version may code differently)."""

    def __init__(self, directory: str | os.PathLike, identity: dict):
        self.directory = Path(directory)
        self.identity = {"journal_version": JOURNAL_VERSION, "lmzip": __version__, **identity}
        self._counts: dict[int, int] = {}
        self._lock = threading.Lock()

    def open(self) -> dict[int, list[CodedSegment]]:
        """Create the journal, or check an existing one; return its finished segments by region."""
        manifest = self.directory / MANIFEST
        if manifest.exists():
            try:
                found = json.loads(manifest.read_text())
            except (OSError, ValueError) as e:
                raise JournalError(f"cannot read the journal {self.directory}: {e}; remove it to start over") from None
            if found != self.identity:
                differs = [k for k in set(found) | set(self.identity) if found.get(k) != self.identity.get(k)]
                if "method" in differs:  # the rest follows from it
                    differs = ["method"]
                named = sorted(_WHAT.get(k, k) for k in differs)
                raise JournalError(f"the journal {self.directory} is of another compression (its {', '.join(named)} "
                                   "differ); remove it to start over, or finish it with the command and lmzip "
                                   "version that made it")
            return self._load()
        if self.directory.exists() and any(self.directory.iterdir()):
            raise JournalError(f"{self.directory} exists and is not a journal; remove it or name another output")
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(manifest, json.dumps(self.identity, sort_keys=True).encode())
        return {}

    def _load(self) -> dict[int, list[CodedSegment]]:
        """Each region's segments, as far as they run on unbroken from its start."""
        found: dict[int, dict[int, Path]] = {}
        for path in self.directory.glob("*.seg"):
            region, _, seq = path.stem.partition(".")
            if region.isdigit() and seq.isdigit():
                found.setdefault(int(region), {})[int(seq)] = path
        done: dict[int, list[CodedSegment]] = {}
        for region, files in found.items():
            segments = []
            for seq in range(len(files)):
                if seq not in files:
                    break
                try:
                    segments.append(_decode_segment(files[seq].read_bytes()))
                except (OSError, ValueError, KeyError, TypeError):
                    break  # refit from here
            for seq, path in files.items():
                if seq >= len(segments):  # past a gap or damage: refitted, never chained on
                    path.unlink(missing_ok=True)
            self._counts[region] = len(segments)
            if segments:
                done[region] = segments
        return done

    def add(self, region: int, segment: CodedSegment) -> None:
        """Keep `segment` as the region's next; threads may call this at once (lm's shards do)."""
        with self._lock:
            seq = self._counts.get(region, 0)
            _write_atomically(self.directory / f"{region:08d}.{seq:06d}.seg", _encode_segment(segment))
            self._counts[region] = seq + 1

    def note(self, name: str, record: dict) -> None:
        """Keep a small JSON record under `name` (letters, digits, dots), replacing an earlier one."""
        if not re.fullmatch(r"[A-Za-z0-9.]+", name):
            raise ValueError(f"a journal note's name must be letters, digits and dots, not {name!r}")
        _write_atomically(self.directory / f"{name}.note", json.dumps(record, sort_keys=True).encode())

    def notes(self) -> dict[str, dict]:
        """The records kept by `note`; a damaged one is dropped (what it said is done again)."""
        found = {}
        for path in self.directory.glob("*.note"):
            try:
                record = json.loads(path.read_bytes())
            except (OSError, ValueError):
                record = None
            if isinstance(record, dict):
                found[path.stem] = record
            else:
                path.unlink(missing_ok=True)
        return found

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
