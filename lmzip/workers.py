"""Fitting in several processes: regions are dealt to workers, each loads the model once.

Each worker is a separate process (spawned, so no thread pool is inherited) with
its share of the regions; it fits them batched, as one process does, and sends
each coded segment back as soon as it closes. The codec writes them in order.
Two one-thread processes do about 30 % more than one two-thread process on a
2-core CPU (README); on a machine with GPUs, one worker per GPU.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from typing import Hashable, Iterable, Iterator

from .errors import LmzError, ModelError, fitting_out_of_memory
from .fit_config import FitConfig
from .kinds import CodedSegment
from .segmenting import Region
from .sharding import exit_with_parent

_DONE = "done"


def default_workers() -> int:
    """One per GPU where there are GPUs, else one per core."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _device_for(worker: int) -> str | None:
    import torch

    return f"cuda:{worker % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"


def _work(worker: int, threads: int, model: str | None, regions: list, cfg: FitConfig, out) -> None:
    """One worker: load the model (from the cache), fit its regions, send back each segment."""
    exit_with_parent()
    try:
        import torch

        torch.set_num_threads(threads)
        from .fit import fit_regions
        from .models import load_model

        lm = load_model(model, _device_for(worker), allow_download=False)
        for key, segment in fit_regions(lm, regions, cfg):
            out.put((key, segment))
        out.put((_DONE, worker))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        memory = type(e).__name__ == "OutOfMemoryError"  # torch's: the device's, the user's to fix
        out.put((_DONE, (memory, _device_for(worker) or "cpu", f"worker {worker}: {type(e).__name__}: {e}")))


def _worker_failure(report: tuple[bool, str, str], cfg: FitConfig) -> LmzError:
    """The error for what a worker reported as it failed: (out of device memory, device, text)."""
    memory, device, text = report
    return fitting_out_of_memory(device, cfg.batch_size) if memory else LmzError(f"fitting failed in {text}")


def fit_in_workers(model: str | None, regions: Iterable[tuple[Hashable, Region]], cfg: FitConfig,
                   workers: int) -> Iterator[tuple[Hashable, CodedSegment]]:
    """Deal the regions to `workers` processes round-robin; yield (key, segment) as they close."""
    regions = list(regions)
    workers = max(1, min(workers, len(regions)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = mp.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=_work, args=(w, threads, model, regions[w::workers], cfg, out),
                                 daemon=True) for w in range(workers)]
    for p in processes:
        p.start()
    finished: set[int] = set()
    try:
        while len(finished) < workers:
            try:
                key, item = out.get(timeout=5)
            except queue.Empty:
                if any(p.exitcode is not None and w not in finished for w, p in enumerate(processes)):
                    raise ModelError("a fitting worker died without a word (out of memory?)") from None
                continue
            if key == _DONE:
                if isinstance(item, tuple):
                    raise _worker_failure(item, cfg)
                finished.add(item)
            else:
                yield key, item
    finally:
        for p in processes:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
