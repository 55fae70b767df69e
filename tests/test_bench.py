"""lmzip bench with the tiny model: the JSON's fields and arithmetic."""

import io
import json

from click.testing import CliRunner

import lmzip
from lmzip import bench, cli

from conftest import TINY_MODEL, TINY_OPTIONS

TEXT = "Down the rabbit hole went Alice, never once considering how to get out again."


def run_bench(tmp_path, *args):
    src = tmp_path / "text.txt"
    src.write_text(TEXT)
    args = ["bench", str(src), "--model", TINY_MODEL, "--vectors", "1", "--max-vectors", "1",
            "--lr", "0.1", "--margin", "0.5", "--hinge", "1", "--no-bf16", *args]
    r = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def test_bench_json_fields_and_arithmetic(tmp_path):
    out = tmp_path / "bench.json"
    r = run_bench(tmp_path, "--chunk-chars", "10", "--limit", "5", "--whole", "--json", str(out))
    assert "Reconstructed" in r.stdout and "zstd -19" in r.stdout
    result = json.loads(out.read_text())
    s, rows = result["summary"], result["chunks"]
    assert len(rows) == s["chunks"] == 5
    assert [row["chars"] for row in rows] == [10] * 5
    assert s["reconstructed"] == sum(row["exact"] for row in rows) > 0
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows)
    assert all(row["exact"] == (row["kind"] == "memory") for row in rows)
    assert abs(s["avg_accuracy"] - sum(row["accuracy"] for row in rows) / 5) < 1e-9
    assert s["original_bytes"] == 50
    # the sizes are the real archive's: rebuild it from the same chunks and compare
    codec = lmzip.Codec(device="cpu")
    lm = codec.model(TINY_MODEL)
    pieces = [bench.segmenting.memory_piece(lm.tokenizer, TEXT[i:i + 10]) for i in range(0, 50, 10)]
    archive = io.BytesIO()
    fit_fields = ("vectors", "max_vectors", "lr", "margin", "hinge", "bf16")
    options = {k: v for k, v in TINY_OPTIONS.items() if k in fit_fields}
    codec.write_regions(pieces, archive, lm, lmzip.FitConfig(**options), growing=False)
    assert s["lmz_bytes"] == len(archive.getvalue())
    assert s["lmz_bits_per_byte"] == 8 * s["lmz_bytes"] / 50
    memory_tokens = sum(row["tokens"] for row in rows if row["kind"] == "memory")
    assert s["tokens_per_vector"] == memory_tokens / s["reconstructed"]  # K = 1, no retries
    assert s["vectors_stored"] == s["reconstructed"]


def test_bench_reads_csv_chunk_column(tmp_path):
    src = tmp_path / "chunks.csv"
    src.write_text('id,chunk\n1,"first, with a comma"\n2,second\n3,third\n')
    assert bench.load_chunks([str(src)], 100, 2) == ["first, with a comma", "second"]
    assert bench.load_chunks([str(src)], 100, 1, skip=1) == ["second"]
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(cli.main, ["bench", str(src), "--model", TINY_MODEL, "--skip", "1",
                                      "--limit", "2", "--whole", "--vectors", "1", "--max-vectors", "1",
                                      "--max-steps", "1", "--no-bf16", "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert [row["index"] for row in result["chunks"]] == [1, 2]  # numbered as in the source
    # the table's chunk length is the longest chunk run, not --chunk-chars' default of 100
    assert result["summary"]["chunk_chars"] == len("second")
    r = CliRunner().invoke(cli.main, ["bench", str(src), "--model", TINY_MODEL, "--skip", "3"])
    assert r.exit_code == 1 and "no chunk left after skipping 3" in r.output
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,x\n")
    r = CliRunner().invoke(cli.main, ["bench", str(bad), "--model", TINY_MODEL])
    assert r.exit_code == 1 and "needs a 'chunk' column" in r.output


def test_bench_keeps_the_files_line_ends(tmp_path):
    src = tmp_path / "crlf.txt"
    src.write_bytes(b"one\r\ntwo\rthree\n")
    assert bench.load_chunks([str(src)], 5, None) == ["one\r\n", "two\rt", "hree\n"]


def test_bench_plot_writes_a_png(tmp_path):
    png = tmp_path / "plot.png"
    run_bench(tmp_path, "--chunk-chars", "8", "--limit", "3", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cuts_chunks_into_segments_with_tokens(tmp_path):
    out = tmp_path / "bench.json"
    run_bench(tmp_path, "--chunk-chars", "40", "--limit", "2", "--tokens", "8", "--json", str(out))
    result = json.loads(out.read_text())
    s, rows = result["summary"], result["chunks"]
    assert all(row["segments"] >= 4 for row in rows)  # 40 byte-level tokens in ~8-token segments
    assert s["segments"] == sum(row["segments"] for row in rows)
    assert s["vectors_stored"] == sum(row["vectors"] for row in rows) > 0
    assert all(row["exact"] == (row["kind"] == "memory") for row in rows)
    assert s["tokens_per_vector"] == sum(row["memory_tokens"] for row in rows) / s["vectors_stored"]


def test_bench_method_lm_reports_bits_and_the_frequency_cost(tmp_path):
    from click.testing import CliRunner

    from lmzip import cli

    text = tmp_path / "t.txt"
    text.write_text("Alice was beginning to get very tired of sitting by her sister on the bank. " * 4)
    out = tmp_path / "lm.json"
    r = CliRunner().invoke(cli.main, ["bench", "--method", "lm", "--model", TINY_MODEL, "--tokens", "64",
                                      "--json", str(out), str(text)])
    assert r.exit_code == 0, r.output
    assert "| .lmz (lm) |" in r.stdout and "bits per token" in r.stdout
    summary = json.loads(out.read_text())["summary"]
    assert summary["lm_chunks"] == 5 and summary["lm_segments"] == 1 and summary["bytes"] == 304  # packed
    from lmzip.exact.matmul import fastest_kernel
    assert summary["weight_products"] == fastest_kernel("cpu")
    assert f"weights multiplied by the {summary['weight_products']} kernel" in r.stdout
    # the range coder spends within a few bits per chunk of what the coded frequencies promise
    assert abs(summary["lm_payload_bits_per_byte"] - summary["coded_frequency_bits_per_byte"]) * 304 < 5 * 40
    assert summary["coded_frequency_bits_per_byte"] < summary["integer_frequency_bits_per_byte"]  # counts help
