"""The codec: encode bytes into a .lmz archive and decode them back, exactly.

`Codec` holds the expensive state (loaded models) so that many calls share it;
`lmzip.encode()` and `lmzip.decode()` are thin wrappers over a default Codec.
Segment kinds do their own coding (`kinds`); the codec plans, dispatches and checks.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass, fields, replace
from typing import BinaryIO, Callable

from . import container, inspection, kinds, linebreaks, lm_journal, segmenting
from .batch_decode import default_batch_size
from .container import KIND_MEMORY, ArchiveWriter, Header
from .journal import Journal, model_identity
from .errors import (ContentChecksumError, HeaderError, InputError, InternalError, ModelMismatchError,
                     ModelUnavailableError, OptionError, SegmentError, WorkLimitError, fitting_out_of_memory)
from .exact.mixing import MAX_VOCAB as MIX_MAX_VOCAB
from .exact.model import VERSIONS
from .fit import FitConfig, fit_regions, sink_prefix
from .inspection import decode_work, inspect  # noqa: F401 - inspect: for `from lmzip.codec import inspect`
from .kinds.memory import max_positions
from .limits import DEFAULT_WORK_LIMIT, MAX_PREFIX_TOKENS, MAX_TOKENS_PER_SEGMENT, MAX_VECTORS_PER_SEGMENT
from .models import LoadedModel, load_model
from .precision import exact_float32
from .sharding import ProcessEnded, cpu_threads

METHODS = kinds.METHODS
# Tokens per lm segment, the context each token is coded in: longer is smaller (first 20 KB of
# alice29: 1.489 bits per byte at 128, 1.264 at 512, 1.172 at 2047) and decodes slower per token
# (BENCHMARKS.md); 2047 fills the exact arithmetic's 2048 positions after the prefix token.
LM_CHUNK_TOKENS = 2047
# The lm method's arithmetic: /3 (kind lm3-group, or lm3 unmixed) unless asked for /2 (kinds 2 to 4,
# for older readers)
LM_ARITHMETIC = 3
LM_ARITHMETICS = tuple(VERSIONS)
LM_PROGRESS_CHUNKS = 16  # lm chunks coded between two progress reports
# Growing segments (no fixed length) are cut from regions fitted side by side, one after another
# within a region. A region's last segment is whatever is left of it, so regions are long, but a
# text of a few thousand tokens is cut into about a batch of them, so that its segments are not
# all fitted one after another.
MIN_REGION_TOKENS, MAX_REGION_TOKENS = 128, 512
BYTES_PER_TOKEN = 4  # about, for English with a BPE tokenizer: only sizes the regions

# Runs of zstd segments are merged up to this size: one frame compresses better than many.
ZSTD_SEGMENT_BYTES = 1 << 20
MAX_MARGIN = 65504.0  # the margin is stored as float32; anything near this is unreachable anyway


def region_tokens(size: int, batch_size: int) -> int:
    return max(MIN_REGION_TOKENS, min(MAX_REGION_TOKENS, size // BYTES_PER_TOKEN // batch_size))


@dataclass
class Progress:
    """What a progress display needs; passed to the callback at the start and after each segment.

    Encoding counts input bytes (segment lengths come from the fit); decoding counts segments.
    """

    done: int
    total: int
    memory: int = 0
    zstd: int = 0
    tokens: int = 0  # memory- or lm-coded tokens so far
    lm: int = 0      # lm-coded segments (--method lm)

    def count(self, kind: int, tokens: int) -> None:
        """One more segment of `kind` holding `tokens` model-coded tokens."""
        if kind == KIND_MEMORY:
            self.memory += 1
        elif kind in kinds.LM_KINDS:
            self.lm += 1
        else:
            self.zstd += 1
        self.tokens += tokens


@dataclass(frozen=True)
class SegmentFit:
    region: int                   # index of the planned region the segment was cut from
    segment: kinds.CodedSegment   # memory-coded, or raw bytes that went to zstd


@dataclass
class EncodeReport:
    original_size: int
    archive_size: int
    segments: int
    memory_segments: int
    zstd_pieces: int  # pieces stored as zstd (runs of them share frames)
    memory_tokens: int
    memory_vectors: int
    fits: list[SegmentFit]  # every segment that was fitted, in archive order
    resumed: int = 0  # memory segments or lm chunks taken from the journal, not done again
    line_flags: int = 0  # method lm: the linebreaks flags its chunks were cut and coded under


ProgressCallback = Callable[[Progress], None]


def _as_bytes(data) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise InputError(f"lmzip encodes bytes or str, not {type(data).__name__}")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _work_limit(limit: int | None) -> int:
    if limit is None:
        value = os.environ.get("LMZIP_WORK_LIMIT")
        try:
            limit = int(value) if value else DEFAULT_WORK_LIMIT
        except ValueError:
            raise OptionError(f"LMZIP_WORK_LIMIT must be a whole number of tokens, not {value!r}") from None
    if limit < 0:
        raise OptionError("the work limit cannot be negative")
    return limit


class _LmCoder:
    """Codes lm chunks into `payloads` (journaling each in `book`), and checks the sample beside
    the coding: each check process takes a core for as long as it runs, the coding the others."""

    def __init__(self, lm, pieces, prefix, payloads: dict[int, bytes], book, state: Progress,
                 progress: ProgressCallback | None, sample, arithmetic: int, contexts: dict | None = None,
                 heads: dict | None = None):
        self.lm, self.pieces, self.prefix, self.payloads, self.book = lm, pieces, prefix, payloads, book
        self.state, self.progress, self.sample, self.arithmetic = state, progress, set(sample), arithmetic
        self.contexts = contexts  # kind 6: per piece index, its group's shared counts
        self.heads = heads  # kind 7: per piece index, the head its chunk follows

    def code(self, todo: list[int], threads: int) -> None:
        """Code `todo` on `threads` cores, in rounds with a progress report after each."""
        size = max(LM_PROGRESS_CHUNKS, threads)
        for start in range(0, len(todo), size):
            batch = todo[start:start + size]
            kept = (lm_journal.keeper(self.book, self.pieces, batch, self.prefix, self.arithmetic)
                    if self.book else None)
            contexts = [self.contexts[i] for i in batch] if self.contexts else None
            heads = [self.heads[i] for i in batch] if self.heads else None
            self.payloads.update(zip(batch, kinds.lm.code(self.lm, [self.pieces[i] for i in batch], self.prefix,
                                                          done=kept, threads=threads, arithmetic=self.arithmetic,
                                                          contexts=contexts, heads=heads)))
            self._count(i for i in batch if i not in self.sample)  # those count once checked

    def check_and_code_rest(self, to_check: list[int], rest: list[int]) -> set[int]:
        """Check `to_check` (coded) while `rest` is coded; the indices that failed the check. Where no
        check process can be forked, or one is killed (by the out-of-memory killer, say), the check
        runs here at the end."""
        cores = kinds.lm.cores(self.lm)
        failed, pending = None, None
        try:
            pending = self._start_check(to_check, aside=bool(rest))
            free = max(1, cores - (pending.cores if pending else 0))  # the cores no check process holds
            while rest and pending and not pending.ready():  # a chunk per free core at a time: it may end
                batch, rest = rest[:free], rest[free:]
                self.code(batch, free)
            if pending:
                try:
                    outcome = pending.result()
                except ProcessEnded:
                    pass
                else:
                    failed = self._checked(outcome, to_check)  # journaled before the rest is coded
        finally:
            if pending:
                pending.cancel()
        self.code(rest, cores)
        if failed is None:
            failed = self._checked(kinds.lm.check(self.lm, self.pieces, self.payloads, self.prefix, to_check,
                                                  arithmetic=self.arithmetic, contexts=self.contexts,
                                                  heads=self.heads, **self._check_journal()), to_check)
        return failed

    def _check_journal(self) -> dict:
        """Where a check may go on from (a killed run's, or a killed check process's, states) and
        how it reports its own."""
        if not self.book:
            return {}
        return {"resume": lm_journal.check_states(self.book, self.payloads),
                "progress": lm_journal.keep_check_states(self.book, self.payloads)}

    def _start_check(self, to_check: list[int], aside: bool):
        if not to_check:
            return None
        try:
            return kinds.lm.start_check(self.lm, self.pieces, self.payloads, self.prefix, to_check, aside=aside,
                                        arithmetic=self.arithmetic, contexts=self.contexts, heads=self.heads,
                                        **self._check_journal())
        except OSError:  # no process could be forked (EAGAIN, ENOMEM)
            return None

    def _checked(self, failed: set[int], to_check: list[int]) -> set[int]:
        if self.book:
            lm_journal.keep_checks(self.book, self.payloads, failed, to_check)
        self._count(to_check)
        return failed

    def _count(self, indices) -> None:
        self.state.done += sum(len(self.pieces[i].data) for i in indices)
        if self.progress:
            self.progress(self.state)


class _RawRun:
    """Collects consecutive raw bytes and writes them as few large zstd frames."""

    def __init__(self, writer: ArchiveWriter, level: int):
        self.writer, self.level, self.buffer = writer, level, bytearray()

    def add(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = ZSTD_SEGMENT_BYTES - len(self.buffer)
            self.buffer += view[:room]
            view = view[room:]
            if len(self.buffer) == ZSTD_SEGMENT_BYTES:
                self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.writer.add(kinds.zstd.encode(bytes(self.buffer), self.level))
            self.buffer.clear()


def _check_fit_options(fit: FitConfig, tokens_per_segment: int | None, zstd_level: int) -> None:
    if tokens_per_segment is not None and tokens_per_segment < 1:
        raise OptionError("tokens per segment must be at least 1")
    if not (1 <= fit.vectors <= MAX_VECTORS_PER_SEGMENT
            and 1 <= (fit.max_vectors or 1) <= MAX_VECTORS_PER_SEGMENT) or fit.max_steps < 0:
        raise OptionError(f"vectors and max vectors must be in [1, {MAX_VECTORS_PER_SEGMENT}] "
                          "and max steps not negative")
    if not 0 <= fit.margin <= MAX_MARGIN:  # also false for NaN
        raise OptionError(f"margin must be a number in [0, {MAX_MARGIN:g}]")
    if not (0 < fit.lr < math.inf and 0 <= fit.hinge < math.inf):  # also false for NaN
        raise OptionError("learning rate must be a positive number and hinge weight a number not negative")
    if fit.batch_size < 1:
        raise OptionError("batch size must be at least 1")
    if not 1 <= fit.start_tokens <= fit.max_tokens or fit.grow_tokens < 1:
        raise OptionError("start tokens must be in [1, max tokens] and grow tokens at least 1")
    if not 1 <= zstd_level <= 22:
        raise OptionError("zstd level must be in [1, 22]")


def _rest_of(region: segmenting.Region, done_bytes: int) -> segmenting.Region | None:
    """What is left to fit of a region after its first `done_bytes` (journaled segments)."""
    data = region.text.encode("utf-8")
    if done_bytes >= len(data):
        return None
    if not region.growing:
        raise InternalError("lmzip bug: a whole region was journaled in part")
    return replace(region, text=data[done_bytes:].decode("utf-8"))


class Codec:
    """Encodes and decodes .lmz archives, keeping loaded models between calls.

    `model` is the model to encode with and, if given, the one to decode with too
    (else an archive's own model is used: the embedded one, or a hub model already in the
    local cache; `allow_download` lets decoding fetch a hub model, as LMZIP_ALLOW_DOWNLOAD=1 does).
    """

    def __init__(self, model: str | None = None, device: str | None = None, allow_download: bool | None = None):
        self.default_model = model
        self.device = device
        self.allow_download = allow_download
        self._models: dict[str, LoadedModel] = {}

    def model(self, spec: str | None = None, allow_download: bool = True, hub_only: bool = False) -> LoadedModel:
        """`hub_only`: `spec` is a name an archive gave, never to be taken as a local directory."""
        spec = spec or self.default_model
        key = ("hub:" if hub_only else "") + (spec or "")
        same = self._models.get(spec or "")
        if hub_only and same is not None and same.source != "local":  # loaded by that name, not from a folder
            return same
        if key not in self._models:
            self._models[key] = load_model(spec, self.device, allow_download=allow_download, hub_only=hub_only)
        return self._models[key]

    # -- encoding -----------------------------------------------------------------

    def encode(self, data, **options) -> bytes:
        out = io.BytesIO()
        self.encode_to(data, out, **options)
        return out.getvalue()

    def encode_to(self, data, out: BinaryIO, *, method: str = "memory", model: str | None = None,
                  tokens_per_segment: int | None = None, fit: FitConfig | None = None,
                  zstd_level: int = kinds.zstd.DEFAULT_LEVEL,
                  progress: ProgressCallback | None = None, workers: int = 1,
                  journal: str | os.PathLike | None = None, cluster: str | None = None,
                  pack_lm: bool = True, lm_arithmetic: int = LM_ARITHMETIC, lm_mix: bool | None = None,
                  lm_head: int | None = None, lm_lines: bool | None = None, **fit_options) -> EncodeReport:
        """Encode `data` (bytes, or str as UTF-8) and write the archive to `out`.

        With `tokens_per_segment` None, segments grow while their vectors hold
        them (the fit sets each length); with N, text is cut every N tokens.
        `workers` > 1 fits memory segments in that many processes; `cluster` ("auto", "local" or a Ray
        address, HOST:PORT) fits on a Ray cluster instead. With `journal` (a directory),
        each finished segment (method lm: each coded chunk) is kept there, and a rerun of
        the same encoding does only what is missing; the caller removes it once the
        archive is safe.
        `lm_arithmetic` 3 (the default) codes lm chunks under arithmetic /3, in kind 5 (lm3)
        segments; 2 under /2, in kinds 2 to 4, which readers before kind 5 know. `pack_lm` False
        writes each lm chunk as a segment of its own (under /2: kinds 2 and 3, which readers older
        than kind 4, lm-packed, know), at 32 bytes of table per chunk. `lm_mix` (default: under /3
        with `pack_lm`) mixes counts shared by the chunks of each segment of up to 16 into their
        frequencies, in kind 6 (lm3-group) segments; False writes kind 5. `lm_head` (default 128 where
        counts are mixed): every chunk of such a segment but the first is coded after that many
        first tokens of the first (kind 7, lm3-head); 0 writes kind 6. `lm_lines` (default True where
        counts are mixed) codes CRLF as LF and a hard-wrapped text's line breaks as spaces, where that
        pays (kind 8, lm3-text); False keeps each text's line breaks as they are.
        Extra keyword options (vectors, max_steps, lr, batch_size, margin, …) set
        fields of the FitConfig.
        """
        data = _as_bytes(data)
        if method not in METHODS:
            raise OptionError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
        unknown = sorted(set(fit_options) - {f.name for f in fields(FitConfig)})
        if unknown:
            raise OptionError(f"unknown encoder option{'s' * (len(unknown) > 1)}: {', '.join(unknown)}")
        fit = replace(fit or FitConfig(), **fit_options)
        _check_fit_options(fit, tokens_per_segment, zstd_level)
        if workers < 1:
            raise OptionError("workers must be at least 1")
        if cluster is not None and workers > 1:
            raise OptionError("fit on a cluster or in worker processes, not both")
        if lm_arithmetic not in LM_ARITHMETICS:
            raise OptionError(f"unknown lm arithmetic {lm_arithmetic!r} (choose from "
                              f"{', '.join(map(str, LM_ARITHMETICS))})")
        mix_asked = bool(lm_mix)
        if lm_mix is None:
            lm_mix = lm_arithmetic == 3 and pack_lm
        if lm_mix and (lm_arithmetic != 3 or not pack_lm):
            raise OptionError("lm_mix needs arithmetic 3 and packed chunks (kind 6 is a segment of chunks under /3)")
        head_asked = bool(lm_head)
        if lm_head is None:
            lm_head = kinds.lm3_head.HEAD_TOKENS if lm_mix else 0
        if not 0 <= lm_head <= MAX_TOKENS_PER_SEGMENT:
            raise OptionError(f"lm_head must be 0 to {MAX_TOKENS_PER_SEGMENT} tokens, not {lm_head}")
        if lm_head and not lm_mix:
            raise OptionError("lm_head needs lm_mix (kind 7's chunks are a group that shares counts)")
        lines_asked = bool(lm_lines)
        if lm_lines is None:
            lm_lines = lm_mix
        if lm_lines and not lm_mix:
            raise OptionError("lm_lines needs lm_mix (kind 8's chunks are a group that shares counts)")
        if method != "memory" and (workers > 1 or cluster is not None):
            raise OptionError(f"workers and cluster fit memory segments; method {method} takes neither")

        sha256 = hashlib.sha256(data).digest()
        if method == "lm":
            return self._encode_lm(data, out, model, fit, tokens_per_segment, zstd_level, progress, sha256,
                                   pack_lm, journal, lm_arithmetic, lm_mix, mix_asked or head_asked or lines_asked,
                                   lm_head, lm_lines)
        if method == "zstd":
            regions, lm, growing = [segmenting.Piece(data, None)], None, False
        else:
            lm = self.model(model)  # the user named it (or the embedded one): it may be fetched
            growing = tokens_per_segment is None
            regions = list(segmenting.plan(data, lm.tokenizer, tokens_per_segment
                                           or region_tokens(len(data), fit.batch_size * workers)))
        fitter = None
        workers = min(workers, sum(p.ids is not None for p in regions))  # a worker per region at most
        if cluster is not None and lm is not None:
            from .cluster import fit_on_ray

            spec = model or self.default_model
            expect = (lm.tokenizer_sha256, lm.weights_sha256)
            fitter = lambda plan: fit_on_ray(cluster, spec, plan, fit, expect=expect,  # noqa: E731
                                             allow_download=bool(self.allow_download))
        elif workers > 1 and lm is not None:
            from .workers import fit_in_workers

            spec = model or self.default_model
            fitter = lambda plan: fit_in_workers(spec, plan, fit, workers)  # noqa: E731
        book = None
        if journal is not None:
            book = Journal(journal, {"input_sha256": sha256.hex(), "method": method,
                                     "tokens_per_segment": tokens_per_segment, "zstd_level": zstd_level,
                                     "fit": repr(fit), "model": lm and model_identity(lm),
                                     "regions": [len(p.data) for p in regions]})
        return self.write_regions(regions, out, lm, fit, growing, zstd_level, progress,
                                  expected_sha256=sha256, fitter=fitter, journal=book)

    def _encode_lm(self, data: bytes, out: BinaryIO, model: str | None, fit: FitConfig,
                   tokens_per_segment: int | None, zstd_level: int, progress: ProgressCallback | None,
                   sha256: bytes, pack: bool, journal: str | os.PathLike | None,
                   arithmetic: int = LM_ARITHMETIC, mix: bool = False, mix_asked: bool = False,
                   head: int = 0, lines: bool = False) -> EncodeReport:
        """Range-code the text's tokens under the model, in chunks (kind lm3 under arithmetic /3, or
        with `mix` lm3-group, whose chunks share counts within a segment, and with a `head` lm3-head,
        whose chunks but the first follow the first's head, and with `lines` lm3-text, over text whose
        line breaks are made what the model reads best; lm-packed, lm and lm-long under /2).
        With `journal`, each chunk's payload is kept there as it is coded, and each sampled chunk's
        check outcome once it is known."""
        lm = self.model(model)
        if mix and lm.vocab_size > MIX_MAX_VOCAB:
            if mix_asked:
                raise OptionError(f"lm_mix (which lm_head and lm_lines need) needs a vocabulary of at most "
                                  f"{MIX_MAX_VOCAB} tokens, not {lm.vocab_size}")
            mix = False  # kind 6's totals would pass the range coder's
        head = head if mix else 0
        lines = linebreaks.choose(segmenting.text_runs(data)) if mix and lines else 0
        prefix = sink_prefix(lm, fit)
        if not prefix:
            raise OptionError("the lm method needs a prefix token (the model has no start-of-text token)")
        pieces, lines = lm_pieces(lm, data, tokens_per_segment, prefix, lines)
        writer = ArchiveWriter()
        run = _RawRun(writer, zstd_level)
        state = Progress(0, len(data))
        coded = [i for i, p in enumerate(pieces) if p.ids is not None]  # piece indices
        sample = coded[::kinds.lm.CHECK_EVERY]
        book, payloads, checked = None, {}, {}
        if journal is not None:
            ident = lm_journal.identity(lm, sha256, tokens_per_segment, prefix, pieces, arithmetic, mix, head, lines)
            book, payloads = lm_journal.resume(journal, ident, pieces)
            checked = {i: ok for i, ok in lm_journal.checks(book, payloads).items() if i in sample}
        resumed = len(payloads)
        # a sampled chunk's bytes count once it is checked, the others' once coded
        state.done += sum(len(pieces[i].data) for i in payloads if i not in sample or i in checked)
        if progress:
            progress(state)
        groups = kinds.lm.group_pieces(pieces, prefix, head) if mix else None
        heads = kinds.lm.group_heads(pieces, groups, prefix, head) if head else None
        contexts = kinds.lm.shared_contexts(pieces, groups, heads) if mix else None
        head_tokens = kinds.lm.head_tokens(pieces, groups, heads) if head else None
        coder = _LmCoder(lm, pieces, prefix, payloads, book, state, progress, sample, arithmetic, contexts,
                         head_tokens)
        # the sample first, so that its check runs beside the coding of the rest
        coder.code([i for i in sample if i not in payloads], kinds.lm.cores(lm))
        failed = {i for i, ok in checked.items() if not ok} | coder.check_and_code_rest(
            [i for i in sample if i not in checked], [i for i in coded if i not in payloads])
        for segment, held in kinds.lm.segments(pieces, payloads, prefix, failed, pack=pack, arithmetic=arithmetic,
                                               groups=groups, heads=heads, lines=lines):
            counted = sum(len(pieces[i].data) for i in held if pieces[i].ids is not None)  # coded and checked
            self._put(segment, writer, run, state, progress, counted=counted)
        run.flush()
        header = Header(original_size=len(data), content_sha256=sha256, segment_count=writer.segment_count,
                        **self._model_fields(lm, replace(fit, vectors=0, margin=0.0), prefix))
        size = writer.finish(out, header)
        return EncodeReport(len(data), size, writer.segment_count, state.lm, state.zstd, state.tokens, 0, [],
                            resumed=resumed, line_flags=lines)

    @staticmethod
    def _put(segment: kinds.CodedSegment, writer: ArchiveWriter, run: "_RawRun", state: Progress,
             progress: ProgressCallback | None, counted: int = 0) -> None:
        """Hand a segment to the writer; `counted`: how many of its bytes state.done holds already."""
        if segment.payload is None:
            run.add(segment.data)
        else:
            run.flush()
            writer.add(segment)
        state.count(segment.kind, segment.token_count)
        state.done += len(segment.data) - counted
        if progress:
            progress(state)

    def _fit_plan(self, regions: list[segmenting.Piece], lm: LoadedModel, fit: FitConfig, growing: bool,
                  prefix: tuple[int, ...]) -> dict[int, segmenting.Region]:
        """The regions to fit, as plain data, keyed by their index."""
        if fit.max_steps == 0:
            return {}
        # A segment may end up with fit.vector_limit vectors; the decoder must still fit them all.
        room = min(MAX_TOKENS_PER_SEGMENT, max_positions(lm) - len(prefix) - fit.vector_limit)
        plan = {}
        for i, p in enumerate(regions):
            if p.ids is None:
                continue
            if growing and room >= 1:
                plan[i] = segmenting.Region(p.data.decode("utf-8"), True, min(fit.max_tokens, room))
            elif not growing and len(p.ids) <= room:
                plan[i] = segmenting.Region(p.data.decode("utf-8"), False, len(p.ids), p.ids)
        return plan

    def write_regions(self, regions: list[segmenting.Piece], out: BinaryIO, lm: LoadedModel | None,
                      fit: FitConfig, growing: bool, zstd_level: int = kinds.zstd.DEFAULT_LEVEL,
                      progress: ProgressCallback | None = None,
                      expected_sha256: bytes | None = None, fitter=None,
                      journal: Journal | None = None) -> EncodeReport:
        """Fit the regions that have tokens (growing segments within them, or each one whole),
        fall back to zstd for the rest, write the archive. `fitter(plan)` fits the plan
        elsewhere (default: here); `journal` keeps each segment and gives back those kept."""
        writer = ArchiveWriter()
        run = _RawRun(writer, zstd_level)
        state = Progress(0, sum(len(p.data) for p in regions))
        prefix = sink_prefix(lm, fit) if lm is not None else ()
        if lm is not None and (len(prefix) > MAX_PREFIX_TOKENS or not all(0 <= t < lm.vocab_size for t in prefix)):
            raise OptionError(f"prefix must be at most {MAX_PREFIX_TOKENS} token ids "
                              f"below the vocabulary size {lm.vocab_size}")
        plan = self._fit_plan(regions, lm, fit, growing, prefix) if lm is not None else {}
        arrived: dict[int, list[kinds.CodedSegment]] = {i: [] for i in plan}
        todo = dict(plan)
        resumed = 0
        for i, kept in (journal.open() if journal else {}).items():
            if i in plan:
                resumed += len(kept)
                arrived[i].extend(kept)
                todo[i] = _rest_of(plan[i], sum(len(s.data) for s in kept))
        todo = {i: r for i, r in todo.items() if r is not None}
        fitted = (fitter or (lambda items: fit_regions(lm, items, fit)))(todo.items()) if todo else iter(())
        fits: list[SegmentFit] = []
        memory_vectors = 0
        data_hash = hashlib.sha256()  # of what is written, to check it adds up to the input

        def put(segment: kinds.CodedSegment) -> None:
            nonlocal memory_vectors
            memory_vectors += segment.vector_count
            data_hash.update(segment.data)
            self._put(segment, writer, run, state, progress)

        if progress:
            progress(state)  # show the bar before the first (slow) fit finishes
        # Regions finish segments out of order; segments are written in order as soon as they can be.
        for index, region in enumerate(regions):
            if index not in plan:
                put(kinds.raw(region.data))
                continue
            left = len(region.data)
            while left:
                while not arrived[index]:
                    key, segment = _next_fit(fitted, lm, fit)
                    if journal:
                        journal.add(key, segment)
                    arrived[key].append(segment)
                segment = arrived[index].pop(0)
                fits.append(SegmentFit(index, segment))
                put(segment)
                left -= len(segment.data)
        run.flush()
        if expected_sha256 is not None and data_hash.digest() != expected_sha256:
            raise InternalError("lmzip bug: the segments do not add up to the input")  # never write it
        header = Header(original_size=state.total, content_sha256=data_hash.digest(),
                        segment_count=writer.segment_count, **(self._model_fields(lm, fit, prefix) if lm else {}))
        size = writer.finish(out, header)
        return EncodeReport(header.original_size, size, writer.segment_count, state.memory,
                            state.zstd, state.tokens, memory_vectors, fits, resumed=resumed)

    @staticmethod
    def _model_fields(lm: LoadedModel, fit: FitConfig, prefix: tuple[int, ...]) -> dict:
        source = container.SOURCE_CODES[lm.source]
        return dict(model_id=lm.model_id, model_source=source, revision=lm.revision,
                    tokenizer_sha256=lm.tokenizer_sha256, weights_sha256=lm.weights_sha256,
                    hidden_size=lm.hidden_size, vectors_per_segment=fit.vectors,
                    compute_dtype=container.DTYPE_FLOAT32, margin=fit.margin, prefix=prefix)

    # -- decoding -----------------------------------------------------------------

    def decode(self, blob, **options) -> bytes:
        out = io.BytesIO()
        self.decode_to(blob, out, **options)
        return out.getvalue()

    def _model_for(self, header: Header, model: str | None, allow_download: bool | None) -> LoadedModel:
        """The model to decode with: the one asked for, else the archive's own (never a surprise download)."""
        allow = allow_download if allow_download is not None else (
            self.allow_download if self.allow_download is not None else _env_flag("LMZIP_ALLOW_DOWNLOAD"))
        spec = model or self.default_model
        if not spec and header.model_source == container.SOURCE_LOCAL:
            raise ModelUnavailableError(
                f"this archive needs the local model '{header.model_id}' (tokenizer sha256 "
                f"{header.tokenizer_sha256.hex()[:16]}…, weights sha256 {header.weights_sha256.hex()[:16]}…): "
                "pass --model with its directory")
        from_archive = not spec and header.model_source != container.SOURCE_EMBEDDED
        if from_archive:
            spec = header.model_id
        try:
            lm = self.model(spec, allow_download=allow, hub_only=from_archive)
        except ModelUnavailableError as e:
            raise ModelUnavailableError(
                f"this archive needs model '{header.model_id}' ({header.source_name}; weights sha256 "
                f"{header.weights_sha256.hex()[:16]}…), which cannot be loaded: {e}; "
                "install it, or pass --model with where it is") from None
        lm.check_matches(header.model_id, header.tokenizer_sha256, header.weights_sha256,
                         legacy=header.version < 3)
        if lm.hidden_size != header.hidden_size:
            raise ModelMismatchError(f"model mismatch: the archive's vectors have size "
                                     f"{header.hidden_size}, the model's {lm.hidden_size}")
        if any(t >= lm.vocab_size for t in header.prefix):
            raise HeaderError(f"damaged header: a prefix token is outside the model's "
                              f"vocabulary of {lm.vocab_size}")
        return lm

    def check(self, blob) -> container.Archive:
        """Integrity without the model: structure, limits and every payload's CRC-32 (v3)."""
        return inspection.check(blob)

    def decode_to(self, blob, out: BinaryIO, *, model: str | None = None,
                  progress: ProgressCallback | None = None, allow_download: bool | None = None,
                  work_limit: int | None = None, batch_size: int | None = None) -> int:
        """Decode an archive into `out`; raise an LmzError unless every byte checks out.

        Bytes are written as segments decode; the caller must discard `out` on
        error (the CLI writes to a temporary file and renames it only on success).
        Decoding costs at most `work_limit` model steps (default: LMZIP_WORK_LIMIT or
        2^26), checked before any model runs. `batch_size`: rows decoded together
        (default 128 on a CPU, 512 on a GPU); any size gives the same bytes.
        """
        if batch_size is not None and batch_size < 1:
            raise OptionError("batch size must be at least 1")
        archive = self.check(blob)
        header = archive.header
        limit, work = _work_limit(work_limit), decode_work(archive)
        if work > limit:
            raise WorkLimitError(f"decoding needs {work} model steps, over the limit of {limit} "
                                 "(raise it with --work-limit or LMZIP_WORK_LIMIT)")
        lm = None
        if any(kinds.get(s.kind).NEEDS_MODEL for s in archive.segments):
            lm = self._model_for(header, model, allow_download)
        if batch_size is None:
            batch_size = default_batch_size(lm.device if lm is not None else None)
        ctx = kinds.DecodeContext(header, lm, batch_size, cpu_threads(lm.device) if lm is not None else 1)
        window = batch_size * ctx.threads  # segments in memory at once: a batch per thread
        content_hash = hashlib.sha256()
        state = Progress(0, len(archive.segments))
        if progress:
            progress(state)
        with exact_float32():
            for start in range(0, len(archive.segments), window):
                indices = range(start, min(start + window, len(archive.segments)))
                for index, data in zip(indices, self._decode_window(archive, indices, ctx)):
                    content_hash.update(data)
                    out.write(data)
                    segment = archive.segments[index]
                    state.done = index + 1
                    state.count(segment.kind, segment.token_count)
                    if progress:
                        progress(state)
        if content_hash.digest() != header.content_sha256:
            raise ContentChecksumError("decoded content does not match the archive's SHA-256")
        return header.original_size

    @staticmethod
    def _decode_window(archive: container.Archive, indices: range, ctx: kinds.DecodeContext) -> list[bytes]:
        """Decode some segments, each kind's together; a checksum that fails in a batch is decoded alone
        before it counts as damage (SPEC.md, "Batched decoding")."""
        jobs: dict[int, list[kinds.DecodeJob]] = {}
        for i in indices:
            jobs.setdefault(archive.segments[i].kind, []).append(
                kinds.DecodeJob(i, archive.segments[i], bytes(archive.payload(i))))
        decoded: dict[int, bytes] = {}
        for kind, group in jobs.items():
            module = kinds.get(kind)
            for job, data in zip(group, module.decode(group, ctx)):
                if container.crc32(data) != job.entry.crc32 and len(group) > 1:
                    (data,) = module.decode([job], ctx)
                if container.crc32(data) != job.entry.crc32:
                    raise SegmentError(job.index, "checksum mismatch")
                decoded[job.index] = data
        return [decoded[i] for i in indices]


