"""The codec: encode bytes into a .lmz archive and decode them back, exactly.

`Codec` holds the expensive state (loaded models) so that many calls share it;
`lmzip.encode()` and `lmzip.decode()` are thin wrappers over a default Codec.
"""

from __future__ import annotations

import hashlib
import io
from collections import deque
from dataclasses import dataclass, replace
from typing import BinaryIO, Callable

import numpy as np
import torch

from . import container, segmenting, zstd_payload
from .container import KIND_MEMORY, KIND_ZSTD, ArchiveWriter, Header
from .errors import (ContentChecksumError, HeaderError, InputError, ModelMismatchError,
                     ModelUnavailableError, SegmentError)
from .fit import FitConfig, FitResult, fit_streams, sink_prefix
from .generate import greedy_decode
from .models import LoadedModel, load_model

METHODS = ("memory", "zstd")
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


def _max_positions(lm: LoadedModel) -> int:
    """How many input positions the model can take (vectors plus generated tokens)."""
    return getattr(lm.model.config, "max_position_embeddings", None) or (1 << 30)


@dataclass
class Progress:
    """What a progress display needs; passed to the callback at the start and after each segment.

    Encoding counts input bytes (segment lengths come from the fit); decoding counts segments.
    """

    done: int
    total: int
    memory: int = 0
    zstd: int = 0


@dataclass(frozen=True)
class SegmentFit:
    region: int      # index of the planned region the segment was cut from
    piece: segmenting.Piece
    result: FitResult


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


ProgressCallback = Callable[[Progress], None]


def _as_bytes(data) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise InputError(f"lmzip encodes bytes or str, not {type(data).__name__}")


class _ZstdRun:
    """Collects consecutive zstd-bound bytes and writes them as few large frames."""

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
            data = bytes(self.buffer)
            self.writer.add(KIND_ZSTD, data, zstd_payload.compress(data, self.level))
            self.buffer.clear()


