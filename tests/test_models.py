"""Model sources (local, hub), downloads only when allowed, and the fingerprints of model files.

No test reaches the network: hub models come from a hub cache made in tmp_path, and every
test that could try the hub runs with sockets refused and recorded.
"""

import hashlib
import json
import shutil
import socket
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

import lmzip
from lmzip import fingerprints, models

from conftest import FORMATS, TINY_MODEL

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_network(monkeypatch):
    """Refuse and record every connection: a test that tries one fails."""
    import huggingface_hub.constants  # noqa: F401 - imported before HF_HUB_OFFLINE is set, so
    # that the hub client's offline mode cannot hide a connection lmzip should not have tried

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("lmzip tests: no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)  # a name lookup comes first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a safety net for anything that reads it later
    monkeypatch.delenv(models.ALLOW_DOWNLOAD_ENV, raising=False)
    yield attempts
    assert attempts == [], "a test tried to connect"


@pytest.fixture
def hub_offline(no_network, monkeypatch):
    """For tests that allow downloads: the hub client's offline mode stops them before any socket."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding the tiny model as 'lmzip-tests/tiny-llama' at COMMIT."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--lmzip-tests--tiny-llama"
    shutil.copytree(TINY_MODEL, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo


def tiny_copy(tmp_path, name="tiny-copy") -> Path:
    target = tmp_path / name
    shutil.copytree(TINY_MODEL, target)
    return target


# -- sources and identity ---------------------------------------------------------------------

def test_local_directory_is_named_by_its_base_name(tiny):
    assert tiny.source == "local" and tiny.revision == ""
    assert tiny.model_id == "tiny-llama"  # never the absolute path the archive's reader lacks


def test_hub_model_from_the_cache_loads_without_network(no_network, hub_cache, tiny):
    lm = models.load_model("lmzip-tests/tiny-llama", device="cpu")
    assert (lm.source, lm.model_id, lm.revision) == ("hub", "lmzip-tests/tiny-llama", COMMIT)
    assert (lm.tokenizer_sha256, lm.weights_sha256) == (tiny.tokenizer_sha256, tiny.weights_sha256)


def test_uncached_hub_model_fails_fast_and_says_how_to_allow_downloads(no_network, hub_cache):
    start = time.monotonic()
    with pytest.raises(lmzip.ModelUnavailableError) as e:
        models.load_model("lmzip-tests/not-cached", device="cpu")
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert "\n" not in message and "'lmzip-tests/not-cached'" in message
    assert "--allow-download" in message and "LMZIP_ALLOW_DOWNLOAD=1" in message


def test_allowed_download_that_cannot_connect_is_a_model_error(hub_offline, hub_cache):
    with pytest.raises(lmzip.ModelUnavailableError, match="cannot download model 'lmzip-tests/not-cached'"):
        models.load_model("lmzip-tests/not-cached", device="cpu", allow_download=True)


@pytest.mark.parametrize("value, allowed", [("1", True), ("true", True), ("YES", True), ("0", False),
                                            ("", False), ("no", False), (None, False)])
def test_downloads_follow_the_environment_unless_told(monkeypatch, value, allowed):
    if value is None:
        monkeypatch.delenv(models.ALLOW_DOWNLOAD_ENV, raising=False)
    else:
        monkeypatch.setenv(models.ALLOW_DOWNLOAD_ENV, value)
    assert models.download_allowed() is allowed
    assert models.download_allowed(True) is True and models.download_allowed(False) is False


def test_environment_allows_the_download(hub_offline, hub_cache, monkeypatch):
    monkeypatch.setenv(models.ALLOW_DOWNLOAD_ENV, "1")
    with pytest.raises(lmzip.ModelUnavailableError, match="cannot download"):
        models.load_model("lmzip-tests/not-cached", device="cpu")


def test_missing_path_is_neither_directory_nor_hub_id(tmp_path, no_network):
    with pytest.raises(lmzip.ModelUnavailableError, match="cannot load model .*not a valid hub model ID"):
        models.load_model(str(tmp_path / "nowhere"), device="cpu")


def test_directory_without_tokenizer_json_is_refused(tmp_path):
    directory = tiny_copy(tmp_path)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(lmzip.ModelError, match="no tokenizer.json"):
        models.load_model(str(directory), device="cpu")


def test_directory_without_safetensors_is_refused(tmp_path):
    directory = tiny_copy(tmp_path)
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")  # never unpickled
    with pytest.raises(lmzip.ModelError, match="safetensors"):
        models.load_model(str(directory), device="cpu")


# -- fingerprints -----------------------------------------------------------------------------

def test_tokenizer_fingerprint_is_the_files_sha256(tiny):
    assert tiny.tokenizer_sha256 == hashlib.sha256((Path(TINY_MODEL) / "tokenizer.json").read_bytes()).digest()


def test_weights_fingerprint_follows_its_definition(tiny):
    """An independent reading of SPEC.md's definition, from the file's bytes."""
    def field(b):
        return len(b).to_bytes(8, "little") + b

    config = json.loads((Path(TINY_MODEL) / "config.json").read_text())
    for key in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        config.pop(key, None)
    h = hashlib.sha256(field(json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()))
    raw = (Path(TINY_MODEL) / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    for name in sorted(header, key=str.encode):
        info = header[name]
        begin, end = info["data_offsets"]
        h.update(field(name.encode()) + field(info["dtype"].encode()) + len(info["shape"]).to_bytes(8, "little"))
        h.update(b"".join(d.to_bytes(8, "little") for d in info["shape"]) + (end - begin).to_bytes(8, "little"))
        h.update(raw[8 + n + begin: 8 + n + end])
    assert tiny.weights_sha256 == h.digest()


def test_weights_fingerprint_ignores_storage_details(tmp_path, tiny):
    """Re-saving the same tensors in another order, with other metadata and another
    transformers_version, keeps the fingerprint."""
    directory = tiny_copy(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    save_file(dict(reversed(list(tensors.items()))), directory / "model.safetensors", metadata={"format": "pt", "x": "y"})
    config = json.loads((directory / "config.json").read_text())
    config["transformers_version"] = "9.9.9"
    (directory / "config.json").write_text(json.dumps(config, indent=4))
    assert fingerprints.weights_sha256(directory) == tiny.weights_sha256


@pytest.mark.parametrize("change", ["tensor", "config", "dtype"])
def test_weights_fingerprint_covers_tensors_and_config(tmp_path, tiny, change):
    directory = tiny_copy(tmp_path)
    if change == "config":
        config = json.loads((directory / "config.json").read_text())
        config["rms_norm_eps"] = config["rms_norm_eps"] * 2
        (directory / "config.json").write_text(json.dumps(config))
    else:
        tensors = load_file(directory / "model.safetensors")
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] + 1 if change == "tensor" else tensors[name].astype("float64")
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    assert fingerprints.weights_sha256(directory) != tiny.weights_sha256


def test_sharded_weights_are_fingerprinted_as_one(tmp_path, tiny):
    directory = tiny_copy(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, directory / shard, metadata={"format": "pt"})
    (directory / "model.safetensors").unlink()
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert fingerprints.weights_sha256(directory) == tiny.weights_sha256


def test_damaged_safetensors_header_is_a_model_error(tmp_path):
    directory = tiny_copy(tmp_path)
    (directory / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(lmzip.ModelError, match="cannot read the safetensors file"):
        fingerprints.weights_sha256(directory)


# -- the legacy pair (formats 1 and 2) --------------------------------------------------------

@pytest.mark.parametrize("sample", ["good-memory-tiny-v2.lmz", "good-memory-tiny-v1.lmz"])
def test_legacy_pair_matches_what_old_archives_recorded(tiny, sample):
    info = lmzip.inspect((FORMATS / sample).read_bytes())
    recorded = bytes.fromhex(info["tokenizer_sha256"]), bytes.fromhex(info["weights_sha256"])
    assert (tiny.legacy_tokenizer_sha256, tiny.legacy_weights_sha256) == recorded
    tiny.check_matches(info["model_id"], *recorded, legacy=True)
    with pytest.raises(lmzip.ModelMismatchError, match="needs model 'tests/data/tiny-llama' with tokenizer sha256"):
        tiny.check_matches(info["model_id"], *recorded)  # not format 3 fingerprints


def test_check_matches_names_what_differs(tiny):
    tiny.check_matches("tiny-llama", tiny.tokenizer_sha256, tiny.weights_sha256)
    with pytest.raises(lmzip.ModelMismatchError, match=r"weights sha256 0000.*format 1/2 fingerprints"):
        tiny.check_matches("tiny-llama", tiny.legacy_tokenizer_sha256, bytes(32), legacy=True)


def test_unreadable_tokenizer_file_is_a_model_error(tmp_path):
    directory = tiny_copy(tmp_path)
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer.json").mkdir()  # there, but not a file that can be read
    with pytest.raises(lmzip.ModelError):
        fingerprints.file_sha256(directory / "tokenizer.json")
