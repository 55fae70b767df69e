"""The fingerprints an archive records of its model, computed from the model's files.

Format 3 fingerprints the artifacts as stored, so that they do not depend on the
installed transformers or tokenizers (SPEC.md, Fingerprints):

- tokenizer_sha256: SHA-256 of the bytes of `tokenizer.json`;
- weights_sha256: SHA-256 over the canonical config and every safetensors
  tensor (name, dtype, shape, raw bytes), each field length-prefixed.

Formats 1 and 2 recorded the legacy pair, defined on the loaded objects:
`legacy_tokenizer_sha256` (the tokenizer re-serialized by `tokenizers`) and
`legacy_weights_sha256` (the parameters as float32). Both are kept for
decoding those archives.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .errors import ModelError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# config.json keys that name the tool that wrote the file or the dtype the weights are stored in
# (the tensors' own dtypes are hashed; lmzip computes in float32): re-saving a model with another
# transformers version changes them and nothing else.
CONFIG_KEYS_IGNORED = frozenset({"transformers_version", "_name_or_path", "torch_dtype", "dtype"})
MAX_SAFETENSORS_HEADER = 100 * 2**20  # the format's own reference limit
HASH_CHUNK = 2**24


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _field(data: bytes) -> bytes:
    return _u64(len(data)) + data


def tokenizer_sha256(model_dir: Path) -> bytes:
    """SHA-256 of tokenizer.json's bytes as stored."""
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise ModelError(f"'{model_dir}' has no {TOKENIZER_FILE}: lmzip needs a fast (tokenizers) tokenizer's file")
    return file_sha256(path)


def canonical_config(config: dict) -> bytes:
    """config.json as sorted compact JSON in UTF-8, without CONFIG_KEYS_IGNORED."""
    kept = {k: v for k, v in config.items() if k not in CONFIG_KEYS_IGNORED}
    try:
        text = json.dumps(kept, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as e:
        raise ModelError(f"{CONFIG_FILE} holds a value JSON cannot state: {e}") from None
    return text.encode("utf-8")


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} is not a JSON object")
    return config


def weights_sha256(model_dir: Path) -> bytes:
    """SHA-256 over the canonical config, then each tensor in order of name (SPEC.md)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256(_field(canonical_config(read_config(model_dir))))
    tensors = safetensors_tensors(model_dir)
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        path, dtype, shape, begin, end = tensors[name]
        h.update(_field(name.encode("utf-8")) + _field(dtype.encode("ascii")) + _u64(len(shape)))
        h.update(b"".join(_u64(d) for d in shape) + _u64(end - begin))
        _hash_range(h, path, begin, end)
    return h.digest()


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files transformers loads: model.safetensors, else the index's shards."""
    model_dir = Path(model_dir)
    if (model_dir / SAFETENSORS_FILE).is_file():
        return [model_dir / SAFETENSORS_FILE]
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"cannot read {index}: {type(e).__name__}: {e}") from None
        return [model_dir / s for s in shards]
    raise ModelError(f"'{model_dir}' has no {SAFETENSORS_FILE}: lmzip loads safetensors weights only")


def safetensors_tensors(model_dir: Path) -> dict[str, tuple]:
    """{name: (file, dtype, shape, begin, end)} with absolute byte offsets, across shards."""
    tensors: dict[str, tuple] = {}
    for path in safetensors_files(model_dir):
        for name, entry in _read_safetensors_header(path).items():
            if name in tensors:
                raise ModelError(f"tensor '{name}' is stored twice ({tensors[name][0].name}, {path.name})")
            tensors[name] = (path, *entry)
    return tensors


def _read_safetensors_header(path: Path) -> dict[str, tuple]:
    """{name: (dtype, shape, begin, end)}, offsets from the start of the file, checked."""
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise ValueError(f"header length {n} beyond the file or the limit")
            header = json.loads(f.read(n).decode("utf-8"))
        base = 8 + n
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            if not (0 <= begin <= end <= size - base) or any(d < 0 for d in shape):
                raise ValueError(f"tensor '{name}' lies outside the file")
            entries[name] = (str(info["dtype"]), shape, base + begin, base + end)
        return entries
    except (OSError, struct.error, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"cannot read the safetensors file {path}: {type(e).__name__}: {e}") from None


def _hash_range(h, path: Path, begin: int, end: int) -> None:
    try:
        with path.open("rb") as f:
            f.seek(begin)
            left = end - begin
            while left:
                chunk = f.read(min(HASH_CHUNK, left))
                if not chunk:
                    raise ModelError(f"{path} ends before byte {end}")
                h.update(chunk)
                left -= len(chunk)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e}") from None


def file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    try:
        size = Path(path).stat().st_size
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e}") from None
    _hash_range(h, Path(path), 0, size)
    return h.digest()


# -- the legacy pair (formats 1 and 2) --------------------------------------------------------

def legacy_tokenizer_sha256(tokenizer) -> bytes:
    """SHA-256 of the loaded tokenizer's JSON (as `tokenizers` serializes it) with sorted keys."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("lmzip needs a fast (tokenizers-backed) tokenizer")
    return hashlib.sha256(canonical_json(json.loads(backend.to_str()))).digest()


def canonical_json(obj) -> bytes:
    """Sorted keys, no ASCII escaping, default separators: the form of the legacy tokenizer hash."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


def legacy_weights_sha256(model) -> bytes:
    """SHA-256 over every parameter in order of name: name, shape, float32 little-endian bytes."""
    import torch

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().astype("<f4", copy=False).tobytes())
    return h.digest()
