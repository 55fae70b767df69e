"""Fitting on a Ray cluster: one actor per GPU (per core where the cluster has no GPU).

Each actor loads the model once, from its node's cache, and fits the regions it is
given batched, as one process does (`fit_regions`). The driver, the process that
writes the archive, keeps one call in flight per actor with `ray.wait` and yields a
region's segments only once the whole region is fitted: a region is delivered once,
whole, so when an actor dies (a node lost, out of memory) its unfinished regions are
fitted again by a fresh actor, and nothing is yielded twice. Only plain data crosses:
regions in; segments, names and fingerprints out. Every actor's model must be the
driver's own (same tokenizer and weights fingerprints), else the archive would not
decode. Ray is an optional extra: `pip install 'lmzip[ray]'`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Hashable, Iterable, Iterator

from .errors import ClusterError, LmzError, ModelMismatchError, ModelUnavailableError, fitting_out_of_memory
from .fit_config import FitConfig
from .kinds import CodedSegment
from .segmenting import Region

LOCAL = "local"              # the address that starts a one-machine cluster here
ACTOR_PREFIX = "lmzip-fit-"  # actor names, as `ray list actors` shows them
MAX_LOSSES = 3               # a region lost with its actor this many times is not tried again
REACH_TIMEOUT = 10           # seconds to wait for the head node to accept a connection
CALL_BATCHES = 2             # regions per call, in batches: fewer half-empty batches at a call's end


class _Fitter:
    """One actor: the model, loaded once. Its failures to load come back as text (plain data)."""

    def __init__(self, model: str | None, allow_download: bool, cpu_only: bool):
        import torch

        from .models import load_model

        if cpu_only:
            torch.set_num_threads(1)  # one actor per core
        self.lm, self.error = None, None
        try:
            # Ray gives a GPU actor its own device as the only visible one: "cuda" is that one.
            self.lm = load_model(model, "cpu" if cpu_only else None, allow_download=allow_download)
        except LmzError as e:
            self.error = str(e)

    def ready(self) -> dict:
        """Where this actor runs and which model it loaded, for the driver to check first."""
        lm = self.lm
        return {"where": f"{socket.gethostname()} (pid {os.getpid()})", "error": self.error,
                "fingerprints": lm and [lm.tokenizer_sha256.hex(), lm.weights_sha256.hex()]}

    def fit(self, regions: list[tuple[Hashable, Region]], cfg: FitConfig):
        """Yield (key, segments) for each region as soon as all of its segments are fitted."""
        from .fit import fit_regions

        left = {key: len(region.text.encode("utf-8")) for key, region in regions}
        done: dict[Hashable, list[CodedSegment]] = {key: [] for key in left}
        for key, segment in fit_regions(self.lm, regions, cfg):
            done[key].append(segment)
            left[key] -= len(segment.data)
            if left[key] == 0:
                yield key, done.pop(key)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _import_ray(local_only: bool):
    if local_only and "ray" not in sys.modules:
        # Ray binds a one-machine cluster to the loopback address only where it takes clusters
        # for unsupported; this switch says so (read when ray is imported), so nothing listens
        # on the network.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ClusterError("fitting on a cluster needs Ray: pip install 'lmzip[ray]'") from None
    return ray


def _check_reachable(address: str) -> None:
    """Ray retries an unreachable head for minutes: a HOST:PORT that refuses is said at once."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in host:
        return  # "auto", "local", or a form Ray resolves itself (ray://…)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at '{address}' ({e.strerror or e}): "
                           "is `ray start --head` running there?") from None


