"""Fitting on a Ray cluster (lmzip[ray]): a local cluster on localhost, started once for the module."""

import os
import subprocess
import sys

import pytest

import lmzip
from lmzip import cluster
from lmzip.fit import FitConfig
from lmzip.segmenting import Region

from archive_edit import kinds
from conftest import ROOT, TINY_MODEL, TINY_OPTIONS

TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, "
        "and of having nothing to do: once or twice she had peeped into the book.")
OPTIONS = {**TINY_OPTIONS, "tokens_per_segment": None, "start_tokens": 12, "grow_tokens": 8, "max_steps": 60}
CFG = FitConfig(vectors=1, max_vectors=1, lr=0.1, margin=0.5, hinge=1.0, bf16=False)


@pytest.fixture(scope="module")
def ray():
    with pytest.MonkeyPatch.context() as env:
        # Ray binds a one-machine cluster to 127.0.0.1 only under this switch, read on import.
        env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'lmzip[ray]')")
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_the_test_cluster_listens_on_localhost_only(ray):
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")


LOCAL = "from lmzip import cluster; print(cluster.connect('local').get_runtime_context().gcs_address)"


def test_a_local_cluster_listens_on_localhost_only(ray):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    started = subprocess.run([sys.executable, "-c", LOCAL], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert started.stdout.startswith("127.0.0.1:"), started.stderr[-2000:]


def test_an_unreachable_head_is_said_at_once(ray):
    script = "from lmzip import cluster; cluster.connect('127.0.0.1:9')"  # nothing listens on port 9
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    started = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert "ClusterError: cannot reach the Ray cluster at '127.0.0.1:9' (Connection refused)" in started.stderr


def test_an_archive_fitted_on_ray_decodes_exactly(codec, ray, tmp_path):
    journal = tmp_path / "doc.lmz.journal"
    blob = codec.encode(TEXT, cluster="auto", journal=journal, **OPTIONS)
    assert codec.decode(blob) == TEXT.encode()
    assert "memory" in kinds(blob)
    assert len(list(journal.glob("*.seg"))) == len(kinds(blob))  # journaled as they came


def test_killed_actors_have_their_regions_redone(codec, ray, monkeypatch):
    """Every actor is killed once the first region is back; the rest is fitted again, nothing twice."""
    # 8-token regions; with batch size 1 an actor fits a call's two regions one after the other,
    # so when the first region is back, its call still has one to do.
    text = TEXT[:96]
    options = {**TINY_OPTIONS, "batch_size": 1}
    replaced = []
    real_replace = cluster._Pool.replace
    monkeypatch.setattr(cluster._Pool, "replace", lambda pool, actor, e: (replaced.append(e),
                                                                         real_replace(pool, actor, e)))
    real_fit = cluster.fit_on_ray
    regions, delivered = {}, {}

    def killing(address, model, plan, cfg, **kw):
        regions.update(plan)
        for key, segment in real_fit(address, model, regions.items(), cfg, **kw):
            if not delivered:
                for name in ray.util.list_named_actors():
                    if name.startswith(cluster.ACTOR_PREFIX):
                        ray.kill(ray.get_actor(name))
            delivered[key] = delivered.get(key, b"") + segment.data
            assert regions[key].text.encode().startswith(delivered[key])  # no segment twice
            yield key, segment

    monkeypatch.setattr(cluster, "fit_on_ray", killing)
    blob = codec.encode(text, cluster="auto", **options)
    assert len(regions) >= 4 and replaced
    assert delivered == {key: r.text.encode() for key, r in regions.items()}
    assert isinstance(replaced[0], ray.exceptions.RayActorError)
    assert codec.decode(blob) == text.encode()
    assert "memory" in kinds(blob)


def test_an_actor_with_another_model_is_refused(ray, tiny):
    region = [(0, Region(TEXT, True, 64))]
    with pytest.raises(lmzip.ModelMismatchError, match="loaded another model than this one"):
        list(cluster.fit_on_ray("auto", TINY_MODEL, region, CFG, expect=(tiny.tokenizer_sha256, bytes(32))))


def test_a_model_missing_on_the_nodes_is_named(ray, tmp_path):
    region = [(0, Region(TEXT, True, 64))]
    with pytest.raises(lmzip.ModelUnavailableError, match="a fitting actor on .*has no tokenizer.json"):
        list(cluster.fit_on_ray("auto", str(tmp_path), region, CFG))


def test_a_failure_in_the_fitting_code_is_raised_not_retried(ray, monkeypatch):
    replaced = []
    monkeypatch.setattr(cluster._Pool, "replace", lambda pool, actor, e: replaced.append(e))
    bad = [(0, Region(TEXT, False, 8, None))]  # a whole region without its tokens
    with pytest.raises(lmzip.ClusterError, match="fitting on the cluster failed: TypeError"):
        list(cluster.fit_on_ray("auto", TINY_MODEL, bad, CFG))
    assert not replaced


def test_without_ray_the_cluster_option_says_what_to_install(codec, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(lmzip.ClusterError, match=r"needs Ray: pip install 'lmzip\[ray\]'"):
        codec.encode(TEXT, cluster="auto", **OPTIONS)


def test_cluster_and_workers_are_exclusive(codec):
    with pytest.raises(lmzip.OptionError, match="not both"):
        codec.encode(TEXT, cluster="auto", workers=2, **OPTIONS)


@pytest.mark.parametrize("method", ["lm", "zstd"])
def test_workers_and_cluster_are_refused_where_nothing_is_fitted(codec, method):
    for spread in ({"workers": 2}, {"cluster": "auto"}):
        with pytest.raises(lmzip.OptionError, match=f"method {method} takes neither"):
            codec.encode(TEXT, method=method, **spread)


def test_an_actor_out_of_device_memory_says_to_fit_fewer_rows():
    import torch

    failure = cluster._fitting_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB"), 1, CFG)
    assert isinstance(failure, lmzip.DeviceMemoryError) and "out of an actor's GPU memory" in str(failure)
    assert f"fitting {CFG.batch_size} segments at a time: give a smaller --batch-size" in str(failure)
    other = cluster._fitting_failure(TypeError("bad region"), 0, CFG)
    assert isinstance(other, lmzip.ClusterError) and str(other) == "fitting on the cluster failed: TypeError: bad region"
