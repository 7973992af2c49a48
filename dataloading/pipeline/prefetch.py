"""A bounded background producer: runs a step function in a daemon thread, ahead of its consumer.

`TSNLoader` uses it to pull DALI's outputs and run the torch finishing step (`finish`) for batch
i + 1 while the training thread trains on batch i, and to build the next epoch's pipeline while
the current epoch ends (validation, checkpointing).

Contract of ``Prefetcher(step, depth)``:

* the thread calls ``step()`` repeatedly and queues what it returns, in order, at most
  ``depth`` items ahead of the consumer (a full queue blocks the thread: memory stays bounded);
* ``step()`` returning `DONE` ends the thread after the items already queued (they are still
  delivered); so does a raised exception, which `get` then re-raises in the consumer *after*
  the items queued before it, as the same exception object: its traceback keeps the
  producer's frames;
* ``step`` is held through a weak reference between calls (a bound method's owner is not kept
  alive by the thread): when its owner is collected the thread ends by itself;
* `close` stops the thread (it finishes the ``step()`` call it is in, which is not interrupted),
  drops the queued items and joins it; idempotent.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable

DONE = object()  # returned by step(): no more items; the thread ends

_POLL_S = 0.1  # how often a blocked thread checks whether it was closed or its owner collected


class _Raised:
    """An exception raised by ``step()``, carried through the queue."""

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Items of ``step()`` produced in a daemon thread named ``name``, ``depth`` (>= 1) ahead."""

    def __init__(self, step: Callable[[], object], depth: int, name: str = "prefetch"):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False  # the consumer has taken the last item (DONE or an error)
        ref = weakref.WeakMethod(step) if hasattr(step, "__self__") else (lambda: step)
        self._thread = threading.Thread(target=_run, args=(ref, self._queue, self._stop), name=name, daemon=True)
        self._thread.start()

    def get(self) -> object:
        """The next item (blocks until there is one); `DONE` once the producer has finished,
        then again on every later call; the producer's exception, re-raised."""
        if self._finished:
            return DONE
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._finished = True  # owner collected or closed: nothing will come
                    return DONE
        if item is DONE or isinstance(item, _Raised):
            self._finished = True
        if isinstance(item, _Raised):
            raise item.error
        return item

    @property
    def finished(self) -> bool:
        """True when every item has been taken (the last was `DONE` or an exception)."""
        return self._finished

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the thread, drop the queued items, wait up to ``timeout_s`` for the thread to end."""
        self._stop.set()
        self._finished = True
        if threading.current_thread() is self._thread:
            return  # the owner collected on the thread itself: it ends after this step
        while self._thread.is_alive():
            _drain(self._queue)  # unblocks a put
            self._thread.join(min(_POLL_S, timeout_s))
            timeout_s -= _POLL_S
            if timeout_s <= 0:
                break
        _drain(self._queue)


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


def _run(step_ref, q: queue.Queue, stop: threading.Event) -> None:
    """The thread: step, queue, until DONE, an exception, close, or the owner's collection."""
    while not stop.is_set():
        step = step_ref()
        if step is None:
            return
        try:
            item = step()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            item = _Raised(e)
        del step  # hold no strong reference to the owner while blocked below
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                break
            except queue.Full:
                if step_ref() is None:
                    return
        if item is DONE or isinstance(item, _Raised):
            return
