"""tools/fit_variants.py runs every variant through lmzip's own loss pieces (tiny model, few steps)."""

import json
import runpy

import torch

from conftest import ROOT, TINY_MODEL


def test_fit_variants_reports_every_variant(tmp_path, capsys):
    tool = runpy.run_path(str(ROOT / "tools" / "fit_variants.py"))
    text = tmp_path / "t.txt"
    text.write_text("Alice was beginning to get very tired. " * 2)
    variants = sorted(tool["VARIANTS"])
    tool["main"]([str(text), *variants, "--model", TINY_MODEL, "--chunk-chars", "12", "--limit", "2",
                  "--vectors", "1", "--max-steps", "3", "--no-bf16"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["variant"] for r in rows] == variants
    for r in rows:
        assert r["chunks"] == 2 and len(r["steps"]) == 2
        assert all(s is None or 1 <= s <= 3 for s in r["steps"])
        assert r["steps_total"] == sum(3 if s is None else s for s in r["steps"])


def test_step_time_runs_every_setting(capsys):
    tool = runpy.run_path(str(ROOT / "tools" / "step_time.py"))
    tool["main"](["--model", TINY_MODEL, "--shapes", "2x5", "--repeat", "1", "--vectors", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("2 rows x 5 tokens" in line and "ms per row" in line for line in lines)


def test_fit_variants_lbfgs_searches_its_line_and_fits_an_easy_segment(tiny):
    tool = runpy.run_path(str(ROOT / "tools" / "fit_variants.py"))
    cfg = tool["FitConfig"](vectors=1, margin=0.5)
    ids = tiny.tokenizer("Alice", add_special_tokens=False)["input_ids"]
    problem = tool["Problem"](tiny, ids, cfg, bf16=False)
    start = tool["_VectorInit"](tiny, 0)(1)
    evaluations = tool["lbfgs"](problem, start, 200)
    assert evaluations is not None and evaluations <= 200


def test_fit_variants_lbfgs_out_of_budget_is_a_failure(tiny):
    tool = runpy.run_path(str(ROOT / "tools" / "fit_variants.py"))
    cfg = tool["FitConfig"](vectors=1, margin=0.5)
    ids = tiny.tokenizer("Alice was beginning", add_special_tokens=False)["input_ids"]
    problem = tool["Problem"](tiny, ids, cfg, bf16=False)
    for line_search in ("strong_wolfe", None):
        start = tool["_VectorInit"](tiny, 0)(1)
        assert tool["lbfgs"](problem, start, 3, line_search=line_search) is None


def test_head_speed_times_a_random_head_and_finds_the_same_bits(capsys):
    tool = runpy.run_path(str(ROOT / "tools" / "head_speed.py"))
    threads = torch.get_num_threads()
    try:
        tool["main"](["--random", "--rows", "3", "--columns", "1024", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)  # the tool sets its own
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("head (49152, 576)") and lines[1].startswith("rows     3:")
    assert "other bits" not in lines[1]


def test_decode_speed_decodes_every_memory_segment_of_an_archive(capsys, monkeypatch):
    tool = runpy.run_path(str(ROOT / "tools" / "decode_speed.py"))
    asked = []
    real = tool["main"].__globals__["archive_jobs"]  # run_path returns a copy of the tool's globals
    monkeypatch.setitem(tool["main"].__globals__, "archive_jobs",
                        lambda path, segments: asked.append(segments) or real(path, segments))
    threads = torch.get_num_threads()
    try:
        tool["main"](["--model", TINY_MODEL, "--archive", str(ROOT / "formats" / "good-memory-tiny.lmz"),
                      "--batch-sizes", "4", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # the tool sets its own
    assert asked == [None]  # all of them, not the random segments' default count
    assert "batch   4, 1 threads: 23 segments" in capsys.readouterr().out


def test_fit_step_time_builds_and_times_the_micro_model(capsys):
    tool = runpy.run_path(str(ROOT / "tools" / "fit_step_time.py"))
    tool["main"](["--model", "micro", "--rows", "1", "2", "--tokens", "4", "--steps", "5", "--skip", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" rows")[0].strip() for line in lines] == ["1", "2"]
    assert all("tensor ops" in line for line in lines)


def test_gpu_figures_runs_the_steps_asked_for_on_any_device(tmp_path):
    import os
    import subprocess
    import sys

    script, text = str(ROOT / "tools" / "gpu_figures.sh"), str(ROOT / "formats" / "good-zstd-text.out")
    env = dict(os.environ, DEVICE="cpu", PYTHON=sys.executable, STEPS="decode_speed", LIMIT_DECODE="280")
    run = subprocess.run(["bash", script, text, str(tmp_path), "tiny"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "== decode_speed: exit 0" in run.stdout and "== fit_steps" not in run.stdout
    assert "batch 512, " in (tmp_path / "decode_speed.log").read_text()
    env["STEPS"] = "decode"  # no such step: refused, not a silent pass
    run = subprocess.run(["bash", script, text, str(tmp_path), "tiny"], env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "unknown step 'decode'" in run.stderr
    run = subprocess.run(["bash", script, text, str(tmp_path), "small"], env=env, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("usage:")  # not the embedded model by default


def test_exact_speed_digests_do_not_depend_on_the_weights_kernel(capsys, tmp_path):
    tool = runpy.run_path(str(ROOT / "tools" / "exact_speed.py"))
    text = tmp_path / "text.txt"
    text.write_text("Alice was beginning to get very tired of sitting by her sister on the bank. " * 2)
    digests = []
    for kernel in ("int8", "float32"):
        tool["main"]([str(text), "--model", TINY_MODEL, "--rows", "2", "--context", "8", "--steps", "3",
                      "--passes", "12", "--kernel", kernel, "--device", "cpu"])
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith(f"weights multiplied by the {kernel} kernel")
        digests.append([line.split()[-1] for line in lines[1:]])
    assert len(digests[0]) == 2 and digests[0] == digests[1]


def test_decode_speed_shards_only_on_a_cpu(capsys):
    import pytest

    tool = runpy.run_path(str(ROOT / "tools" / "decode_speed.py"))
    with pytest.raises(SystemExit) as refused:
        tool["main"](["--model", TINY_MODEL, "--device", "cuda", "--sharded"])
    assert refused.value.code == 2 and "--sharded deals batches to CPU threads" in capsys.readouterr().err