def connect(address: str):
    """This process's Ray connection, made once: a running cluster's address, "auto" (the one
    `ray start` runs here, or RAY_ADDRESS), or "local" (a new one on this machine, localhost only).
    A process already connected keeps its connection."""
    ray = _import_ray(address == LOCAL)
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            if address == LOCAL:
                ray.init(address=LOCAL, include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
        except Exception as e:  # ConnectionError, ValueError, RuntimeError, …
            raise ClusterError(f"cannot connect to the Ray cluster at '{address}': {_first_line(e)}") from None
    return ray


@dataclass
class _Call:
    actor: object
    regions: dict  # key -> Region, those not delivered yet


class _Pool:
    """The actors: starting (their `ready` call in flight) or idle; the driver tracks the busy ones."""

    def __init__(self, ray, make, expect: tuple[bytes, bytes] | None, size: int):
        self.ray, self.make, self.expect, self.size = ray, make, expect, size
        self.starting: dict = {}  # ready() ref -> actor
        self.idle: list = []
        self.actors: list = []
        self.lost = 0

    def start(self) -> None:
        actor = self.make(f"{ACTOR_PREFIX}{uuid.uuid4().hex[:12]}")
        self.actors.append(actor)
        self.starting[actor.ready.remote()] = actor

    def admit(self, ref, lost_errors) -> None:
        """An actor answered (or died) starting: give it work if its model is the driver's."""
        actor = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except lost_errors as e:
            self.replace(actor, e)
            return
        if info["error"]:
            raise ModelUnavailableError(f"a fitting actor on {info['where']}: {info['error']}")
        if self.expect is not None and info["fingerprints"] != [f.hex() for f in self.expect]:
            raise ModelMismatchError(f"the fitting actor on {info['where']} loaded another model than this "
                                     f"one (weights sha256 {info['fingerprints'][1][:16]}…, here "
                                     f"{self.expect[1].hex()[:16]}…): every node needs the same model")
        self.idle.append(actor)

    def replace(self, actor, error: BaseException) -> None:
        """An actor died: stop it for good and start a fresh one (Ray places it where there is room)."""
        self.lost += 1
        if self.lost > MAX_LOSSES * self.size:
            raise ClusterError(f"fitting actors keep dying ({self.lost} lost; out of memory?): "
                               f"{_first_line(error)}")
        self.stop(actor)
        self.start()

    def stop(self, actor) -> None:
        self.actors.remove(actor)
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _fitting_failure(cause: BaseException, gpus: int, cfg: FitConfig) -> LmzError:
    """The error for a failure in an actor's fitting code: a device out of memory is the user's
    to fix (fewer rows at a time); anything else is the cluster's failure, not retried."""
    if type(cause).__name__ == "OutOfMemoryError" and type(cause).__module__ == "torch":
        return fitting_out_of_memory("an actor's GPU" if gpus else "an actor's", cfg.batch_size)
    return ClusterError(f"fitting on the cluster failed: {type(cause).__name__}: {_first_line(cause)}")


def fit_on_ray(address: str, model: str | None, regions: Iterable[tuple[Hashable, Region]], cfg: FitConfig,
               *, expect: tuple[bytes, bytes] | None = None,
               allow_download: bool = False) -> Iterator[tuple[Hashable, CodedSegment]]:
    """Fit the regions on a Ray cluster; yield (key, segment), each region's segments together
    and in order once it is done. `expect` is the driver's (tokenizer, weights) sha256: an actor
    that loaded anything else is refused. Actors load `model` from their node's cache only,
    unless `allow_download`."""
    ray = connect(address)
    from ray import exceptions as rx

    lost_errors = (rx.RayActorError, rx.ObjectLostError, rx.NodeDiedError, rx.WorkerCrashedError,
                   rx.OutOfMemoryError)
    todo = deque(regions)
    if not todo:
        return
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if not gpus and not cpus:
        raise ClusterError("the Ray cluster has no CPU or GPU to fit on")
    per_call = max(1, min(CALL_BATCHES * cfg.batch_size, math.ceil(len(todo) / (gpus or cpus))))
    actor_class = ray.remote(_Fitter)
    resource = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    pool = _Pool(ray, lambda name: actor_class.options(name=name, max_restarts=0, **resource).remote(
        model, allow_download, not gpus), expect, min(gpus or cpus, math.ceil(len(todo) / per_call)))
    losses: Counter = Counter()
    calls: dict = {}  # streaming generator -> _Call
    try:
        for _ in range(pool.size):
            pool.start()
        while todo or calls:
            while pool.idle and todo:
                actor = pool.idle.pop()
                # Near the end (or after a loss) what is left is shared out rather than given to one.
                take = min(per_call, math.ceil(len(todo) / pool.size))
                batch = [todo.popleft() for _ in range(take)]
                calls[actor.fit.options(num_returns="streaming").remote(batch, cfg)] = _Call(actor, dict(batch))
            (ready,), _ = ray.wait([*pool.starting, *calls], num_returns=1)
            if ready in pool.starting:
                pool.admit(ready, lost_errors)
                continue
            call = calls[ready]
            try:
                key, segments = ray.get(next(ready))
            except StopIteration:
                assert not call.regions, "lmzip bug: a fitting call ended with regions unfitted"
                del calls[ready]
                pool.idle.append(call.actor)
                continue
            except lost_errors as e:
                del calls[ready]
                for key, region in call.regions.items():
                    losses[key] += 1
                    if losses[key] >= MAX_LOSSES:
                        raise ClusterError(f"a region was lost {losses[key]} times with the actor fitting it "
                                           f"(out of memory?): {_first_line(e)}") from None
                    todo.appendleft((key, region))
                pool.replace(call.actor, e)
                continue
            except rx.RayError as e:  # a failure in the fitting code, or no node can hold an actor
                raise _fitting_failure(getattr(e, "cause", None) or e, gpus, cfg) from None
            del call.regions[key]
            for segment in segments:
                yield key, segment
    finally:
        for actor in list(pool.actors):
            pool.stop(actor)