def _next_fit(fitted, lm: LoadedModel, fit: FitConfig):
    """The next (region, segment) the fitter hands back; a device out of memory is the user's
    to fix (fewer rows at a time), not a bug."""
    import torch

    try:
        return next(fitted)
    except torch.OutOfMemoryError:
        raise fitting_out_of_memory(str(lm.device), fit.batch_size) from None


def lm_pieces(lm: LoadedModel, data: bytes, tokens_per_segment: int | None,
              prefix: tuple[int, ...], lines: int = 0) -> tuple[list[segmenting.Piece], int]:
    """The text cut as `--method lm` cuts it: chunks of tokens (of the text as the `lines` flags
    code it), and runs that are not UTF-8 (ids None); and the flags, 0 where a chunk coded under
    them would not fit."""
    most = kinds.lm.max_chunk_tokens(prefix)
    if tokens_per_segment is not None and tokens_per_segment > most:
        raise OptionError(f"the lm method takes chunks of at most {most} tokens, not {tokens_per_segment}")
    chunk = min(tokens_per_segment or LM_CHUNK_TOKENS, most)
    if lines:
        # a chunk codes on its own the line breaks at its ends, which the cut counted as the whole
        # text's: a token more at either end at most
        pieces = list(segmenting.plan(data, lm.tokenizer, max(1, min(chunk, most - 2)),
                                      worth=lambda tokenizer, text: True, lines=lines))
        if all(p.ids is None or len(p.ids) <= most for p in pieces):
            return pieces, lines
    return list(segmenting.plan(data, lm.tokenizer, chunk, worth=lambda tokenizer, text: True)), 0
