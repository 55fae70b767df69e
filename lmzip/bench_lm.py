"""`lmzip bench --method lm`: bits per byte of the lm kind, what its integer frequencies cost,
encode and decode speed, against zstd -19 and xz -9e.

The files are coded as `compress --method lm` codes them (a real archive, decoded
back by the real decoder and checked). The cost of the frequencies is measured per
lm segment: the bits the range coder spent against the ideal -log2 p of the same
exact model's softmax (the floor of one count every token gets, and the exp table).
"""

from __future__ import annotations

import io
import lzma
import math
import time
from pathlib import Path

import torch
import zstandard

from . import container
from .codec import LM_ARITHMETIC, Codec, ProgressCallback, lm_pieces
from .errors import InputError, InternalError
from .fit import FitConfig, sink_prefix
from .kinds import LM_KINDS, lm3, lm3_group, lm3_head, lm3_text, lm_packed
from .kinds import lm as lm_kind

PACKED_KINDS = (lm_packed.KIND, lm3.KIND, lm3_group.KIND)  # a chunk table, then the chunks


def _ideal_bits(lm, pieces, prefix, arithmetic: int, mix: bool, head: int = 0) -> tuple[float, float, float, int]:
    """(softmax bits, integer-frequency bits, bits under the coded frequencies, tokens) over the lm
    chunks `pieces` (all the encoder coded, a chunk that failed its check too: the model's bits, not
    the archive's); the coded frequencies are the integer ones with, if `mix`, kind 6's shared
    counts mixed in, and with a `head`, each chunk but a group's first after kind 7's head (all
    three figures then count the head's help)."""
    from .exact.coding import _symbol_frequencies, chunk_logits
    from .exact.mixing import mix_symbol

    exact = lm_kind.exact_model(lm, arithmetic)
    groups = lm_kind.group_pieces(pieces, prefix, head) if mix else []
    heads = lm_kind.group_heads(pieces, groups, prefix, head) if head else None
    contexts = lm_kind.shared_contexts(pieces, groups, heads) if mix else {}
    before = lm_kind.head_tokens(pieces, groups, heads) if head else {}
    soft = freq = coded = 0.0
    tokens = 0
    for i, piece in enumerate(pieces):
        if piece.ids is None:
            continue
        logits = chunk_logits(exact, piece.ids, tuple(prefix) + before.get(i, ()))
        sym = torch.tensor(piece.ids)
        soft -= torch.log_softmax(logits.double(), -1).gather(1, sym[:, None]).sum().item() / math.log(2)
        symbols = list(zip(*_symbol_frequencies(exact, logits, sym)))
        freq += sum(math.log2(t / f) for _, f, t in symbols)
        if i in contexts:
            symbols = [mix_symbol(*s, y, found) for s, y, found in zip(symbols, piece.ids, contexts[i]())]
        coded += sum(math.log2(t / f) for _, f, t in symbols)
        tokens += len(piece.ids)
    return soft, freq, coded, tokens


def _layout(archive: container.Archive, prefix) -> tuple[int, int]:
    """(the lm chunks the archive holds, its longest head): chunks that failed the encoder's check
    are zstd, not counted."""
    count = head = 0
    for i, s in enumerate(archive.segments):
        payload = bytes(archive.payload(i))
        if s.kind == lm3_text.KIND:
            _, _, h, payloads, _ = lm3_text.unpack(payload, s.token_count, prefix)
            count, head = count + len(payloads), max(head, h)
        elif s.kind == lm3_head.KIND:
            h, payloads, _ = lm3_head.unpack(payload, s.token_count, prefix)
            count, head = count + len(payloads), max(head, h)
        elif s.kind in PACKED_KINDS:
            count += len(lm_packed.unpack(payload, s.token_count, lm_packed.room(prefix))[1])
        elif s.kind in LM_KINDS:
            count += 1
    return count, head