class Codec:
    """Encodes and decodes .lmz archives, keeping loaded models between calls."""

    def __init__(self, model: str | None = None, device: str | None = None):
        self.default_model = model
        self.device = device
        self._models: dict[str, LoadedModel] = {}

    def model(self, spec: str | None = None) -> LoadedModel:
        spec = spec or self.default_model
        key = spec or ""
        if key not in self._models:
            self._models[key] = load_model(spec, self.device)
        return self._models[key]

    # -- encoding -----------------------------------------------------------------

    def encode(self, data, **options) -> bytes:
        out = io.BytesIO()
        self.encode_to(data, out, **options)
        return out.getvalue()

    def encode_to(self, data, out: BinaryIO, *, method: str = "memory", model: str | None = None,
                  tokens_per_segment: int | None = None, fit: FitConfig | None = None,
                  zstd_level: int = zstd_payload.DEFAULT_LEVEL,
                  progress: ProgressCallback | None = None, **fit_options) -> EncodeReport:
        """Encode `data` (bytes, or str as UTF-8) and write the archive to `out`.

        With `tokens_per_segment` None, segments grow while their vectors hold
        them (the fit sets each length); with N, text is cut every N tokens.
        Extra keyword options (vectors, max_steps, lr, batch_size, margin, …) set
        fields of the FitConfig.
        """
        data = _as_bytes(data)
        if method not in METHODS:
            raise InputError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
        if tokens_per_segment is not None and tokens_per_segment < 1:
            raise InputError("tokens per segment must be at least 1")
        try:
            fit = replace(fit or FitConfig(), **fit_options)
        except TypeError as e:
            raise InputError(f"unknown encoder option: {e}") from None
        if not (1 <= fit.vectors <= container.MAX_VECTORS_PER_SEGMENT
                and 1 <= (fit.max_vectors or 1) <= container.MAX_VECTORS_PER_SEGMENT) or fit.max_steps < 0:
            raise InputError(f"vectors and max vectors must be in [1, {container.MAX_VECTORS_PER_SEGMENT}] "
                             "and max steps not negative")
        if not 0 <= fit.margin <= MAX_MARGIN:  # also false for NaN
            raise InputError(f"margin must be a number in [0, {MAX_MARGIN:g}]")
        if fit.batch_size < 1:
            raise InputError("batch size must be at least 1")
        if not 1 <= fit.start_tokens <= fit.max_tokens or fit.grow_tokens < 1:
            raise InputError("start tokens must be in [1, max tokens] and grow tokens at least 1")
        if not 1 <= zstd_level <= 22:
            raise InputError("zstd level must be in [1, 22]")

        if method == "zstd":
            regions, lm, growing = [segmenting.Piece(data, None)], None, False
        else:
            lm = self.model(model)
            growing = tokens_per_segment is None
            regions = list(segmenting.plan(data, lm.tokenizer, tokens_per_segment
                                           or region_tokens(len(data), fit.batch_size)))
        return self.write_regions(regions, out, lm, fit, growing, zstd_level, progress,
                                  expected_sha256=hashlib.sha256(data).digest())

    def write_regions(self, regions: list[segmenting.Piece], out: BinaryIO, lm: LoadedModel | None,
                      fit: FitConfig, growing: bool, zstd_level: int = zstd_payload.DEFAULT_LEVEL,
                      progress: ProgressCallback | None = None,
                      expected_sha256: bytes | None = None) -> EncodeReport:
        """Fit the regions that have tokens (growing segments within them, or each one whole),
        fall back to zstd for the rest, write the archive."""
        writer = ArchiveWriter()
        run = _ZstdRun(writer, zstd_level)
        state = Progress(0, sum(len(p.data) for p in regions))
        prefix = sink_prefix(lm, fit) if lm is not None else ()
        if lm is not None and (len(prefix) > container.MAX_PREFIX_TOKENS
                               or not all(0 <= t < lm.vocab_size for t in prefix)):
            raise InputError(f"prefix must be at most {container.MAX_PREFIX_TOKENS} token ids "
                             f"below the vocabulary size {lm.vocab_size}")
        streams: dict[int, segmenting.Stream] = {}
        if lm is not None and fit.max_steps > 0:
            # A segment may end up with fit.vector_limit vectors; the decoder must still fit them all.
            room = min(container.MAX_TOKENS_PER_SEGMENT,
                       _max_positions(lm) - len(prefix) - fit.vector_limit)
            for i, p in enumerate(regions):
                if p.ids is None:
                    continue
                if growing and room >= 1:
                    streams[i] = segmenting.Stream(lm.tokenizer, p.data.decode("utf-8"),
                                                   min(fit.max_tokens, room))
                elif not growing and len(p.ids) <= room:
                    streams[i] = segmenting.Stream.whole(lm.tokenizer, p)
        fitted = fit_streams(lm, streams.items(), fit) if streams else iter(())
        fits: list[SegmentFit] = []
        memory_tokens = memory_vectors = 0
        arrived: dict[int, deque] = {i: deque() for i in streams}
        data_hash = hashlib.sha256()  # of what is written, to check it adds up to the input

        def put(piece: segmenting.Piece, result: FitResult | None) -> None:
            nonlocal memory_tokens, memory_vectors
            if result is not None and result.vectors is not None:
                run.flush()
                payload = result.vectors.numpy().astype("<f2").tobytes()
                vector_count = result.vectors.shape[0]
                writer.add(KIND_MEMORY, piece.data, payload, len(piece.ids), vector_count)
                state.memory += 1
                memory_tokens += len(piece.ids)
                memory_vectors += vector_count
            else:
                run.add(piece.data)
                state.zstd += 1
            data_hash.update(piece.data)
            state.done += len(piece.data)
            if progress:
                progress(state)

        if progress:
            progress(state)  # show the bar before the first (slow) fit finishes
        # Streams finish segments out of order; segments are written in order as soon as they can be.
        for index, region in enumerate(regions):
            stream = streams.get(index)
            if stream is None:
                put(region, None)
                continue
            while True:
                while arrived[index]:
                    piece, result = arrived[index].popleft()
                    fits.append(SegmentFit(index, piece, result))
                    put(piece, result)
                if stream.done:
                    break
                key, piece, result = next(fitted)
                arrived[key].append((piece, result))
        run.flush()
        if expected_sha256 is not None and data_hash.digest() != expected_sha256:
            raise RuntimeError("lmzip bug: the segments do not add up to the input")  # never write it
        header = Header(
            original_size=state.total,
            content_sha256=data_hash.digest(),
            segment_count=writer.segment_count,
            **(self._model_fields(lm, fit, prefix) if lm else {}),
        )
        size = writer.finish(out, header)
        return EncodeReport(header.original_size, size, writer.segment_count, state.memory,
                            state.zstd, memory_tokens, memory_vectors, fits)

    @staticmethod
    def _model_fields(lm: LoadedModel, fit: FitConfig, prefix: tuple[int, ...]) -> dict:
        return dict(model_id=lm.model_id, tokenizer_sha256=lm.tokenizer_sha256,
                    weights_sha256=lm.weights_sha256, hidden_size=lm.hidden_size,
                    vectors_per_segment=fit.vectors, compute_dtype=container.DTYPE_FLOAT32,
                    margin=fit.margin, prefix=prefix)

    # -- decoding -----------------------------------------------------------------

    def decode(self, blob, *, model: str | None = None) -> bytes:
        out = io.BytesIO()
        self.decode_to(blob, out, model=model)
        return out.getvalue()

    def decode_to(self, blob, out: BinaryIO, *, model: str | None = None,
                  progress: ProgressCallback | None = None) -> int:
        """Decode an archive into `out`; raise an LmzError unless every byte checks out.

        Bytes are written as segments decode; the caller must discard `out` on
        error (the CLI writes to a temporary file and renames it only on success).
        """
        archive = container.parse(blob)
        header = archive.header
        lm = None
        if any(s.kind == KIND_MEMORY for s in archive.segments):
            try:
                lm = self.model(model or header.model_id)
            except ModelUnavailableError as e:
                raise ModelUnavailableError(
                    f"this archive needs model '{header.model_id}' (weights sha256 "
                    f"{header.weights_sha256.hex()[:16]}…), which cannot be loaded: {e}; "
                    "install it, or pass --model with where it is") from None
            lm.check_matches(header.model_id, header.tokenizer_sha256, header.weights_sha256)
            if lm.hidden_size != header.hidden_size:
                raise ModelMismatchError(f"model mismatch: the archive's vectors have size "
                                         f"{header.hidden_size}, the model's {lm.hidden_size}")
            if any(t >= lm.vocab_size for t in header.prefix):
                raise HeaderError(f"damaged header: a prefix token is outside the model's "
                                  f"vocabulary of {lm.vocab_size}")
        content_hash = hashlib.sha256()
        state = Progress(0, len(archive.segments))
        if progress:
            progress(state)
        for index, segment in enumerate(archive.segments):
            data = self._decode_segment(archive, index, lm)
            if container.crc32(data) != segment.crc32:
                raise SegmentError(index, "checksum mismatch")
            content_hash.update(data)
            out.write(data)
            state.done = index + 1
            if segment.kind == KIND_MEMORY:
                state.memory += 1
            else:
                state.zstd += 1
            if progress:
                progress(state)
        if content_hash.digest() != header.content_sha256:
            raise ContentChecksumError("decoded content does not match the archive's SHA-256")
        return header.original_size

    @staticmethod
    def _decode_segment(archive: container.Archive, index: int, lm: LoadedModel | None) -> bytes:
        segment = archive.segments[index]
        payload = archive.payload(index)
        if segment.kind == KIND_ZSTD:
            try:
                return zstd_payload.decompress(payload, segment.original_length)
            except ValueError as e:
                raise SegmentError(index, str(e)) from None
        prefix = archive.header.prefix
        if len(prefix) + segment.vector_count + segment.token_count > _max_positions(lm):
            raise SegmentError(index, f"{len(prefix)} prefix tokens, {segment.vector_count} vectors and "
                                      f"{segment.token_count} tokens exceed the model's positions")
        vectors = np.frombuffer(payload, dtype="<f2").reshape(segment.vector_count, -1)
        vectors = torch.from_numpy(vectors.astype(np.float32))
        ids = greedy_decode(lm, vectors, segment.token_count, prefix).ids
        text = lm.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        data = text.encode("utf-8", errors="surrogatepass")
        if len(data) != segment.original_length:
            raise SegmentError(index, f"decoded {len(data)} bytes, expected {segment.original_length}")
        return data


def inspect(blob) -> dict:
    """Describe an archive without decoding it: header fields and the segment table."""
    archive = container.parse(blob)
    h = archive.header
    return {
        "format_version": h.version,
        "original_size": h.original_size,
        "archive_size": len(archive.data),
        "content_sha256": h.content_sha256.hex(),
        "model_id": h.model_id or None,
        "tokenizer_sha256": h.tokenizer_sha256.hex() if h.has_model else None,
        "weights_sha256": h.weights_sha256.hex() if h.has_model else None,
        "hidden_size": h.hidden_size,
        "vectors_per_segment": h.vectors_per_segment,
        "compute_dtype": container.DTYPE_NAMES[h.compute_dtype],
        "margin": h.margin,
        "prefix_tokens": list(h.prefix),
        "segments": [
            {"index": i, "kind": s.kind_name, "original_length": s.original_length,
             "payload_length": s.payload_length, "token_count": s.token_count,
             "vector_count": s.vector_count, "crc32": f"{s.crc32:08x}"}
            for i, s in enumerate(archive.segments)
        ],
    }
