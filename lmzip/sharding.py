"""Independent work split over CPU threads, each thread running torch on one core.

On this kind of work (batches of a few dozen rows, element-wise steps between
small GEMMs) two one-thread batches side by side do more than one batch on two
threads (BENCHMARKS.md, "A batch per thread"). torch releases the GIL inside
its operations, so Python threads suffice; each must set its own thread count,
since OpenMP keeps one per thread.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


def cpu_threads(device: torch.device) -> int:
    """Shards to run side by side: one per thread torch would use on a CPU; 1 elsewhere."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def deal(weights: Sequence[int], shards: int) -> list[list[int]]:
    """Item indices in `shards` groups of about equal weight: heaviest first, round-robin."""
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    return [order[s::shards] for s in range(shards)]


def map_shards(run: Callable[[list[int]], list[T]], shards: list[list[int]], count: int) -> list[T]:
    """run(indices) for each shard, each in its own thread with one torch thread; the `count`
    results back in item order. One shard runs in the caller's thread, as the caller set it."""
    if len(shards) == 1:
        results = [run(shards[0])]
    else:
        def one_core(indices: list[int]) -> list[T]:
            torch.set_num_threads(1)
            return run(indices)

        saved = torch.get_num_threads()
        try:
            with ThreadPoolExecutor(len(shards), thread_name_prefix="lmzip-shard") as pool:
                results = list(pool.map(one_core, shards))
        finally:
            torch.set_num_threads(saved)
    out: list[T | None] = [None] * count
    for indices, part in zip(shards, results):
        for i, r in zip(indices, part):
            out[i] = r
    return out
