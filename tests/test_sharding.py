"""Shards of independent work: threads, and forked processes for the exact lm decoder."""

import os
import signal
import threading
import time

import pytest
import torch

import lmzip
from lmzip.sharding import can_fork, deal, map_shards, map_shards_forked

pytestmark = pytest.mark.skipif(not can_fork(), reason="forked shards run on Linux only")


def where(indices):
    return [(i, os.getpid(), torch.get_num_threads()) for i in indices]


def test_deal_balances_the_weights():
    assert deal([5, 1, 4, 2], 2) == [[0, 3], [2, 1]]


def test_forked_shards_come_back_in_item_order_from_processes_of_one_thread():
    before = torch.get_num_threads()
    shards = deal([3, 1, 2, 5, 4], 3)
    out = map_shards_forked(where, shards, 5)
    assert [i for i, _, _ in out] == list(range(5))
    pids = {pid for _, pid, _ in out}
    assert len(pids) == 3 and os.getpid() in pids  # the first shard runs here
    assert {threads for _, _, threads in out} == {1}
    assert torch.get_num_threads() == before
    assert map_shards(where, shards, 5)[0][0] == 0


def in_child(action):
    """A shard function that does `action` in a forked child and returns its items here."""
    parent = os.getpid()

    def run(indices):
        if os.getpid() != parent:
            action()
        return indices

    return run


def raise_(error):
    raise error


def test_an_error_in_a_child_is_raised_here_as_itself():
    with pytest.raises(ValueError, match="cannot follow"):
        map_shards_forked(in_child(lambda: raise_(ValueError("the range coder cannot follow the payload"))),
                          [[0], [1]], 2)


def test_an_error_that_does_not_pickle_is_still_reported():
    class Local(Exception):  # a local class does not pickle
        pass

    with pytest.raises(lmzip.ModelError, match="Local: boom"):
        map_shards_forked(in_child(lambda: raise_(Local("boom"))), [[0], [1]], 2)


def test_a_child_killed_is_an_error_not_a_hang():
    with pytest.raises(lmzip.ModelError, match="ended without a result"):
        map_shards_forked(in_child(lambda: os.kill(os.getpid(), signal.SIGKILL)), [[0], [1]], 2)


def test_an_error_here_stops_the_children():
    def run(indices):
        if os.getpid() == parent:
            raise ValueError("damaged")
        time.sleep(600)
        return indices

    parent = os.getpid()
    start = time.monotonic()
    with pytest.raises(ValueError):
        map_shards_forked(run, [[0], [1]], 2)
    assert time.monotonic() - start < 60


def native_ids(indices):
    time.sleep(0.05)  # long enough that each shard gets a thread of its own
    return [threading.get_native_id() for _ in indices]


def test_shard_threads_outlive_the_map_so_a_fork_never_meets_one_ending():
    """A thread that ends frees its MKL buffers under MKL's allocator lock after Python's join has
    returned; a child forked then spins on that lock at its first float GEMM. So the threads of
    map_shards must still be alive after it returns."""
    first = map_shards(native_ids, [[0], [1], [2]], 3)
    assert len(set(first)) == 3
    time.sleep(0.3)  # long enough for an ended thread to be gone from /proc
    alive = set(os.listdir("/proc/self/task"))
    assert all(str(tid) in alive for tid in first)


def test_a_forked_child_maps_shards_on_threads_of_its_own():
    """The parent's pool threads do not exist in a child, though its pool would count them idle:
    a map there must start threads of its own, not wait for them."""
    map_shards(native_ids, [[0], [1], [2]], 3)

    def in_the_child(indices):
        done = []
        worker = threading.Thread(target=lambda: done.append(map_shards(native_ids, [[0], [1], [2]], 3)))
        worker.start()
        worker.join(timeout=10)
        return [len(done) for _ in indices]

    assert map_shards_forked(in_the_child, [[0], [1]], 2) == [1, 1]



def test_a_forked_child_is_not_held_by_a_pool_lock_taken_at_the_fork():
    """Another thread may hold the pool lock when the process forks; the child gets a free one."""
    import lmzip.sharding as sharding

    parent = os.getpid()

    def in_the_child(indices):
        if os.getpid() == parent:
            return [1 for _ in indices]
        done = []
        worker = threading.Thread(target=lambda: done.append(map_shards(native_ids, [[0], [1]], 2)))
        worker.start()
        worker.join(timeout=10)
        return [len(done) for _ in indices]

    with sharding._pools_lock:
        assert map_shards_forked(in_the_child, [[0], [1]], 2) == [1, 1]

def test_a_failed_shard_is_raised_only_once_every_shard_has_ended():
    ended = []

    def run(indices):
        if indices == [0]:
            raise ValueError("shard 0 failed")
        time.sleep(0.3)
        ended.append(indices)
        return indices

    with pytest.raises(ValueError, match="shard 0 failed"):
        map_shards(run, [[0], [1]], 2)
    assert ended == [[1]]


