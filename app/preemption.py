"""Stopping a run cleanly when its machine is about to go away (a spot reclaim, a node drain).

The contract, local and Ray runs alike:

1. Something asks this process to stop: SIGTERM (what Kubernetes sends a pod on a drain or a
   spot reclaim, what ``ray stop`` sends a worker), or a cloud's preemption notice that the Ray
   job polls (`cluster.preemption`). Either only sets `STOP` (a signal handler must not do
   more), with the reason.
2. After every training step, every rank asks whether any rank was asked (`stop_agreed`: one
   tiny all-reduce, so the ranks agree on the same step though the signal reached one
   process). When one was, every rank checkpoints at that step, mid-epoch (the loader's exact
   position, as ``checkpoint.every_n_steps`` does), and the run ends with
   `tsn.engine.TrainingStopped` once the checkpoint is stored. A stop asked for during an
   epoch's last step is taken at that epoch's end checkpoint instead.
3. Re-running (locally) or Ray's restart of the group resumes from that checkpoint: no step is
   done twice.

A second SIGTERM while stopping is the previous handler's business (the process ends as it would
have without this module).
"""

from __future__ import annotations

import signal
import threading
import time

EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class StopRequest:
    """Why this process was asked to stop (first reason wins), or None. Setting it is a plain
    attribute write: safe in a signal handler."""

    def __init__(self):
        self.reason: str | None = None
        self.requested_at: float | None = None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.requested_at = time.time()
            self.reason = reason

    def clear(self) -> None:
        self.reason, self.requested_at = None, None


STOP = StopRequest()  # the process's one request: a signal reaches a process, not an object


def install_sigterm_handler() -> bool:
    """SIGTERM asks `STOP` instead of ending the process; a second SIGTERM goes to the handler
    that was there before. Only the main thread can set a handler: False (nothing changed)
    elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        if STOP.reason is None:
            STOP.request("SIGTERM")
            return
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signum, frame)
        else:
            signal.raise_signal(signal.SIGTERM)  # the default action: the process ends

    signal.signal(signal.SIGTERM, on_sigterm)
    return True


def stop_agreed(local_reason: str | None, device) -> list[int]:
    """Collective (every rank, every step): the ranks that were asked to stop, [] when none.
    One all-reduce of ``world_size`` integers (on ``device`` under NCCL, which reduces CUDA
    tensors only); no collective without a process group."""
    import torch

    from app import distributed

    world_size, rank = distributed.world_size(), distributed.rank()
    if world_size == 1:
        return [0] if local_reason is not None else []
    on = device if torch.distributed.get_backend() == "nccl" else "cpu"
    flags = torch.zeros(world_size, dtype=torch.int32, device=on)
    flags[rank] = int(local_reason is not None)
    torch.distributed.all_reduce(flags)
    return [r for r in range(world_size) if flags[r]]
