"""Checkpoints off the training loop's critical path: one background thread per rank that
writes (and, in the Ray job, commits) one checkpoint at a time.

The training loop stalls only for `tsn.checkpoint.host_copy` (the state copied to host
memory, so training may change the live tensors at once) and for the back-pressure below;
serialising, writing, uploading and recording the checkpoint in the index happen in the
job given to `CheckpointWriter.submit`.

Why a thread of our own (and, in the Ray job, Ray Train's ``checkpoint_upload_mode=ASYNC``
with a custom upload function, `cluster.ray_hooks`) rather than
``torch.distributed.checkpoint.async_save``: a TSN checkpoint is one rank's state (DDP
replicates the model; every rank's RNG is gathered into it), so there is nothing to shard, and
the file stays the one ``torch.load(weights_only=True)`` reads that `tsn eval`, `tsn export`
and resumes already use. A writer process would need the whole state pickled across to it
first, which is the cost being moved off the loop.

Contract:
* at most one job in flight: `submit` first waits for the previous job (a slow store applies
  back-pressure to the training loop instead of piling up host copies in memory) and re-raises
  its error, so a checkpoint that failed fails the run at the next checkpoint or at `wait`;
* a checkpoint counts (index, resume) only once its job has completed: a job writes the file,
  then records it, and a process killed in between leaves the previous checkpoint as the
  latest complete one;
* `wait` blocks until the job in flight is done (the final test's best checkpoint, the end of
  the run); `close` waits too unless told not to (a failing run), and the thread is not a
  daemon, so a run interrupted by Ctrl-C still finishes the checkpoint it was writing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class CheckpointWriter:
    """One background thread running checkpoint jobs one at a time (module docstring)."""

    def __init__(self, name: str = "tsn-ckpt"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future | None = None

    def wait(self) -> float:
        """Block until the job in flight (if any) is done; re-raise its error. Returns the
        seconds waited."""
        pending, self._pending = self._pending, None
        if pending is None:
            return 0.0
        t0 = time.perf_counter()
        pending.result()
        return time.perf_counter() - t0

    def submit(self, job: Callable[[], object]) -> float:
        """Run ``job()`` in the background once the previous job is done (back-pressure);
        returns the seconds this call waited for that."""
        waited = self.wait()
        self._pending = self._pool.submit(job)
        return waited

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def close(self, wait: bool = True) -> None:
        """Finish (``wait``) or abandon the job in flight and stop the thread. An error of the
        finished job is re-raised only when waiting."""
        try:
            if wait:
                self.wait()
        finally:
            self._pool.shutdown(wait=wait)
