"""The Ray job's side of stopping on request (`app.preemption` has the training loop's side).

* **SIGTERM to a worker** (Kubernetes ending a pod, ``ray stop``, a spot reclaim's shutdown).
  Ray's worker process turns SIGTERM into an exit on its main thread, while training runs in
  another thread (Ray Train's) beside non-daemon ones (the checkpoint writer, the loader): the
  process neither trained on nor died, and the job hung until Ray's 600 s health check gave up
  on it. `install_sigterm_handler` puts `app.preemption`'s handler in its place. A handler can
  only be set on the main thread, so it runs there through the worker actor's ``execute``
  method (the one Ray Train uses to run set-up functions on its workers). A second SIGTERM still
  reaches Ray's handler.
* **A preemption notice**. Ray Train's preemption watcher polls Ray Core's drain state (a
  KubeRay / autoscaler drain, ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``, which the
  manifests' ``preStop`` hook runs) every ``RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S`` and marks every
  worker of the group. `notice` reads this worker's mark without a barrier, unlike
  ``ray.train.get_preemption_info()``; the ranks agree through `app.preemption.stop_agreed`,
  once per step.
* **Telling Ray Train.** A SIGTERM is not a preemption to Ray: `tell_ray` marks this worker the
  way Ray's watcher does (with a deadline of the request time + ``grace_s``). Ray's controller
  then waits instead of failing the group. Once the stop's checkpoint is committed, every rank
  calls `leave_group`, which marks the deadline as now. The controller restarts the group at
  once, on the nodes still there, from that checkpoint. It counts a preemption
  (``FailureConfig.max_preemption_failures``, unlimited), not one of ``cluster.max_failures``.
  The workers wait to be torn down. ``mark_preempt`` is Ray Train's own worker method (the
  watcher calls it); Ray is pinned (requirements.lock) and the multi-node tests exercise this
  path.
"""

from __future__ import annotations

import logging
import time

from app.preemption import STOP
from app.preemption import install_sigterm_handler as _install_here

log = logging.getLogger(__name__)


def install_sigterm_handler() -> bool:
    """From the training thread of a Ray Train worker: `app.preemption`'s SIGTERM handler
    installed on the worker process's main thread. False when it could not be (a warning
    says so: SIGTERM then ends the worker as before)."""
    import ray

    try:
        actor = ray.get_runtime_context().current_actor
        return bool(ray.get(actor.execute.remote(_install_here), timeout=30))
    except Exception as e:  # Ray's internals moved: training still works, only without this
        log.warning("could not install the SIGTERM handler on this worker (a SIGTERM ends it without a "
                    "checkpoint): %s", e)
        return False


def notice() -> str | None:
    """This worker's preemption notice from Ray Train's watcher, as a reason, or None."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        info = get_train_context().preemption_context.preemption_info
    except Exception:  # no Ray Train context (or its internals moved): no notice
        return None
    if info is None:
        return None
    left = f", deadline in {max(info.deadline_ms / 1000 - time.time(), 0):.0f}s" if info.deadline_ms else ""
    nodes = ", ".join(n[:8] for n in info.preempted_node_ids)
    return f"preemption notice for node {nodes}{left}"


def _mark(deadline_s: float, rank: int) -> None:
    import ray
    from ray.train import PreemptionInfo

    info = PreemptionInfo(deadline_ms=int(deadline_s * 1000),
                          preempted_node_to_ranks={ray.get_runtime_context().get_node_id(): [rank]})
    ray.get(ray.get_runtime_context().current_actor.mark_preempt.remote(info), timeout=30)


def tell_ray(rank: int, grace_s: float) -> None:
    """After a SIGTERM: mark this worker preempted with the deadline request time + ``grace_s``
    (module docstring)."""
    try:
        _mark((STOP.requested_at or time.time()) + grace_s, rank)
    except Exception as e:
        log.warning("could not tell Ray Train of the SIGTERM (the group restarts as after a failure): %s", e)


def leave_group(rank: int, wait_s: float) -> None:
    """Every rank, once the stop's checkpoint is committed: the deadline is now, so Ray Train's
    controller restarts the group from it (module docstring); waits up to ``wait_s`` to be torn
    down, then returns (the caller raises: a failure to Ray, which restarts all the same)."""
    try:
        _mark(time.time(), rank)
    except Exception as e:
        log.warning("could not tell Ray Train the stop's checkpoint is stored: %s", e)
        return
    deadline = time.time() + wait_s
    while time.time() < deadline:
        time.sleep(0.2)
