"""`lmzip bench`: the seed paper's table, speed, and bytes against zstd and xz.

A text is cut into chunks of a fixed number of characters (as the paper cut
its blog post), or a CSV gives one chunk per row in its `chunk` column. Each
chunk becomes one segment of a real archive, made by the real encoder; the
archive is then decoded once by the real decoder, each segment timed.
"""

from __future__ import annotations

import csv
import io
import lzma
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import zstandard

from . import segmenting
from .codec import Codec, Progress, ProgressCallback
from .errors import InputError, InternalError
from .fit_config import FitConfig


@dataclass
class ChunkRow:
    index: int
    chars: int
    tokens: int
    segments: int            # memory-coding segments the chunk was cut into (1 unless --tokens)
    kind: str                # how it was stored: memory, zstd, or mixed
    exact: bool              # the real decoder gave back exactly its bytes, all from memory vectors
    vectors: int             # memory vectors stored for it
    memory_tokens: int       # tokens those vectors hold
    accuracy: float | None   # teacher-forced token accuracy (None: no tokens to fit)
    steps: int               # over all its segments and attempts
    fit_seconds: float       # from its first segment entering a batch to its last leaving one
                             # (growing segments of a chunk are fitted one after another)
    decode_seconds: float | None
    min_margin: float | None


def load_chunks(paths: list[str], chunk_chars: int, limit: int | None, skip: int = 0) -> list[str]:
    chunks: list[str] = []
    for name in paths:
        path = Path(name)
        # newline="": the file's own characters (the csv module needs it too); universal
        # newlines would turn CRLF into LF, so chunks and their bytes would not be the file's
        with path.open(newline="", encoding="utf-8") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                if "chunk" not in (reader.fieldnames or []):
                    raise InputError(f"{name}: a CSV needs a 'chunk' column")
                chunks += [row["chunk"] for row in reader]
            else:
                text = f.read()
                chunks += [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    chunks = [c for c in chunks if c][skip:]
    return chunks[:limit] if limit else chunks


def _time_plain_generate(lm, ids: list[int]) -> float:
    """Seconds for the model's own generate() to produce len(ids) - 1 tokens after the first."""
    prompt = torch.tensor([ids[:1]], device=lm.device)
    n = max(len(ids) - 1, 1)
    start = time.perf_counter()
    with torch.no_grad():
        lm.model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones_like(prompt), pad_token_id=ids[0])
    return time.perf_counter() - start


def _decode_timed(codec: Codec, archive: bytes, model: str | None, original: bytes) -> list[float]:
    """Decode the whole archive once, as the decoder does; return each memory segment's seconds.

    decode_to raises unless every segment's CRC-32 and the whole SHA-256 match, so a
    memory segment that decoded here came back exactly.
    """
    seconds: list[float] = []
    last = 0.0

    def tick(p: Progress) -> None:
        nonlocal last
        now = time.perf_counter()
        if p.memory > len(seconds):
            seconds.append(now - last)
        last = now

    out = io.BytesIO()
    codec.decode_to(archive, out, model=model, progress=tick)
    if out.getvalue() != original:
        raise InternalError("lmzip bug: the bench archive did not decode to its input")
    return seconds


def _regions(lm, chunk: str, tokens_per_segment: int | None) -> list[segmenting.Piece]:
    """A chunk as the encoder plans it: whole (growing segments are cut from it), or every N tokens."""
    if tokens_per_segment is None:
        return [segmenting.memory_piece(lm.tokenizer, chunk)]
    return list(segmenting.plan(chunk.encode("utf-8"), lm.tokenizer, tokens_per_segment))


