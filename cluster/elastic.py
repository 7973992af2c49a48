"""Elastic worker groups: the Ray Train scaling arguments of ``cluster.*`` and the record of
every worker group a job started (restarts, resizes, time lost), which the metrics export.

Scaling (`scaling_kwargs`): ``cluster.num_workers`` N gives Ray Train a fixed group;
``[min, max]`` an elastic one (``ScalingConfig(num_workers=(min, max),
elastic_resize_monitor_interval_s=...)``): Ray starts the group with as many workers as the
cluster's free resources hold (capped at max, waiting while fewer than min fit); when a worker
or its node dies the group fails, ``FailureConfig(max_failures)`` counts one failure and the
controller restarts the group on what is left, from the latest checkpoint; while the group is
healthy it checks every ``elastic_resize_monitor_interval_s`` seconds whether more workers would
fit now, and if so restarts it larger, again from the latest checkpoint (a resize is not a
failure). Every restart resumes through `app.worker`'s normal resume path.

The worker-group record (rank 0 of every group, at its first training step): one
``{"event": "worker_group", ...}`` line in the run store's event log (`RunStore.append_event`)::

    driver        the id of the `tsn train` invocation (`run_job`): groups of one driver after
                  its first are restarts; a re-run of the command starts a new driver
    start_time    unix s of the group's first step
    world_size, max_workers, node_ids (the Ray node of each rank, in rank order when known)
    restart       true for every group of a driver after its first
    resized       world size differs from the previous group's (of any driver)
    resumed_step  the checkpoint's global step the group resumed from (0: from scratch)
    restart_s     restarts only: first step of this group - last step logged by the previous
                  one (step logs `steps/rank*.jsonl`): failure detection (a lost node: ~35 s
                  until Ray declares it dead), group shutdown and start, checkpoint load,
                  loader warm-up. Measured from the workers' own step times, so it needs no
                  hook into Ray's controller
    steps_redone  restarts only: last step logged by the previous group - resumed_step (the
                  work since the last checkpoint, done again)
    stop          the reason when the previous group stopped on request after checkpointing
                  (SIGTERM, a preemption notice: `cluster.preemption`; its ``stopped`` event
                  in the same log), else null

`totals` sums the records for the counters of `cluster.metrics.WorkerMetrics` (monotonic across
restarts: a new group's counters start from the totals of the groups before it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from app.config import ClusterConfig
from app.run_store import RunStore, read_jsonl

GROUP_EVENT = "worker_group"
STOP_EVENT = "stopped"  # rank 0 of a group that stopped on request (cluster.ray_hooks.RayHooks.on_stop)
_TAIL_BYTES = 64 << 10  # a step log line is ~250 bytes: the last one is in the file's tail


def scaling_kwargs(c: ClusterConfig) -> dict:
    """``ray.train.ScalingConfig`` arguments for the cluster section (module docstring)."""
    kwargs = {"num_workers": c.num_workers, "use_gpu": c.use_gpu,
              "resources_per_worker": {"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}}
    if c.elastic:
        kwargs["elastic_resize_monitor_interval_s"] = c.elastic_resize_monitor_interval_s
    return kwargs


def group_records(store: RunStore) -> list[dict]:
    """The run's worker-group records, oldest first."""
    return [r for r in read_jsonl(store.events_path) if r.get("event") == GROUP_EVENT]


def totals(records: list[dict]) -> dict:
    """``{"restarts", "stops", "resizes", "restart_s", "steps_redone"}`` summed over ``records``."""
    return {"restarts": sum(1 for r in records if r.get("restart")),
            "stops": sum(1 for r in records if r.get("stop")),
            "resizes": sum(1 for r in records if r.get("resized")),
            "restart_s": float(sum(r.get("restart_s") or 0.0 for r in records)),
            "steps_redone": int(sum(r.get("steps_redone") or 0 for r in records))}


def last_logged_step(store: RunStore) -> dict | None:
    """The latest record (by wall time) among the last lines of the step logs: where the
    previous worker group stopped. None when no step was logged."""
    last = None
    for path in sorted(store.steps_dir.glob("rank*.jsonl")):
        record = _last_json_line(path)
        if record is not None and "time" in record and (last is None or record["time"] > last["time"]):
            last = record
    return last


def _last_json_line(path: Path) -> dict | None:
    with path.open("rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - _TAIL_BYTES))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):  # a line cut short by the kill is skipped
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


class GroupTracker:
    """Rank 0's record of the worker group it belongs to (module docstring). Create it before
    the group's first step (it reads where the previous group stopped); `first_step` writes
    the record once and returns it."""

    def __init__(self, store: RunStore, *, driver: str, world_size: int, max_workers: int,
                 node_ids: list[str] | None = None):
        self.store, self.driver = store, driver
        self.world_size, self.max_workers, self.node_ids = world_size, max_workers, node_ids or []
        events = read_jsonl(store.events_path)
        self.before = [r for r in events if r.get("event") == GROUP_EVENT]
        # The previous group's stop on request, if it stopped so (after its start).
        since = float(self.before[-1]["start_time"]) if self.before else 0.0
        self.previous_stop_request = next((r for r in reversed(events) if r.get("event") == STOP_EVENT
                                           and float(r.get("time", 0)) >= since), None)
        self.previous_stop = last_logged_step(store)  # read before this group logs a step
        self.resumed_step = 0
        self.record: dict | None = None

    def totals_before(self) -> dict:
        return totals(self.before)

    def first_step(self, step: int, when: float | None = None) -> dict | None:
        """The record of this group at its first step ``step`` (global step, 1-based); None
        after the first call."""
        if self.record is not None:
            return None
        when = time.time() if when is None else when
        prev = self.before[-1] if self.before else None
        restart = any(r.get("driver") == self.driver for r in self.before)
        record = {"event": GROUP_EVENT, "driver": self.driver, "start_time": round(when, 3),
                  "world_size": self.world_size, "max_workers": self.max_workers, "node_ids": self.node_ids,
                  "restart": restart, "resized": prev is not None and prev.get("world_size") != self.world_size,
                  "resumed_step": self.resumed_step, "first_step": step, "restart_s": None, "steps_redone": None,
                  "stop": self.previous_stop_request["reason"] if self.previous_stop_request else None}
        if restart and self.previous_stop is not None:
            record["restart_s"] = round(max(when - float(self.previous_stop["time"]), 0.0), 3)
            record["steps_redone"] = max(int(self.previous_stop.get("step", 0)) - self.resumed_step, 0)
        self.store.append_event(record)
        self.record = record
        return record
