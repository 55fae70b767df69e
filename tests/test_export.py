"""Exported memory regenerates its text with plain transformers, without lmzip's decoder."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmzip
from lmzip import cli, container

from conftest import FORMATS, TINY_MODEL

SAMPLE = FORMATS / "good-memory-tiny.lmz"
ORIGINAL = (FORMATS / "good-memory-tiny.out").read_bytes()


@pytest.fixture(scope="module")
def plain():
    """The tiny model as anyone would load it: transformers alone, float32."""
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(TINY_MODEL)


@torch.no_grad()
def greedy(model, embeds, n):
    """The README's loop: n greedy tokens after `embeds` (T, H), with the KV cache."""
    embed = model.get_input_embeddings()
    ids, past, step = [], None, embeds.unsqueeze(0)
    for _ in range(n):
        out = model(inputs_embeds=step, past_key_values=past, use_cache=True)
        past = out.past_key_values
        ids.append(int(out.logits[0, -1].argmax()))
        step = embed(torch.tensor([[ids[-1]]]))
    return ids


def test_memory_lists_the_memory_segments_with_their_spans():
    blob = SAMPLE.read_bytes()
    archive = container.parse(blob)
    segments = lmzip.memory(blob)
    kinds = [s.kind for s in archive.segments]
    assert [m.index for m in segments] == [i for i, k in enumerate(kinds) if k == container.KIND_MEMORY]
    assert 0 < len(segments) < len(kinds), "the sample has zstd segments too"
    ends = np.cumsum([s.original_length for s in archive.segments])
    for m in segments:
        s = archive.segments[m.index]
        assert (m.byte_start, m.byte_end) == (ends[m.index] - s.original_length, ends[m.index])
        assert m.vectors.dtype == np.float16 and m.vectors.shape == (s.vector_count, archive.header.hidden_size)
        assert m.vectors.tobytes() == bytes(archive.payload(m.index))
        assert m.token_count == s.token_count and m.prefix == archive.header.prefix
        assert m.model_id == archive.header.model_id != ""
        assert m.weights_sha256 == archive.header.weights_sha256.hex()
    assert lmzip.memory((FORMATS / "good-zstd-text.lmz").read_bytes()) == []


def test_exported_file_regenerates_every_segment_with_plain_transformers(plain, tmp_path, monkeypatch):
    model, tokenizer = plain
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli.main, ["export", str(SAMPLE), "-o", "doc.safetensors"])
    assert r.exit_code == 0, r.output
    with safe_open("doc.safetensors", "pt") as f:
        meta = f.metadata()
        vectors = {name: f.get_tensor(name) for name in f.keys()}
    header = container.parse(SAMPLE.read_bytes()).header
    assert meta["format"] == "lmzip-memory-1" and meta["model_id"] == header.model_id
    assert (meta["tokenizer_sha256"], meta["weights_sha256"]) == (header.tokenizer_sha256.hex(),
                                                                  header.weights_sha256.hex())
    indices = json.loads(meta["segments"])
    assert sorted(vectors) == sorted(f"segment.{i}.vectors" for i in indices) and len(indices) > 1
    embed = model.get_input_embeddings()
    for i in indices:
        v = vectors[f"segment.{i}.vectors"]
        assert v.dtype == torch.float16 and v.shape[1] == int(meta["hidden_size"])
        prefix = torch.tensor(json.loads(meta[f"segment.{i}.prefix"]))
        inputs = torch.cat([embed(prefix), v.float()])
        ids = greedy(model, inputs, int(meta[f"segment.{i}.token_count"]))
        text = tokenizer.decode(ids, clean_up_tokenization_spaces=False).encode()
        assert text == ORIGINAL[int(meta[f"segment.{i}.byte_start"]) : int(meta[f"segment.{i}.byte_end"])], i


def test_continuing_after_a_segment_starts_with_the_segment(plain):
    model, tokenizer = plain
    m = lmzip.memory(SAMPLE.read_bytes())[0]
    inputs = torch.cat([model.get_input_embeddings()(torch.tensor(m.prefix)),
                        torch.from_numpy(m.vectors).float()])
    ids = greedy(model, inputs, m.token_count + 5)
    assert len(ids) == m.token_count + 5
    assert tokenizer.decode(ids[: m.token_count]).encode() == ORIGINAL[m.byte_start : m.byte_end]


def test_export_names_refuses_and_fails_like_the_other_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("doc.lmz").write_bytes(SAMPLE.read_bytes())
    r = CliRunner().invoke(cli.main, ["export", "doc.lmz"])
    assert r.exit_code == 0 and Path("doc.safetensors").exists()
    r = CliRunner().invoke(cli.main, ["export", "doc.lmz"])
    assert r.exit_code == 1 and "already exists (use -f to overwrite)" in r.stderr
    Path("bad.lmz").write_bytes((FORMATS / "bad-table-bit-flip.lmz").read_bytes())
    r = CliRunner().invoke(cli.main, ["export", "bad.lmz"])
    assert r.exit_code == 1 and r.stderr.startswith("lmzip: bad.lmz: damaged segment table")
    assert not Path("bad.safetensors").exists()