def run(codec: Codec, paths: list[str], *, chunk_chars: int = 100, limit: int | None = 20, skip: int = 0,
        model: str | None = None, fit: FitConfig | None = None, tokens_per_segment: int | None = None,
        whole: bool = False, progress: ProgressCallback | None = None) -> dict:
    """Benchmark the chunks: segments grow within each chunk as in `compress`, or each chunk is
    fitted whole (`whole`, the paper's setting), or cut every `tokens_per_segment` tokens."""
    if chunk_chars < 1:
        raise InputError("chunk length must be at least 1 character")
    if tokens_per_segment is not None and tokens_per_segment < 1:
        raise InputError("tokens per segment must be at least 1")
    if whole and tokens_per_segment is not None:
        raise InputError("a chunk is either fitted whole or cut into segments of N tokens, not both")
    if skip < 0:
        raise InputError("chunks to skip cannot be negative")
    chunks = load_chunks(paths, chunk_chars, limit, skip)
    if not chunks:
        raise InputError(f"no chunk left after skipping {skip}" if skip else "no text to benchmark")
    fit = fit or FitConfig()
    lm = codec.model(model)
    regions, chunk_of = [], []
    for chunk_index, chunk in enumerate(chunks):
        for piece in _regions(lm, chunk, tokens_per_segment):
            regions.append(piece)
            chunk_of.append(chunk_index)
    original = b"".join(p.data for p in regions)
    growing = tokens_per_segment is None and not whole

    out = io.BytesIO()
    started = time.perf_counter()
    report = codec.write_regions(regions, out, lm, fit, growing, progress=progress)
    fit_wall = time.perf_counter() - started
    archive_bytes = out.getvalue()
    memory_seconds = iter(_decode_timed(codec, archive_bytes, model, original))

    by_chunk: list[list] = [[] for _ in chunks]
    for f in report.fits:
        by_chunk[chunk_of[f.region]].append(f.segment)
    fitted_regions = {f.region for f in report.fits}
    unfitted_by_chunk: list[list] = [[] for _ in chunks]
    for i, (piece, chunk_index) in enumerate(zip(regions, chunk_of)):
        if i not in fitted_regions:
            unfitted_by_chunk[chunk_index].append(piece)
    rows, plain_seconds, plain_tokens = [], 0.0, 0
    for chunk_index, fits in enumerate(by_chunk):
        stored = [s for s in fits if s.payload is not None]
        decode_seconds = 0.0
        for s in stored:  # memory segments come in the archive in the order of the fits
            decode_seconds += next(memory_seconds)
            ids = lm.tokenizer(s.data.decode("utf-8"), add_special_tokens=False)["input_ids"]
            plain_seconds += _time_plain_generate(lm, ids)
            plain_tokens += max(len(ids) - 1, 1)
        unfitted = unfitted_by_chunk[chunk_index]
        coded = [s for s in fits if s.stats["tokens"]]  # not the bits sent to zstd unfitted
        tokens = sum(s.stats["tokens"] for s in fits) + sum(len(p.ids or ()) for p in unfitted)
        exact = bool(stored) and len(stored) == len(fits) and not unfitted
        rows.append(ChunkRow(
            index=skip + chunk_index, chars=len(chunks[chunk_index]), tokens=tokens,
            segments=len(fits) + len(unfitted),
            kind="memory" if exact else "mixed" if stored else "zstd",
            exact=exact,
            vectors=sum(s.vector_count for s in stored),
            memory_tokens=sum(s.token_count for s in stored),
            accuracy=(sum(s.stats["accuracy"] * s.stats["tokens"] for s in coded)
                      / sum(s.stats["tokens"] for s in coded) if coded else None),
            steps=sum(s.stats["steps"] for s in fits),
            fit_seconds=(sum if growing else max)([s.stats["seconds"] for s in fits] or [0.0]),
            decode_seconds=decode_seconds if stored else None,
            min_margin=min((s.stats["min_margin"] for s in fits if s.stats["min_margin"] != float("-inf")),
                           default=None),
        ))

    return {"summary": _summary(lm, fit, tokens_per_segment, growing, rows, fit_wall,
                                plain_seconds, plain_tokens, original, archive_bytes),
            "chunks": [asdict(r) for r in rows], "archive": archive_bytes}


