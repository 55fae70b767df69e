"""Batched greedy decoding gives every segment the tokens a one-segment decode gives it."""

import re
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lmzip
from lmzip import container
from lmzip.batch_decode import greedy_decode_batch, greedy_decode_sharded
from lmzip.generate import greedy_decode

from conftest import FORMATS, TINY_MODEL

BATCH_SIZES = (1, 2, 7, 64)
PREFIX = (256,)  # the tiny tokenizer's end-of-text token, as its archives use
# Batching moves logits by about 1e-5 on the tiny model; a segment whose reference decode had a
# closer call than this may legitimately take another token, as the margin guard allows.
CLEAR_MARGIN = 1e-3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model's operations are too small to share between threads, and on a busy machine
    # two threads spend most of a step waiting for each other (10x slower here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_jobs(tiny, shapes, seed):
    """Jobs of random vectors spread like the token embeddings, one per (K, n_tokens)."""
    gen = torch.Generator().manual_seed(seed)
    scale = float(tiny.model.get_input_embeddings().weight.std())
    return [(scale * torch.randn(k, tiny.hidden_size, generator=gen), n) for k, n in shapes]


def reference(tiny, jobs, prefix):
    """One segment at a time, without a cache: nothing of the batch bookkeeping is involved."""
    return [greedy_decode(tiny, v, n, prefix, use_cache=False) for v, n in jobs]


def assert_same(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert len(g.ids) == len(e.ids)
        if e.min_margin >= CLEAR_MARGIN:
            assert g.ids == e.ids
            assert g.min_margin == pytest.approx(e.min_margin, abs=1e-4)


# Rows differ in K and in length; 0-token jobs return at once; more jobs than small batches hold.
SHAPES = [(1, 12), (3, 5), (2, 0), (4, 17), (1, 1), (2, 9), (1, 3), (3, 14), (2, 2), (1, 20), (4, 6)]


@pytest.fixture(scope="module")
def shaped(tiny):
    jobs = random_jobs(tiny, SHAPES, seed=0)
    expected = reference(tiny, jobs, PREFIX)
    assert sum(e.min_margin >= CLEAR_MARGIN for e in expected) >= 8, "too few clear rows to compare"
    return jobs, expected


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_batched_equals_single(tiny, shaped, batch_size):
    jobs, expected = shaped
    assert_same(greedy_decode_batch(tiny, jobs, PREFIX, batch_size=batch_size), expected)


def test_one_row_is_the_single_decoder_to_the_bit(tiny, shaped):
    jobs, _ = shaped
    cached = [greedy_decode(tiny, v, n, PREFIX) for v, n in jobs]
    assert greedy_decode_batch(tiny, jobs, PREFIX, batch_size=1) == cached


def test_joining_rows_pads_the_running_cache_or_the_new_one(tiny):
    # Batch 2, longest first: rows 0 and 1 start; row 1 leaves after one token and row 2 (K=8)
    # joins row 0, whose cache is shorter than row 2's; when row 2 leaves, row 3 (K=1) joins a
    # cache longer than its own.
    jobs = random_jobs(tiny, [(1, 5), (1, 1), (8, 1), (1, 1)], seed=3)
    expected = reference(tiny, jobs, PREFIX)
    assert all(e.min_margin >= CLEAR_MARGIN for e in expected)
    seen = []
    got = greedy_decode_batch(tiny, jobs, PREFIX, batch_size=2,
                              observe=lambda rows, logits: seen.append(list(rows)))
    assert seen == [[0, 1], [0, 2], [0, 3], [0], [0]]
    assert_same(got, expected)


def test_prefills_are_cut_to_the_position_budget(tiny, monkeypatch):
    # A budget of 8 rows x columns: the K=6 rows (7 columns with the prefix) are prefilled one
    # at a time, the K=1 rows (2 columns) four at a time, each group joining the running rows.
    monkeypatch.setattr(lmzip.batch_decode, "MAX_PREFILL_POSITIONS", 8)
    jobs = random_jobs(tiny, [(6, 9), (6, 8), (1, 7), (1, 6), (1, 5), (1, 4), (1, 3)], seed=4)
    seen = []
    got = greedy_decode_batch(tiny, jobs, PREFIX, batch_size=64,
                              observe=lambda rows, logits: seen.append(list(rows)))
    assert seen[:3] == [[0], [0, 1], [0, 1, 2, 3, 4, 5]]
    assert_same(got, reference(tiny, jobs, PREFIX))


def test_results_come_back_in_job_order(tiny):
    jobs = random_jobs(tiny, [(1, 2), (1, 7), (2, 0), (1, 4)], seed=5)
    got = greedy_decode_batch(tiny, jobs, PREFIX, batch_size=2)
    assert [len(d.ids) for d in got] == [2, 7, 0, 4]
    assert got[2] == lmzip.generate.Decoded([], float("inf"))
    assert greedy_decode_batch(tiny, [], PREFIX) == []


def test_no_prefix(tiny):
    jobs = random_jobs(tiny, [(2, 6), (1, 9), (3, 4)], seed=6)
    assert_same(greedy_decode_batch(tiny, jobs, (), batch_size=3), reference(tiny, jobs, ()))


@given(shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 12)), min_size=1, max_size=12),
       seed=st.integers(0, 2**16), batch_size=st.sampled_from(BATCH_SIZES + (3,)))
