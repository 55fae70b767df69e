"""The resume journal of an lm compression: one entry per coded chunk, and the check's outcomes.

Each chunk's payload is journaled as soon as it is coded, with a SHA-256 of its
token ids. A rerun takes the payloads of the chunks the journal holds, each
checked against the input's chunk (its bytes, its token ids, a bounded payload),
and codes only the rest; the archive is then the same, byte for byte. The
encoder's check of its sample is journaled too, per chunk and tied to the
payload it decoded, so a rerun does not decode those chunks again; and so is the
state of a check under way (`check.N` and `checking.N` notes), so a rerun goes on
from there.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

from . import kinds
from .errors import JournalError
from .exact.model import VERSIONS
from .journal import Journal, model_identity
from .segmenting import Piece


def identity(lm, input_sha256: bytes, tokens_per_segment: int | None, prefix, pieces: list[Piece],
             arithmetic: int, mix: bool = False, head: int = 0, lines: int = 0) -> dict:
    """What a journal must match to be resumed: input, chunking, prefix, model, arithmetic,
    whether shared counts are mixed in (kind 6), the head (kind 7) and the line flags (kind 8)."""
    ident = {"input_sha256": input_sha256.hex(), "method": "lm", "tokens_per_segment": tokens_per_segment,
             "prefix": list(prefix), "arithmetic": VERSIONS[arithmetic].decode(), "model": model_identity(lm),
             "chunks": [len(p.data) for p in pieces]}
    if mix:  # only then: a journal of kind 5 chunks from before kind 6 still resumes
        ident["shared_counts"] = True
    if head:
        ident["head_tokens"] = head
    if lines:
        ident["line_flags"] = lines
    return ident


def ids_sha256(ids) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def matches(segment: kinds.CodedSegment, piece: Piece | None) -> bool:
    """A journaled chunk is the input's `piece`: the same bytes and token ids, and a payload
    no longer than a segment of that many tokens may hold."""
    return (piece is not None and piece.ids is not None and segment.data == piece.data
            and segment.token_count == len(piece.ids) and segment.payload is not None
            and (segment.stats or {}).get("ids_sha256") == ids_sha256(piece.ids)
            and len(segment.payload) <= kinds.lm.MAX_PAYLOAD_BYTES_PER_TOKEN * len(piece.ids)
            + kinds.lm.PAYLOAD_SLACK)


def resume(directory: str | os.PathLike, ident: dict, pieces: list[Piece]) -> tuple[Journal, dict[int, bytes]]:
    """Open (or start) the journal; the payloads it holds, by piece index."""
    book = Journal(directory, ident)
    payloads = {}
    for i, kept in book.open().items():
        if not matches(kept[0], pieces[i] if 0 <= i < len(pieces) else None):
            raise JournalError(f"the journal {book.directory} holds a chunk {i} that is not the input's; "
                               "remove it to start over")
        payloads[i] = kept[0].payload
    return book, payloads


def keeper(book: Journal, pieces: list[Piece], batch: list[int], prefix,
           arithmetic: int) -> Callable[[int, bytes], None]:
    """A `done` callback for kinds.lm.code over the pieces `batch` names: it journals each
    chunk's payload (from the shard thread that coded it)."""
    def done(position: int, payload: bytes) -> None:
        i = batch[position]
        ids = pieces[i].ids
        book.add(i, kinds.CodedSegment(kinds.lm.kind_of(len(ids), prefix, arithmetic), pieces[i].data, payload,
                                       token_count=len(ids), stats={"ids_sha256": ids_sha256(ids)}))

    return done


def _payload_sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def keep_checks(book: Journal, payloads: dict[int, bytes], failed: set[int], sample) -> None:
    """Journal whether each chunk of the checked `sample` decoded back (not in `failed`)."""
    for i in sample:
        book.note(f"check.{i}", {"payload_sha256": _payload_sha256(payloads[i]), "ok": i not in failed})


def checks(book: Journal, payloads: dict[int, bytes]) -> dict[int, bool]:
    """The journaled check outcomes, by chunk index, of the payloads the journal holds."""
    return {i: record["ok"] for i, record in _notes_of(book, "check", payloads).items()
            if isinstance(record.get("ok"), bool)}


def keep_check_states(book: Journal, payloads: dict[int, bytes]) -> Callable[[int, int, str], None]:
    """A `progress` callback for kinds.lm.check: it journals the state a checked chunk's decoding
    reached (from the check's process, one note per chunk, replaced as it goes on). A note that
    cannot be written (a full disk) costs only that point to resume from, not the run."""
    def keep(i: int, tokens: int, digest: str) -> None:
        try:
            book.note(f"checking.{i}", {"payload_sha256": _payload_sha256(payloads[i]), "tokens": tokens,
                                        "state_sha256": digest})
        except OSError:
            pass

    return keep


def check_states(book: Journal, payloads: dict[int, bytes]) -> dict[int, tuple[int, str]]:
    """The journaled states of checks under way, by chunk index: (tokens, digest), for kinds.lm.check's
    `resume`, of the payloads the journal holds."""
    notes = _notes_of(book, "checking", payloads)
    return {i: (r["tokens"], r["state_sha256"]) for i, r in notes.items()
            if type(r.get("tokens")) is int and r["tokens"] > 0 and isinstance(r.get("state_sha256"), str)}


def _notes_of(book: Journal, kind: str, payloads: dict[int, bytes]) -> dict[int, dict]:
    """The `kind.N` notes, by chunk index N, that name the payload the journal holds for chunk N."""
    found = {}
    for name, record in book.notes().items():
        prefix, _, index = name.partition(".")
        if (prefix == kind and index.isdigit() and int(index) in payloads
                and record.get("payload_sha256") == _payload_sha256(payloads[int(index)])):
            found[int(index)] = record
    return found