def _summary(lm, fit, tokens_per_segment, growing, rows, fit_wall, plain_seconds,
             plain_tokens, original, archive_bytes):
    fitted = [r for r in rows if r.accuracy is not None]
    decode_seconds = sum(r.decode_seconds or 0.0 for r in rows)
    memory_tokens, memory_vectors = sum(r.memory_tokens for r in rows), sum(r.vectors for r in rows)
    zstd_size = len(zstandard.ZstdCompressor(level=19).compress(original))
    xz_size = len(lzma.compress(original, preset=9 | lzma.PRESET_EXTREME))
    n = len(original) or 1
    return {
        "model": lm.model_id,
        "parameters": lm.parameter_count,
        "embedding_size": lm.hidden_size,
        # what was benchmarked: a CSV's chunks are not cut by --chunk-chars
        "chunk_chars": max(r.chars for r in rows),
        "chunks": len(rows),
        "tokens_per_segment": tokens_per_segment,
        "growing": growing,
        "start_tokens": fit.start_tokens if growing else None,
        "grow_tokens": fit.grow_tokens if growing else None,
        "segments": sum(r.segments for r in rows),
        "vectors_per_segment": fit.vectors,
        "max_vectors": fit.vector_limit,
        "max_steps": fit.max_steps,
        "vectors_stored": memory_vectors,
        "avg_accuracy": statistics.fmean(r.accuracy for r in fitted) if fitted else None,
        "reconstructed": sum(r.exact for r in rows),
        "median_steps": statistics.median(r.steps for r in fitted) if fitted else None,
        "median_fit_seconds": statistics.median(r.fit_seconds for r in fitted) if fitted else None,
        "fit_wall_seconds": fit_wall,
        # Chunks share batches, so one chunk's own time is its latency; this is the cost.
        "fit_seconds_per_chunk": fit_wall / len(rows),
        "tokens_fitted_per_second": sum(r.tokens for r in fitted) / fit_wall if fit_wall else None,
        "decode_tokens_per_second": memory_tokens / decode_seconds if decode_seconds else None,
        "generate_tokens_per_second": plain_tokens / plain_seconds if plain_seconds else None,
        # Over every memory segment, each verified exact by greedy decoding with the margin guard.
        "tokens_per_vector": memory_tokens / memory_vectors if memory_vectors else None,
        "original_bytes": len(original),
        "lmz_bytes": len(archive_bytes),
        "zstd19_bytes": zstd_size,
        "xz9e_bytes": xz_size,
        "lmz_bits_per_byte": 8 * len(archive_bytes) / n,
        "zstd19_bits_per_byte": 8 * zstd_size / n,
        "xz9e_bits_per_byte": 8 * xz_size / n,
        "threads": torch.get_num_threads(),
        "device": str(lm.device),
    }


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    s = result["summary"]
    if s["growing"]:
        cut = f"grown from {s['start_tokens']} tokens by {s['grow_tokens']} while they verify"
    elif s["tokens_per_segment"] is None:
        cut = "one a chunk"
    else:
        cut = f"~{s['tokens_per_segment']} tokens each"
    lines = [
        "| chunk | tokens | segments | vectors | stored | exact | acc | steps | fit s | decode s | margin |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["chunks"]:
        lines.append(f"| {r['index']} | {r['tokens']} | {r['segments']} | {r['vectors']} | {r['kind']} | "
                     f"{'yes' if r['exact'] else 'no'} | "
                     f"{_fmt(r['accuracy'], '.3f')} | {r['steps']} | {r['fit_seconds']:.1f} | "
                     f"{_fmt(r['decode_seconds'], '.2f')} | {_fmt(r['min_margin'], '.2f')} |")
    lines += [
        "",
        "| Model | Params | Emb. size | Chunk chars | K (max) | Avg. Acc | Reconstructed |",
        "|---|---|---|---|---|---|---|",
        f"| {s['model']} | {s['parameters'] / 1e6:.0f}M | {s['embedding_size']} | {s['chunk_chars']} | "
        f"{s['vectors_per_segment']} ({s['max_vectors']}) | {_fmt(s['avg_accuracy'], '.3f')} | "
        f"{s['reconstructed']} / {s['chunks']} |",
        "",
        f"fit: median {_fmt(s['median_steps'], '.0f')} steps, median {_fmt(s['median_fit_seconds'], '.1f')} s "
        f"per chunk in its batch, {s['fit_seconds_per_chunk']:.1f} s per chunk of wall time "
        f"({s['fit_wall_seconds']:.0f} s for all), "
        f"{_fmt(s['tokens_fitted_per_second'], '.2f')} tokens fitted/s ({s['threads']} threads, {s['device']})",
        f"decode: {_fmt(s['decode_tokens_per_second'], '.1f')} tokens/s from memory vectors; "
        f"plain generate(): {_fmt(s['generate_tokens_per_second'], '.1f')} tokens/s",
        f"segments: {s['segments']} ({cut}); "
        f"tokens per vector: {_fmt(s['tokens_per_vector'], '.1f')} ({s['vectors_stored']} vectors stored)",
        "",
        "| | bytes | bits per byte |",
        "|---|---|---|",
        f"| original | {s['original_bytes']} | 8.000 |",
        f"| .lmz | {s['lmz_bytes']} | {s['lmz_bits_per_byte']:.3f} |",
        f"| zstd -19 | {s['zstd19_bytes']} | {s['zstd19_bits_per_byte']:.3f} |",
        f"| xz -9e | {s['xz9e_bytes']} | {s['xz9e_bits_per_byte']:.3f} |",
    ]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Accuracy and exact reconstruction against chunk length in tokens (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'lmzip[plot]'") from None
    rows = [r for r in result["chunks"] if r["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([r["tokens"] for r in rows], [r["accuracy"] for r in rows], label="teacher-forced accuracy")
    ax.scatter([r["tokens"] for r in rows], [1.0 if r["exact"] else 0.0 for r in rows], marker="x",
               label="exact from memory (1 = yes)")
    s = result["summary"]
    ax.set(xlabel="chunk length (tokens)", ylabel="accuracy / exact", ylim=(-0.05, 1.05),
           title=f"{s['model']}, K={s['vectors_per_segment']}, {s['chunk_chars']}-char chunks")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
