"""Independent work split over CPU cores, each shard running torch on one thread.

On this kind of work (batches of a few dozen rows, element-wise steps between
small GEMMs) two one-thread batches side by side do more than one batch on two
threads (BENCHMARKS.md, "A batch per thread"). Where the operations are large,
torch releases the GIL inside them and Python threads suffice (each must set its
own thread count, since OpenMP keeps one per thread). Where they are thousands
of small ones a step (the exact lm arithmetic), threads of one process queue on
the interpreter, and shards run in forked processes instead.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import multiprocessing.connection
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Sequence, TypeVar

import torch

from .errors import ModelError

T = TypeVar("T")


STALL_SECONDS = 600.0  # a forked process whose work reports no progress for this long is stopped
SUSPENDED_SECONDS = 5.0  # a wait that overran its timeout by this much: this process was stopped (Ctrl-Z)
_last_beat = None  # in a forked process: when its work last reported progress (`beat`), shared


class ProcessEnded(ModelError):
    """A forked process of the work ended without a result (killed, or out of memory)."""


class ProcessStalled(ProcessEnded):
    """A forked process of the work made no progress for STALL_SECONDS, and was stopped."""


def beat() -> None:
    """Report progress (a decoding step, say): the parent stops a forked process whose work
    reports none for STALL_SECONDS, as hung (a lock a fork left held, say) rather than waiting
    on it for ever. Nothing outside a forked process."""
    if _last_beat is not None:
        _last_beat.value = time.monotonic()  # CLOCK_MONOTONIC: one clock for all processes (Linux)


def cpu_threads(device: torch.device) -> int:
    """Shards to run side by side: one per thread torch would use on a CPU; 1 elsewhere."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def deal(weights: Sequence[int], shards: int) -> list[list[int]]:
    """Item indices in `shards` groups of about equal weight: heaviest first, round-robin."""
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    return [order[s::shards] for s in range(shards)]


# Shard threads are kept for the life of the process, never ended after a map: a thread that
# ends frees its MKL buffers in its thread-exit destructors, under MKL's allocator lock, after
# Python's join has returned; a fork at that moment (map_shards_forked, after threaded encoding)
# gives a child whose first float GEMM spins on that lock forever.
_pools: list[tuple[int, ThreadPoolExecutor]] = []  # (threads, pool); the last is in use; older ones
# stay referenced, idle: a pool that is collected ends its threads
_pools_lock = threading.Lock()
_POOL_PREFIX = "lmzip-shard"


def _shard_pool(threads: int) -> ThreadPoolExecutor:
    """A pool of at least `threads` threads, made once and kept (a larger one replaces it for use,
    and the old one's idle threads stay)."""
    with _pools_lock:
        if not _pools or _pools[-1][0] < threads:
            size = max(threads, 8)
            _pools.append((size, ThreadPoolExecutor(size, thread_name_prefix=_POOL_PREFIX)))
        return _pools[-1][1]


def _forget_pools() -> None:
    """In a forked child: none of the pools' threads exist there, and the lock may have been held."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def map_shards(run: Callable[[list[int]], list[T]], shards: list[list[int]], count: int) -> list[T]:
    """run(indices) for each shard, each in its own thread with one torch thread; the `count`
    results back in item order. A single shard runs in the caller's thread, as the caller set it;
    a map inside a shard runs its shards one after another there. If shards fail, the first
    failure is raised once every shard has ended."""
    if len(shards) == 1:
        results = [run(shards[0])]
    else:
        def one_core(indices: list[int]) -> list[T]:
            torch.set_num_threads(1)
            return run(indices)

        saved = torch.get_num_threads()
        try:
            if threading.current_thread().name.startswith(_POOL_PREFIX):  # nested: the pool may be full
                results = [one_core(indices) for indices in shards]
            else:
                futures = [_shard_pool(len(shards)).submit(one_core, indices) for indices in shards]
                wait(futures)  # all done, failed or not, before anything else runs
                results = [f.result() for f in futures]
        finally:
            torch.set_num_threads(saved)
    return _in_item_order(shards, results, count)


def _in_item_order(shards: list[list[int]], results: list[list[T]], count: int) -> list[T]:
    out: list[T | None] = [None] * count
    for indices, part in zip(shards, results):
        for i, r in zip(indices, part):
            out[i] = r
    return out


def exit_with_parent() -> None:
    """Stop this child process as soon as its parent is gone, even killed with SIGKILL: nobody
    would read its results, and long work would hold a core for hours (daemon processes are
    only stopped by a parent that exits normally)."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="lmzip-parent-watch", daemon=True).start()


def can_fork() -> bool:
    """Forked shards where fork is safe for torch on the CPU: Linux (macOS forks badly), and not in
    a daemonic multiprocessing worker (which may not have children)."""
    return sys.platform.startswith("linux") and not mp.current_process().daemon


def map_shards_forked(run: Callable[[list[int]], list[T]], shards: list[list[int]], count: int) -> list[T]:
    """map_shards with every shard but the first in a forked process of one torch thread (the
    first runs here, also on one thread). The children share the parent's memory (the model is
    not loaded again) and send back results or the exception they raised; a child that hangs is
    stopped, and its shard done here."""
    if len(shards) == 1 or not can_fork():
        return map_shards(run, shards, count)
    children: list[Forked] = []
    try:
        for indices in shards[1:]:
            children.append(Forked(functools.partial(run, indices)))
        results = [_one_thread(run, shards[0])] + [_result_or_here(child, run, indices)
                                                   for child, indices in zip(children, shards[1:])]
    finally:
        for child in children:
            child.cancel()  # an error or Ctrl-C here: the others' work is not wanted
    return _in_item_order(shards, results, count)


