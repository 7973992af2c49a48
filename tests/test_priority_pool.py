"""`dataloading.store.streamer.PriorityPool`: the parts of the shard read soonest run first; a
shutdown with ``cancel_futures`` cancels what is queued and lets what runs finish."""

import threading

import pytest

from dataloading.store.streamer import PriorityPool


def _blocked_pool():
    """A one-worker pool whose worker is held by a call until the returned event is set."""
    pool = PriorityPool(1, thread_name_prefix="test")
    started, release = threading.Event(), threading.Event()
    holding = pool.submit(-1, lambda: (started.set(), release.wait(5))[1])
    assert started.wait(5)
    return pool, release, holding


@pytest.mark.parametrize("submitted, expected", [
    # (priority, name) in submission order -> run order: lowest priority first, FIFO among equals
    ([(3, "c"), (1, "a1"), (2, "b"), (1, "a2")], ["a1", "a2", "b", "c"]),
    ([(0, "x"), (0, "y"), (0, "z")], ["x", "y", "z"]),
    ([(2, "late"), (0.5, "soon")], ["soon", "late"]),
])
def test_queued_calls_run_lowest_priority_first_fifo_among_equals(submitted, expected):
    pool, release, _ = _blocked_pool()
    ran: list[str] = []
    futures = [pool.at(p).submit(ran.append, name) for p, name in submitted]
    release.set()
    for f in futures:
        f.result(timeout=5)
    pool.shutdown()
    assert ran == expected


def test_an_exception_reaches_the_waiter_and_the_worker_goes_on():
    pool = PriorityPool(1)
    bad = pool.at(0).submit(lambda: 1 / 0)
    good = pool.at(0).submit(lambda: 42)
    with pytest.raises(ZeroDivisionError):
        bad.result(timeout=5)
    assert good.result(timeout=5) == 42
    pool.shutdown()


def test_shutdown_cancels_queued_calls_and_lets_the_running_one_finish():
    pool, release, holding = _blocked_pool()
    ran: list[int] = []
    queued = [pool.at(i).submit(ran.append, i) for i in range(3)]
    closer = threading.Thread(target=pool.shutdown, kwargs=dict(wait=True, cancel_futures=True))
    closer.start()
    assert all(_wait_cancel(f) for f in queued)  # cancelled while the worker is still held
    assert closer.is_alive()  # shutdown(wait=True) waits for the running call
    release.set()
    closer.join(5)
    assert not closer.is_alive()
    assert holding.result(timeout=0) is True and ran == []
    with pytest.raises(RuntimeError, match="shut down"):
        pool.at(0).submit(ran.append, 9)


def test_shutdown_without_cancel_runs_what_was_queued():
    pool, release, _ = _blocked_pool()
    ran: list[int] = []
    for i in (2, 0, 1):
        pool.at(i).submit(ran.append, i)
    release.set()
    pool.shutdown(wait=True, cancel_futures=False)
    assert ran == [0, 1, 2]


def _wait_cancel(future, timeout_s: float = 5.0) -> bool:
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    return done.wait(timeout_s) and future.cancelled()