def run(codec: Codec, paths: list[str], *, model: str | None = None, chunk_tokens: int | None = None,
        max_bytes: int | None = None, batch_size: int = 64, ideal: bool = True,
        progress: ProgressCallback | None = None) -> dict:
    data = b"".join(Path(p).read_bytes() for p in paths)[: max_bytes or None]
    if not data:
        raise InputError("no text to benchmark")
    lm = codec.model(model)
    out = io.BytesIO()
    started = time.perf_counter()
    report = codec.encode_to(data, out, method="lm", model=model, tokens_per_segment=chunk_tokens,
                             progress=progress)
    encode_seconds = time.perf_counter() - started
    blob = out.getvalue()
    started = time.perf_counter()
    back = codec.decode(blob, model=model, batch_size=batch_size)
    decode_seconds = time.perf_counter() - started
    if back != data:
        raise InternalError("lmzip bug: the bench archive did not decode to its input")
    archive = container.parse(blob)
    lm_payload = sum(s.payload_length for s in archive.segments if s.kind in LM_KINDS)
    prefix = archive.header.prefix
    chunks, head = _layout(archive, prefix)
    pieces, _ = lm_pieces(lm, data, chunk_tokens, prefix, report.line_flags)  # as the encoder cut them
    mixed = any(s.kind in (lm3_group.KIND, lm3_head.KIND, lm3_text.KIND) for s in archive.segments)
    soft, freq, coded, tokens = (_ideal_bits(lm, pieces, prefix, LM_ARITHMETIC, mixed, head) if ideal
                                 else (None, None, None, report.memory_tokens))
    zstd_size = len(zstandard.ZstdCompressor(level=19).compress(data))
    xz_size = len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    n = len(data)
    return {"summary": {
        "model": lm.model_id, "bytes": n, "tokens": tokens, "segments": report.segments,
        "lm_segments": report.memory_segments,
        "lm_chunks": chunks, "chunk_tokens": chunk_tokens or "default",
        "prefix": list(sink_prefix(lm, FitConfig())),
        "lmz_bytes": len(blob), "lmz_bits_per_byte": 8 * len(blob) / n,
        "lm_payload_bits_per_byte": 8 * lm_payload / n,
        "ideal_softmax_bits_per_byte": soft / n if soft is not None else None,
        "integer_frequency_bits_per_byte": freq / n if freq is not None else None,
        "coded_frequency_bits_per_byte": coded / n if coded is not None else None,
        "frequency_cost_bits_per_token": (freq - soft) / tokens if soft is not None and tokens else None,
        "encode_kb_per_second": n / 1000 / encode_seconds, "decode_kb_per_second": n / 1000 / decode_seconds,
        "encode_seconds": encode_seconds, "decode_seconds": decode_seconds,
        "zstd19_bytes": zstd_size, "zstd19_bits_per_byte": 8 * zstd_size / n,
        "xz9e_bytes": xz_size, "xz9e_bits_per_byte": 8 * xz_size / n,
        "threads": torch.get_num_threads(), "batch_size": batch_size,
        "arithmetic": LM_ARITHMETIC,
        "weight_products": lm_kind.exact_model(lm, LM_ARITHMETIC).weight_kernel,  # same integers by any
    }, "archive": blob}


def format_table(result: dict) -> str:
    s = result["summary"]

    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    return "\n".join([
        f"lm: {s['bytes']} bytes, {s['tokens']} tokens in {s['lm_chunks']} chunks, {s['lm_segments']} lm "
        f"segments ({s['segments']} in all), {s['model']}, arithmetic /{s['arithmetic']}",
        "",
        "| | bytes | bits per byte |",
        "|---|---|---|",
        f"| .lmz (lm) | {s['lmz_bytes']} | {s['lmz_bits_per_byte']:.3f} |",
        f"| zstd -19 | {s['zstd19_bytes']} | {s['zstd19_bits_per_byte']:.3f} |",
        f"| xz -9e | {s['xz9e_bytes']} | {s['xz9e_bits_per_byte']:.3f} |",
        "",
        f"lm payloads {s['lm_payload_bits_per_byte']:.3f} bits per byte; ideal under the exact model's softmax "
        f"{f(s['ideal_softmax_bits_per_byte'], '.3f')}, under its integer frequencies "
        f"{f(s['integer_frequency_bits_per_byte'], '.3f')} "
        f"(they cost {f(s['frequency_cost_bits_per_token'], '.4f')} bits per token), with the counts shared "
        f"in each segment mixed in (what the payloads code) {f(s['coded_frequency_bits_per_byte'], '.3f')}",
        f"encode {s['encode_kb_per_second']:.2f} KB/s ({s['encode_seconds']:.1f} s), decode "
        f"{s['decode_kb_per_second']:.2f} KB/s ({s['decode_seconds']:.1f} s), {s['threads']} threads, "
        f"batch {s['batch_size']}, weights multiplied by the {s['weight_products']} kernel",
    ])