@settings(max_examples=10)
def test_batched_equals_single_on_random_vectors(tiny, shapes, seed, batch_size):
    jobs = random_jobs(tiny, shapes, seed)
    assert_same(greedy_decode_batch(tiny, jobs, PREFIX, batch_size=batch_size), reference(tiny, jobs, PREFIX))


def shard_calls(monkeypatch, threads, run):
    """(thread name, torch threads, jobs, cache budget) of each greedy_decode_batch that `run` makes."""
    calls = []
    real = lmzip.batch_decode.greedy_decode_batch

    def spy(lm, jobs, *args, **kwargs):
        calls.append((threading.current_thread().name.split("_")[0], torch.get_num_threads(), len(jobs),
                      kwargs["cache_budget"]))
        return real(lm, jobs, *args, **kwargs)

    monkeypatch.setattr(lmzip.batch_decode, "greedy_decode_batch", spy)
    torch.set_num_threads(threads)
    try:
        got = run()
        assert torch.get_num_threads() == threads  # the caller's setting is back
    finally:
        torch.set_num_threads(1)
    return got, calls


@pytest.mark.parametrize("threads, batch_size", [(2, 2), (3, 2), (2, 64)])
def test_shards_decode_as_one_batch_does(tiny, shaped, threads, batch_size, monkeypatch):
    jobs, expected = shaped
    monkeypatch.setattr(lmzip.batch_decode, "MIN_SHARD_ROWS", 3)
    got, calls = shard_calls(monkeypatch, threads, lambda: greedy_decode_sharded(
        tiny, jobs, PREFIX, batch_size=batch_size, threads=threads))
    assert_same(got, expected)
    # a shard per thread, each on one torch thread, even where the jobs fill less than one
    # batch; they share the cache budget
    assert [c[:2] for c in calls] == [("lmzip-shard", 1)] * threads
    assert sum(c[2] for c in calls) == len(jobs)
    assert {c[3] for c in calls} == {lmzip.batch_decode.CACHE_BUDGET // threads}


def test_too_few_jobs_for_two_shards_run_in_the_callers_thread(tiny, shaped, monkeypatch):
    jobs, expected = shaped
    assert len(jobs) < 2 * lmzip.batch_decode.MIN_SHARD_ROWS
    got, calls = shard_calls(monkeypatch, 2, lambda: greedy_decode_sharded(tiny, jobs, PREFIX, threads=2))
    assert_same(got, expected)
    assert calls == [("MainThread", 2, len(jobs), lmzip.batch_decode.CACHE_BUDGET)]


def test_decompress_shards_a_window_and_gives_the_bytes(tiny, monkeypatch):
    from lmzip import codec as codec_module

    blob = (FORMATS / "good-memory-tiny.lmz").read_bytes()
    calls = []
    real = lmzip.batch_decode.greedy_decode_sharded
    monkeypatch.setattr(codec_module, "cpu_threads", lambda device: 2)
    monkeypatch.setattr(lmzip.batch_decode, "greedy_decode_sharded",
                        lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    codec = lmzip.Codec(model=str(FORMATS.parent / "tests" / "data" / "tiny-llama"))
    expected = codec.decode(blob, batch_size=64)
    assert codec.decode(blob, batch_size=1) == expected
    assert calls and set(calls) == {2}


def memory_jobs(archive):
    """(segment index, (vectors, token_count)) for each memory segment."""
    for i, s in enumerate(archive.segments):
        if s.kind == container.KIND_MEMORY:
            vectors = np.frombuffer(archive.payload(i), "<f2").reshape(s.vector_count, -1)
            yield i, (torch.from_numpy(vectors.astype(np.float32)), s.token_count)


def good_memory_samples():
    names = re.findall(r"^\| (good-\S+\.lmz) \| ok \|", (FORMATS / "README.md").read_text(), re.M)
    with_memory = [n for n in names if any(memory_jobs(container.parse((FORMATS / n).read_bytes())))]
    assert len(with_memory) >= 2, "formats/ lost its good memory samples"
    return with_memory


@pytest.mark.parametrize("name", good_memory_samples())
def test_good_samples_decode_to_their_segments_at_every_batch_size(tiny, name):
    archive = container.parse((FORMATS / name).read_bytes())
    indices, jobs = zip(*memory_jobs(archive))
    prefix = archive.header.prefix
    expected = [greedy_decode(tiny, v, n, prefix).ids for v, n in jobs]  # batch size 1
    for index, ids in zip(indices, expected):  # which gives the stored bytes
        text = tiny.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        assert container.crc32(text.encode("utf-8", errors="surrogatepass")) == archive.segments[index].crc32
    for batch_size in BATCH_SIZES[1:]:
        assert [d.ids for d in greedy_decode_batch(tiny, list(jobs), prefix, batch_size=batch_size)] == expected


def test_models_with_windowed_caches_decode_one_row_at_a_time(tiny, monkeypatch):
    # Joining caches column by column would be wrong for sliding-window layers; such a model
    # (here: the tiny one told its window is longer than any row) decodes row by row.
    n_layers = tiny.model.config.num_hidden_layers
    monkeypatch.setattr(tiny.model.config, "layer_types", ["sliding_attention"] * n_layers, raising=False)
    monkeypatch.setattr(tiny.model.config, "sliding_window", 1000, raising=False)
    jobs = random_jobs(tiny, [(1, 5), (2, 3), (3, 4)], seed=7)
    batch_rows = []
    got = greedy_decode_batch(tiny, jobs, PREFIX, batch_size=64,
                              observe=lambda rows, logits: batch_rows.append(len(rows)))
    assert set(batch_rows) == {1}
    monkeypatch.undo()
    assert_same(got, reference(tiny, jobs, PREFIX))


def test_windowed_cache_layers_are_not_replaced_by_growing_ones(tiny, monkeypatch):
    """Only a layer that keeps every column may grow in a buffer; a sliding window drops columns."""
    from transformers.cache_utils import DynamicCache

    import lmzip.batch_decode as bd

    n_layers = tiny.model.config.num_hidden_layers
    monkeypatch.setattr(tiny.model.config, "layer_types", ["sliding_attention"] * n_layers, raising=False)
    monkeypatch.setattr(tiny.model.config, "sliding_window", 1000, raising=False)
    own = [type(layer) for layer in DynamicCache(config=tiny.model.config).layers]
    assert bd._growing_layer_class() not in own
    assert [type(layer) for layer in bd._new_cache(tiny).layers] == own


def test_bad_arguments_are_lmz_errors(tiny):
    vectors = torch.zeros(1, tiny.hidden_size)
    with pytest.raises(lmzip.OptionError, match="batch size"):
        greedy_decode_batch(tiny, [(vectors, 1)], PREFIX, batch_size=0)
    with pytest.raises(lmzip.InputError, match="hidden size"):
        greedy_decode_batch(tiny, [(torch.zeros(1, tiny.hidden_size + 1), 1)], PREFIX)
    with pytest.raises(lmzip.InputError, match="hidden size"):
        greedy_decode_batch(tiny, [(torch.zeros(0, tiny.hidden_size), 1)], ())
    with pytest.raises(lmzip.InputError, match="tokens"):
        greedy_decode_batch(tiny, [(vectors, -1)], PREFIX)


def test_the_growing_cache_gives_the_logits_of_transformers_own(tiny, shaped, monkeypatch):
    """Rows joining and leaving, at two batch sizes: the same logits bit for bit as DynamicCache."""
    from transformers.cache_utils import DynamicCache

    import lmzip.batch_decode as bd

    jobs, _ = shaped

    def logits_of(batch_size):
        seen = []
        got = greedy_decode_batch(tiny, jobs, PREFIX, batch_size=batch_size,
                                  observe=lambda rows, logits: seen.append((list(rows), logits.clone())))
        return got, seen

    grown = {b: logits_of(b) for b in (2, 7)}
    monkeypatch.setattr(bd, "_new_cache", lambda lm: DynamicCache(config=lm.model.config))
    for b, (got, seen) in grown.items():
        plain_got, plain_seen = logits_of(b)
        assert got == plain_got and len(seen) == len(plain_seen)
        assert all(r == pr and torch.equal(g, p) for (r, g), (pr, p) in zip(seen, plain_seen))


def test_a_step_writes_into_the_cache_buffer_instead_of_copying_the_cache(tiny, monkeypatch):
    """A buffer is made at a prefill, a join or a select, and when it is full: not at every step."""
    import lmzip.batch_decode as bd

    made = []
    real = bd._append

    def counting(buffer, cached, new):
        out = real(buffer, cached, new)
        made.append(out[0] is not buffer)
        return out

    monkeypatch.setattr(bd, "_append", counting)
    monkeypatch.setattr(bd, "GROW_POSITIONS", 5)
    layers = tiny.model.config.num_hidden_layers
    greedy_decode_batch(tiny, random_jobs(tiny, [(1, 16)], seed=1), PREFIX, batch_size=1)
    # 2 prefill positions and 15 steps: buffers of 7, 13 and 19 columns, keys and values of each layer
    assert len(made) == 2 * layers * 16 and sum(made) == 2 * layers * 3


def test_appending_to_a_buffer(tiny):
    from lmzip.batch_decode import _append

    first = torch.arange(24.0).reshape(1, 2, 3, 4)
    buffer, view = _append(None, first, first[:, :, :1])
    assert buffer.shape[2] > 4 and torch.equal(view, torch.cat([first, first[:, :, :1]], dim=2))
    same, more = _append(buffer, view, first[:, :, 1:2])
    assert same is buffer and torch.equal(more, torch.cat([first, first[:, :, :2]], dim=2))
    # a tensor that is not the buffer's first columns (a select or join made it) gets a new buffer
    other, again = _append(buffer, more.clone(), first[:, :, 2:])
    assert other is not buffer and torch.equal(again, torch.cat([first, first], dim=2))


def grouped_query_model():
    """A model whose key/value heads are fewer than its heads, and whose head_dim is its own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("which", ["tiny", "grouped"])
def test_the_cache_bytes_per_position_are_what_a_cache_holds(tiny, which):
    from lmzip.batch_decode import _new_cache, cache_bytes_per_position

    model = tiny.model if which == "tiny" else grouped_query_model()
    cache = _new_cache(type("LM", (), {"model": model})())
    with torch.no_grad():
        model(inputs_embeds=torch.zeros(3, 5, model.config.hidden_size, device=model.device), use_cache=True,
              past_key_values=cache)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert cache_bytes_per_position(model.config) == held // (3 * 5)


def test_a_multimodal_config_is_read_through_its_text_config():
    from lmzip.batch_decode import cache_bytes_per_position

    text = grouped_query_model().config
    outer = type("Config", (), {"get_text_config": lambda self: text})()
    assert cache_bytes_per_position(outer) == cache_bytes_per_position(text) == 2 * 2 * 4 * 32 * 4


def test_rows_that_leave_or_join_let_the_old_cache_buffers_go(tiny, shaped):
    from lmzip.batch_decode import _prefill, _step

    jobs, _ = shaped
    rows = _prefill(tiny, PREFIX, jobs, [0, 1, 3])
    _step(tiny, rows, torch.zeros(3, dtype=torch.long, device=tiny.device))
    assert all(layer.key_buffer is not None for layer in rows.cache.layers)  # the step made buffers
    rows.select(torch.tensor([0, 2], device=tiny.device))
    assert all(layer.key_buffer is None and layer.value_buffer is None for layer in rows.cache.layers)
    _step(tiny, rows, torch.zeros(2, dtype=torch.long, device=tiny.device))
    rows.join(_prefill(tiny, PREFIX, jobs, [5]))
    assert all(layer.key_buffer is None and layer.value_buffer is None for layer in rows.cache.layers)


def test_a_config_that_does_not_say_sets_no_limit(tiny):
    from lmzip.batch_decode import cache_bytes_per_position, rows_within

    assert cache_bytes_per_position(object()) is None
    assert rows_within(1, type("LM", (), {"model": type("M", (), {"config": object()})})(), [(None, 5)], (), 9) == 9


def test_rows_are_cut_to_the_cache_budget(tiny, shaped, monkeypatch):
    from lmzip.batch_decode import GROW_POSITIONS, cache_bytes_per_position

    jobs, expected = shaped
    longest = len(PREFIX) + max(len(v) + n for v, n in jobs) + GROW_POSITIONS
    budget = 3 * cache_bytes_per_position(tiny.model.config) * longest + 1
    widths = []
    real = lmzip.batch_decode._step
    monkeypatch.setattr(lmzip.batch_decode, "_step", lambda lm, rows, ids: widths.append(len(rows)) or real(lm, rows, ids))
    got = greedy_decode_batch(tiny, jobs, PREFIX, batch_size=64, cache_budget=budget)
    assert_same(got, expected)
    assert max(widths) == 3
    widths.clear()
    greedy_decode_batch(tiny, jobs, PREFIX, batch_size=64, cache_budget=1)
    assert max(widths) == 1  # never fewer than one row


def test_a_gpu_decodes_more_rows_together_by_default():
    from lmzip.batch_decode import DEFAULT_BATCH_SIZE, GPU_BATCH_SIZE, default_batch_size

    assert default_batch_size(torch.device("cpu")) == DEFAULT_BATCH_SIZE == 128
    assert default_batch_size(torch.device("cuda", 1)) == GPU_BATCH_SIZE == 512
    assert default_batch_size(torch.device("mps")) == DEFAULT_BATCH_SIZE  # measured on CUDA only


def test_decoding_takes_the_devices_batch_size_unless_one_is_given(codec, monkeypatch):
    import lmzip.codec
    from lmzip.kinds import memory

    seen, devices = [], []
    real = memory.decode
    monkeypatch.setattr(memory, "decode", lambda jobs, ctx: seen.append(ctx.batch_size) or real(jobs, ctx))
    monkeypatch.setattr(lmzip.codec, "default_batch_size", lambda device: devices.append(device) or 5)
    blob = (FORMATS / "good-memory-tiny.lmz").read_bytes()
    expected = (FORMATS / "good-memory-tiny.out").read_bytes()
    assert codec.decode(blob, model=TINY_MODEL) == expected and set(seen) == {5}
    assert devices == [codec.model(TINY_MODEL).device]
    seen.clear()
    assert codec.decode(blob, model=TINY_MODEL, batch_size=3) == expected and set(seen) == {3}


def out_of_memory_above(rows, seen):
    """A greedy_decode_sharded that runs out of memory above `rows` rows, recording each try's."""
    real = lmzip.batch_decode.greedy_decode_sharded

    def decode(lm, jobs, prefix, batch_size, threads):
        seen.append(batch_size)
        if batch_size > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(lm, jobs, prefix, batch_size, threads)
    return decode


def test_a_batch_out_of_memory_is_decoded_again_in_halves(codec, monkeypatch):
    seen = []
    monkeypatch.setattr(lmzip.batch_decode, "greedy_decode_sharded", out_of_memory_above(2, seen))
    blob = (FORMATS / "good-memory-tiny.lmz").read_bytes()
    assert codec.decode(blob, model=TINY_MODEL, batch_size=16) == (FORMATS / "good-memory-tiny.out").read_bytes()
    assert seen[:4] == [16, 8, 4, 2] and set(seen[4:]) == {2}  # later windows start where it fit


def test_out_of_memory_one_row_at_a_time_is_a_clear_error(codec, monkeypatch):
    from lmzip.cli import main

    seen = []
    monkeypatch.setattr(lmzip.batch_decode, "greedy_decode_sharded", out_of_memory_above(0, seen))
    blob = (FORMATS / "good-memory-tiny.lmz").read_bytes()
    with pytest.raises(lmzip.DeviceMemoryError, match="one memory segment at a time"):
        codec.decode(blob, model=TINY_MODEL, batch_size=3)
    assert seen == [3, 1]
    from click.testing import CliRunner

    r = CliRunner().invoke(main, ["test", "--model", TINY_MODEL, str(FORMATS / "good-memory-tiny.lmz")])
    assert r.exit_code == 1 and "out of" in r.output and "internal error" not in r.output
