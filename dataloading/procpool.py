"""The one process pool of this project: packing, synthetic-video generation, bench-flow.

* `new_pool`: a ``ProcessPoolExecutor`` whose workers start from a forkserver (`mp_context`)
  and run OpenCV with 1 thread each (parallelism comes from the processes; OpenCV's own
  thread pool would oversubscribe the cores).
* `ordered_results`: ``fn(task)`` for every task, yielded in task order, with a bounded
  number of tasks in flight; a worker that dies (segfault, OOM kill) either fails the run or,
  with ``on_crash``, costs only the task that killed it (`run_isolated`).

Task functions and their tasks must be picklable (module-level functions), and a calling
script needs the usual ``if __name__ == "__main__":`` guard, as with ``spawn``.

No orphans (Linux): the forkserver dies with the process that started it and every worker with
the forkserver (``PR_SET_PDEATHSIG``, `die_with_parent`), so SIGKILL / SIGTERM of the caller
(e.g. ``tsn pack``) leaves no process behind; the resource tracker then sees its pipe close
and exits too. Without this the workers, which hold the forkserver's "alive" pipe and both
ends of their task queue, wait forever and keep the caller's stdout open. The kernel sends the
signal when the *thread* that started a process exits: start pools from a thread that lives as
long as they do (the main thread, as every caller here does).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext

# Imported once by the forkserver for every pool: the heavy libraries the tasks here use
# (decoding, encoding, flow, rendering), so no worker pays their import.
BASE_PRELOAD = ("numpy", "cv2", "av")

# The module the forkserver imports first: it ties the server's life to its parent's.
GUARD_MODULE = "dataloading.procpool_guard"
# The pid of the process that starts the forkserver / of the forkserver (set in the server):
# the parent each process must still have once its death signal is armed.
PARENT_PID_ENV = "TSN_PROCPOOL_PARENT_PID"
SERVER_PID_ENV = "TSN_PROCPOOL_SERVER_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(expected_parent_pid: int | None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; a no-op elsewhere).

    ``expected_parent_pid``: the parent this process was started by; if it is already gone
    (this process was re-parented before the signal was armed), exit now."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return  # not fatal: only the clean-up after a killed parent is lost
    if expected_parent_pid is not None and os.getppid() != expected_parent_pid:
        os._exit(1)


def _env_pid(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def _worker_init() -> None:
    import cv2

    # A worker's parent is the forkserver (or, without one, the caller): die with it.
    die_with_parent(_env_pid(SERVER_PID_ENV) or _env_pid(PARENT_PID_ENV))
    # Parallelism comes from the worker processes; cv2's own thread pool would oversubscribe.
    cv2.setNumThreads(1)


def mp_context(preload: Sequence[str] = ()) -> BaseContext:
    """The start method of every pool: ``forkserver``, not ``fork``.

    A caller that already ran OpenCV (its thread pool: flow, resize), PyAV or torch threads
    would hand a forked worker locks held by threads that do not exist there, and the worker
    deadlocks in its first cv2 call (seen: pack after flow in one process). The server is a
    clean process that imports `BASE_PRELOAD` and the ``preload`` modules (e.g. the module of
    the task function) once; workers fork from it in milliseconds. The server is started once
    per process, so only the first pool's ``preload`` takes effect (later pools' workers import
    their own modules, cheap with the heavy libraries already loaded). Falls back to the
    platform default where forkserver does not exist.
    """
    # Read by the forkserver (`GUARD_MODULE`) and by workers: whom they must outlive not.
    os.environ[PARENT_PID_ENV] = str(os.getpid())
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([GUARD_MODULE, *BASE_PRELOAD, *preload])
    return ctx


def new_pool(workers: int, preload: Sequence[str] = ()) -> concurrent.futures.ProcessPoolExecutor:
    """``workers`` processes from `mp_context`, OpenCV at 1 thread in each."""
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=mp_context(preload), initializer=_worker_init)


def run_isolated(fn: Callable, task, on_crash: Callable, preload: Sequence[str] = ()):
    """``fn(task)`` in a process of its own, to find out whether this task is the one killing
    workers: ``on_crash(task)`` if that process dies too."""
    with new_pool(1, preload) as pool:
        try:
            return pool.submit(fn, task).result()
        except BrokenProcessPool:
            return on_crash(task)


def ordered_results(fn: Callable, tasks: Sequence, workers: int, *, preload: Sequence[str] = (),
                    on_crash: Callable | None = None) -> Iterator:
    """``fn(task)`` for every task, in task order, computed by ``workers`` processes.

    A process pool is used rather than ``multiprocessing.Pool.imap`` because Pool waits
    forever when a worker dies (e.g. a decoder segfault); here a dead worker breaks the pool.
    Without ``on_crash`` that raises ``BrokenProcessPool``. With it, the in-flight tasks that
    had not finished are re-run one per process (`run_isolated`), so only the culprit gets
    ``on_crash(task)`` as its result, and the run continues with a fresh pool. An exception
    raised by ``fn`` propagates when its result is reached (the pool is then shut down).

    At most ``2 * workers`` tasks are in flight, which bounds the memory of pending results.
    Even ``workers=1`` runs ``fn`` in a child process, so a crashing task never takes the
    caller down. Close the generator (``results.close()``, or leave a ``with
    contextlib.closing(...)``) to stop the pool early, e.g. on an error or Ctrl-C.
    """
    if not tasks:
        return
    workers = min(workers, len(tasks))
    window = 2 * workers
    todo = deque(tasks)
    pending: deque = deque()  # (task, future), in task order
    pool = new_pool(workers, preload)
    try:
        while todo or pending:
            broken = False
            while todo and len(pending) < window and not broken:
                try:
                    pending.append((todo[0], pool.submit(fn, todo[0])))
                    todo.popleft()
                except BrokenProcessPool:  # a worker died since the last result was collected
                    broken = True
            if not broken:
                try:
                    result = pending[0][1].result()
                except BrokenProcessPool:
                    broken = True
            if broken:
                if on_crash is None:
                    raise BrokenProcessPool("a worker process died (crashed, or was killed for using too much memory)")
                # Only submitted tasks can have killed a worker: keep those that finished,
                # re-run the others one per process so that only the culprit is rejected.
                in_flight = list(pending)
                pending.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                for task, future in in_flight:
                    finished = future.done() and not future.cancelled() and future.exception() is None
                    yield future.result() if finished else run_isolated(fn, task, on_crash, preload)
                pool = new_pool(workers, preload)
                continue
            pending.popleft()
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
