"""Tests of dataloading.procpool, the process pool of pack, synth and bench-flow."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from dataloading import procpool


# Task functions live at module level: workers import them by name.
def slow_square(task: tuple[int, float]) -> tuple[int, int]:
    value, sleep_s = task
    time.sleep(sleep_s)
    return value, value * value


def cv2_threads(_task) -> int:
    import cv2

    return cv2.getNumThreads()


def die_on_minus_one(value: int) -> int:
    if value == -1:
        os.kill(os.getpid(), signal.SIGKILL)  # like a decoder segfault or the OOM killer
    if value == -2:
        raise RuntimeError("task failed")
    return value * 10


def test_results_come_in_task_order_whatever_the_completion_order():
    # the first tasks sleep longest, so later ones finish first
    tasks = [(i, 0.05 * (6 - i)) for i in range(6)]
    assert list(procpool.ordered_results(slow_square, tasks, workers=3)) == [(i, i * i) for i in range(6)]
    assert list(procpool.ordered_results(slow_square, [], workers=3)) == []


def test_workers_run_opencv_single_threaded():
    assert list(procpool.ordered_results(cv2_threads, [0, 1], workers=2)) == [1, 1]
    with procpool.new_pool(1) as pool:
        assert pool.submit(cv2_threads, None).result() == 1


def test_a_dying_worker_costs_only_its_task_with_on_crash():
    tasks = [1, 2, -1, 3, 4, -1, 5]
    results = list(procpool.ordered_results(die_on_minus_one, tasks, workers=2,
                                            on_crash=lambda task: f"crashed {task}"))
    assert results == [10, 20, "crashed -1", 30, 40, "crashed -1", 50]


def test_a_dying_worker_breaks_the_run_without_on_crash():
    with pytest.raises(BrokenProcessPool):
        list(procpool.ordered_results(die_on_minus_one, [1, -1, 2], workers=2))


def test_a_task_error_propagates_and_closing_stops_the_pool():
    results = procpool.ordered_results(die_on_minus_one, [1, -2, 3], workers=2)
    with contextlib.closing(results):
        assert next(results) == 10
        with pytest.raises(RuntimeError, match="task failed"):
            next(results)
    early = procpool.ordered_results(slow_square, [(i, 0.0) for i in range(10)], workers=2)
    assert next(early) == (0, 0)
    early.close()  # shuts the pool down; nothing left running