def _result_or_here(child: "Forked", run, indices):
    """The child's result; if it hung (a lock the fork left held, say), its shard done here."""
    try:
        return child.result()
    except ProcessStalled:
        return _one_thread(run, indices)


class Done:
    """A result that is already there, with Forked's interface (where nothing was forked)."""

    cores = 0  # that the work holds while it runs

    def __init__(self, value):
        self._value = value

    def ready(self) -> bool:
        return True

    def result(self):
        return self._value

    def cancel(self) -> None:
        pass


class Forked:
    """fn() running in a forked process of one torch thread; `result` waits for it and raises
    what it raised. fn must call `beat` at least every STALL_SECONDS, or it is stopped as hung.
    Fork only where no other thread of this process is in torch (the persistent shard threads
    idle): a lock held by a busy thread stays held in the child."""

    cores = 1

    def __init__(self, fn: Callable[[], T]):
        context = mp.get_context("fork")
        self._receive, send = context.Pipe(duplex=False)
        self._last_beat = context.RawValue("d", time.monotonic())  # shared: the child writes, this reads
        self._since = self._last_beat.value  # silence counts from the later of this and the last beat
        self._child = context.Process(target=_forked_child, args=(fn, send, self._last_beat), daemon=True)
        self._outcome: tuple | None = None
        try:
            self._child.start()
        except BaseException:
            self._receive.close()
            raise
        finally:
            send.close()

    def ready(self) -> bool:
        """Whether the child's outcome is there, or its work has stalled (then `result` stops it).
        A report that comes in between may still make `result` wait."""
        return self._outcome is not None or self._receive.poll() or self._silence() > STALL_SECONDS

    def _silence(self) -> float:
        return time.monotonic() - max(self._last_beat.value, self._since)

    def _wait(self) -> None:
        """Until the child's outcome can be read; ProcessStalled (the child stopped) if its work
        reports no progress for STALL_SECONDS."""
        while True:
            timeout = max(0.0, STALL_SECONDS - self._silence())
            due = time.monotonic() + timeout
            if self._receive.poll(timeout):
                return
            if time.monotonic() - due > SUSPENDED_SECONDS:  # stopped with the child: the child's
                self._since = time.monotonic()                # silence was not its own
            elif self._silence() > STALL_SECONDS:
                self._child.kill()
                raise ProcessStalled(f"a process of the work made no progress in {STALL_SECONDS:.0f} s "
                                     "and was stopped (hung?)")

    def result(self):
        if self._outcome is None:
            try:
                self._wait()
                value = _result_of(self._child, self._receive)
            except BaseException as e:
                self.cancel()  # Ctrl-C while waiting, or the child failed
                self._outcome = (False, e)
                raise
            self._outcome = (True, value)
            self.cancel()
        ok, value = self._outcome
        if not ok:
            raise value
        return value

    def cancel(self) -> None:
        """Stop the child if it still runs (its result is not wanted), and let its pipe go."""
        if self._child.is_alive() and self._outcome is None:
            self._child.kill()
        self._child.join()
        self._receive.close()


class AllOf:
    """Several Forked results as one: ready when all are; `result` is the union of theirs."""

    def __init__(self, pending: list):
        self.pending = pending
        self.cores = sum(p.cores for p in pending)

    def ready(self) -> bool:
        return all(p.ready() for p in self.pending)

    def result(self) -> set:
        try:
            return set().union(*(p.result() for p in self.pending))
        finally:
            self.cancel()

    def cancel(self) -> None:
        for p in self.pending:
            p.cancel()


class fewer_threads:
    """Within the block, torch runs on at most `n` threads (a single shard runs on the caller's);
    None leaves it as it is."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        if self.n is not None:
            torch.set_num_threads(max(1, min(self.saved, self.n)))

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def _one_thread(run: Callable[[list[int]], list[T]], indices: list[int]) -> list[T]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(indices)
    finally:
        torch.set_num_threads(saved)


def _forked_child(fn, send, last_beat) -> None:
    global _last_beat
    exit_with_parent()
    _last_beat = last_beat
    try:
        torch.set_num_threads(1)
        outcome = (True, fn())
    except BaseException as e:  # noqa: BLE001 - raised again in the parent
        outcome = (False, e)
    try:
        send.send(outcome)
    except Exception as e:  # noqa: BLE001 - an exception that does not pickle
        error = outcome[1]
        send.send((False, ModelError(f"a process of the work failed: {type(error).__name__}: {error} ({e})")))
    finally:
        send.close()
        os._exit(0)  # no atexit handlers or buffers of the parent's run twice


def _result_of(child, receive):
    try:
        ok, value = receive.recv()
    except EOFError:
        child.join()
        raise ProcessEnded(f"a process of the work ended without a result (exit code {child.exitcode}; "
                           "out of memory?)") from None
    if not ok:
        raise value
    return value