def test_a_map_inside_a_shard_runs_there():
    out = map_shards(lambda ix: [map_shards(lambda jx: [threading.current_thread().name for _ in jx],
                                            [[0], [1]], 2) for _ in ix], [[0], [1]], 2)
    for inner in out:
        assert len(set(inner)) == 1 and inner[0].startswith("lmzip-shard")


def test_forked_work_comes_back_from_a_process_of_one_thread():
    from lmzip.sharding import Forked

    pending = Forked(lambda: (os.getpid(), torch.get_num_threads()))
    pid, threads = pending.result()
    assert pid != os.getpid() and threads == 1 and pending.ready()
    assert pending.result() == (pid, threads)  # kept: the child and its pipe are gone


def test_forked_work_raises_what_it_raised_and_can_be_stopped():
    from lmzip.sharding import Forked

    with pytest.raises(ZeroDivisionError):
        Forked(lambda: 1 / 0).result()
    slow = Forked(lambda: time.sleep(60))
    assert not slow.ready()
    started = time.monotonic()
    slow.cancel()
    assert not slow._child.is_alive() and time.monotonic() - started < 10


def test_a_forked_child_that_is_killed_is_reported_as_such():
    from lmzip.sharding import AllOf, Forked, ProcessEnded

    both = AllOf([Forked(lambda: {1}), Forked(lambda: os.kill(os.getpid(), signal.SIGKILL))])
    assert both.cores == 2
    with pytest.raises(ProcessEnded, match="ended without a result"):
        both.result()
    assert AllOf([Forked(lambda: {1}), Forked(lambda: {2})]).result() == {1, 2}


def beating(beats: int, every: float, then_hang: bool = False, value=7):
    """Work that reports progress `beats` times, `every` seconds apart, then hangs or returns."""
    from lmzip.sharding import beat

    def work():
        for _ in range(beats):
            time.sleep(every)
            beat()
        if then_hang:
            time.sleep(600)
        return value

    return work


def test_a_forked_process_that_stops_reporting_progress_is_stopped(monkeypatch):
    from lmzip import sharding
    from lmzip.sharding import Forked, ProcessEnded, ProcessStalled

    monkeypatch.setattr(sharding, "STALL_SECONDS", 2.0)
    start = time.monotonic()
    hung = Forked(beating(3, 0.3, then_hang=True))
    with pytest.raises(ProcessStalled, match="no progress in 2 s"):
        hung.result()
    assert 2.6 < time.monotonic() - start < 20  # its 3 reports held it off, then 2 s of silence
    assert not hung._child.is_alive()
    assert issubclass(ProcessStalled, ProcessEnded)  # handled as a killed process is


def test_work_longer_than_the_stall_limit_that_reports_progress_goes_on(monkeypatch):
    from lmzip import sharding
    from lmzip.sharding import Forked

    monkeypatch.setattr(sharding, "STALL_SECONDS", 2.0)
    assert Forked(beating(12, 0.3)).result() == 7  # 3.6 s in all


def test_a_stalled_process_is_ready_so_the_caller_stops_waiting(monkeypatch):
    from lmzip import sharding
    from lmzip.sharding import Forked, ProcessStalled

    monkeypatch.setattr(sharding, "STALL_SECONDS", 1.0)
    hung = Forked(beating(0, 0, then_hang=True))
    assert not hung.ready()
    time.sleep(1.5)
    assert hung.ready()
    with pytest.raises(ProcessStalled):
        hung.result()


def test_a_wait_this_process_slept_through_is_not_the_childs_silence(monkeypatch):
    """Stopped together (Ctrl-Z) and resumed after the limit, the parent does not stop its child."""
    from lmzip import sharding
    from lmzip.sharding import Forked

    monkeypatch.setattr(sharding, "STALL_SECONDS", 1.0)
    monkeypatch.setattr(sharding, "SUSPENDED_SECONDS", 0.5)
    work = Forked(beating(1, 2.5))  # silent for 2.5 s, then done
    real_poll, polls = work._receive.poll, []

    def overslept(timeout=0.0):
        polls.append(timeout)
        if len(polls) == 1:  # the first wait: as if this process were stopped for 2 s in it
            time.sleep(2.0)
            return False
        return real_poll(timeout)

    monkeypatch.setattr(work._receive, "poll", overslept)
    assert work.result() == 7 and len(polls) >= 2


def test_a_hung_shard_is_done_here(monkeypatch):
    from lmzip import sharding

    monkeypatch.setattr(sharding, "STALL_SECONDS", 1.0)
    start = time.monotonic()
    assert map_shards_forked(in_child(lambda: time.sleep(600)), [[0], [1, 2]], 3) == [0, 1, 2]
    assert time.monotonic() - start < 30


def _report_can_fork(queue):
    queue.put(can_fork())


def test_a_daemonic_worker_does_not_fork():
    """multiprocessing forbids a daemonic process children: its work runs in it instead."""
    import multiprocessing as mp

    context = mp.get_context("fork")
    queue = context.Queue()
    worker = context.Process(target=_report_can_fork, args=(queue,), daemon=True)
    worker.start()
    assert queue.get(timeout=30) is False and can_fork()
    worker.join()
