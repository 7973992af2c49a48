"""The training loop's hooks on a Ray Train worker (`app.hooks` has the contract).

* Checkpoints: Ray keeps them (``ray.train.report`` uploads each to
  ``run.storage_path/run.name/checkpoint_*``; ``ray.train.get_checkpoint`` restores the latest
  after a failure). Rank 0 records each one in the run store's index (``checkpoints.json``, the
  schema of local runs) under the run store's retention rule: a checkpoint no longer kept has
  its file deleted, while its directory stays, since Ray's run snapshot checks on a restart
  that every directory it was given still exists (the job keeps all of them:
  ``CheckpointConfig(num_to_keep=None)``). The best checkpoint is the index's.
* Prometheus: `cluster.metrics.WorkerMetrics` on ``metrics.port + local_rank``, with the group's
  world size; rank 0 records the worker group at its first step (`cluster.elastic.GroupTracker`:
  restart, resize, time and steps lost) and exports the run's restart totals.
* Console: rank 0's progress lines (`say`), which Ray forwards to the driver and `ray job logs`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from app import distributed
from app.config import Config
from app.hooks import TrainHooks, format_epoch_line
from app.run_store import RunStore, checkpoint_entry, disk_full_error, mirror_location, write_checkpoint
from cluster.elastic import GroupTracker, totals
from dataloading.storage import is_uri
from tsn.checkpoint import load_checkpoint

log = logging.getLogger(__name__)
progress_log = logging.getLogger("tsn.progress")

CHECKPOINT_FILE = "checkpoint.pt"  # the file inside each of Ray's checkpoint directories


def say(message: str) -> None:
    """A console line from a worker. Through logging, not print: Ray Train forwards worker
    log records to the driver and `ray job logs` once, but a print twice."""
    progress_log.info("[tsn] %s", message)


def format_progress(m: dict, elapsed_s: float) -> str:
    """One console line: epoch, step, loss, videos/s, ETA (from the steps left in the run)."""
    step, total = int(m.get("step", 0)), int(m.get("total_steps", 0) or 0)
    vps = m["videos"] / m["step_s"] if m.get("step_s") else 0.0
    eta = ""
    if total and step:
        left_s = elapsed_s / max(step - int(m.get("start_step", 0)), 1) * (total - step)
        eta = f" ETA {int(left_s // 60)}:{int(left_s % 60):02d}"
    of = f"/{total}" if total else ""
    return (f"epoch {m.get('epoch')} step {step}{of} loss {m['loss']:.4f} lr {m.get('lr', 0):.3g} "
            f"{vps:.1f} videos/s data-wait {m.get('data_wait_s', 0):.3f}s{eta}")


def _storage_full(error: Exception, cfg: Config, since: float) -> Exception:
    """Ray's upload of a checkpoint failing on a full disk (pyarrow's OSError names no path)
    as the one line the CLI prints, naming the run's storage and the fix; else ``error``. The
    torn copy Ray left (a directory of the run's local storage made since ``since``, never
    registered: its report failed) is removed, so the space it took is free again."""
    from cluster.job import checkpoint_location

    full = disk_full_error(error)
    if full is None:
        return error
    location = checkpoint_location(cfg)
    if not is_uri(location):
        for d in Path(location).glob("checkpoint_*"):
            if d.stat().st_mtime >= since:
                shutil.rmtree(d, ignore_errors=True)
    return OSError(full.errno, f"{location}: {os.strerror(full.errno).lower()} while Ray stored a "
                               f"checkpoint (nothing was replaced); free space there or move run.storage_path, then "
                               f"re-run the command: the run resumes from its last complete checkpoint")


def _load(checkpoint) -> dict:
    """The `tsn.checkpoint` dict inside one of Ray's checkpoints."""
    with checkpoint.as_directory() as d:
        return load_checkpoint(Path(d) / CHECKPOINT_FILE)


class RayHooks(TrainHooks):
    """`app.worker` hooks on a Ray Train worker (module docstring)."""

    def __init__(self, cfg: Config, run_dir: Path, *, progress_every_s: float = 5.0, driver: str = "",
                 resume_from: str | None = None):
        """``driver``: the id of the `tsn train` invocation (`cluster.elastic`: tells a restart
        of the group from a re-run of the command). ``resume_from``: the driver's newest complete
        checkpoint on disk (`cluster.recovery`), used when newer than Ray's."""
        self.resume_from = resume_from
        import ray
        import ray.train

        from cluster.metrics import WorkerMetrics, node_address, worker_port

        ctx = ray.train.get_context()
        self.rank, self.local_rank = ctx.get_world_rank(), ctx.get_local_rank()
        self.world_size = ctx.get_world_size()
        node_id = ray.get_runtime_context().get_node_id()
        self.cfg, self.store = cfg, RunStore(run_dir, mirror=mirror_location(cfg.run.storage_path, cfg.run.name))
        self.node = node_address()
        self.metrics = WorkerMetrics(cfg.run.name, self.rank, self.node,
                                     port=worker_port(cfg.metrics.port, self.local_rank),
                                     bind=cfg.metrics.bind_address)
        if self.metrics.port:
            say(f"rank {self.rank} metrics: {self.metrics.url}")  # the port served (a taken one moves)
        self.progress_every_s = progress_every_s
        self._last_print = 0.0
        self._t0 = time.time()
        self.metrics.observe_group(self.world_size, cfg.cluster.max_workers)
        # Lets operators (and the fault-tolerance and multi-node tests) find a rank's process and node.
        self.store.write_worker_info(self.rank, {"pid": os.getpid(), "node": self.node, "rank": self.rank,
                                                 "metrics_port": self.metrics.port,
                                                 "metrics_url": self.metrics.url, "node_id": node_id,
                                                 "world_size": self.world_size, "driver": driver,
                                                 "start_time": round(time.time(), 3)})
        self.group = None
        if self.rank == 0:
            self.store.restore()  # before the group records are read: a new pod has none (app.run_store)
            self.group = GroupTracker(self.store, driver=driver, world_size=self.world_size,
                                      max_workers=cfg.cluster.max_workers)
            self.metrics.observe_group_totals(self.group.totals_before())

    # --- checkpoints -------------------------------------------------------------------
    def load_latest(self) -> dict | None:
        import ray.train

        from cluster.recovery import newer_resume_point

        # Ray's latest registered checkpoint, or the driver's newest complete one when newer (a
        # killed driver's last checkpoint is on disk but was never registered: cluster.recovery).
        path, state = newer_resume_point(ray.train.get_checkpoint(), self.resume_from, _load)
        if state is None:
            return None
        if self.rank == 0:
            say(f"resuming from {path} (epoch {state.get('epoch')}, step {state.get('step')})")
            self.group.resumed_step = int(state.get("step") or 0)
        return state

    def save_checkpoint(self, state_fn, metrics: dict) -> None:
        """Collective: every rank reports; rank 0 uploads the state and records it in the index."""
        import ray.train

        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        if self.rank != 0:
            ray.train.report(report)
            return
        t0 = time.time()
        state = state_fn()
        before = ray.train.get_checkpoint()
        with tempfile.TemporaryDirectory(prefix="tsn-ckpt-") as tmp:
            size = write_checkpoint(Path(tmp) / CHECKPOINT_FILE, state).stat().st_size
            try:
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            except Exception as e:
                raise _storage_full(e, self.cfg, since=t0) from e
        persisted = ray.train.get_checkpoint()  # after a synchronous upload: the stored copy
        if persisted is None or (before is not None and persisted.path == before.path):
            say(f"checkpoint at step {metrics.get('step')} not stored (the worker group is failing)")
            return
        # Retention may delete older checkpoints only once Ray has committed this one: a rank's
        # report returns before the controller registers the checkpoint (that needs every
        # rank's report), and a rank dying in between makes Ray restore the PREVIOUS one. This
        # call blocks until the controller has processed the report (if the group fails
        # instead, this worker is stopped here and nothing is deleted).
        committed = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if persisted.path not in {c.checkpoint.path for c in committed}:
            say(f"checkpoint at step {metrics.get('step')} not committed by Ray: keeping every older one")
            return
        self.store.record_checkpoint(checkpoint_entry(Path(persisted.path).name, persisted.path, state, metrics),
                                     keep_last=self.cfg.checkpoint.keep_last, keep_best=self.cfg.checkpoint.keep_best,
                                     release=lambda e: _release(persisted.filesystem, e))
        self.metrics.observe_checkpoint(size, time.time() - t0)
        say(f"checkpoint at epoch {metrics.get('epoch')} step {metrics.get('step')} ({size / 1e6:.1f} MB, "
            f"{time.time() - t0:.1f}s)")

    def best_checkpoint(self) -> dict | None:
        """The index's best checkpoint (rank 0 reads the index; every rank loads it)."""
        import ray.train

        best = None
        if self.rank == 0:
            entry, latest = self.store.best_checkpoint_entry(), ray.train.get_checkpoint()
            if entry is not None and latest is not None:  # the same storage as the latest
                best = ray.train.Checkpoint(entry["path"], filesystem=latest.filesystem)
        best = distributed.broadcast_from_rank0(best)
        return _load(best) if best is not None else None

    # --- metrics and progress ----------------------------------------------------------
    def on_step(self, m: dict) -> None:
        self.metrics.observe_step(m)
        if self.group is not None and self.group.record is None:
            self._record_group(int(m.get("step", 0)))
        now = time.time()
        if self.rank == 0 and now - self._last_print >= self.progress_every_s:
            self._last_print = now
            say(format_progress(m, now - self._t0))

    def on_eval(self, m: dict) -> None:
        self.metrics.observe_eval(m)

    def on_epoch_end(self, m: dict) -> None:
        if self.rank == 0:
            say(format_epoch_line(m))

    def _record_group(self, step: int) -> None:
        """Rank 0 at the group's first step: the worker-group record, the counters, a line."""
        infos = {w.get("rank"): w for w in self.store.read_worker_infos()}
        # Every rank wrote its info before this step's collectives; higher ranks are a larger old group's.
        self.group.node_ids = [infos.get(r, {}).get("node_id") for r in range(self.world_size)]
        record = self.group.first_step(step)
        self.metrics.observe_group_totals(totals(self.group.before + [record]))
        if record["restart"]:
            lost = (f": {record['restart_s']:.1f}s from the last step before, {record['steps_redone']} step(s) redone"
                    if record["restart_s"] is not None else "")
            say(f"worker group restarted with {self.world_size} of {self.cfg.cluster.max_workers} workers "
                f"at step {step}{lost}")

    def close(self) -> None:
        self.metrics.close()


def _release(filesystem, entry: dict) -> None:
    """Free a checkpoint the retention rule no longer keeps: delete its file (Ray's directory
    stays, see the module docstring). Best effort: a file already gone is fine."""
    try:
        filesystem.delete_file(f"{entry['path']}/{CHECKPOINT_FILE}")
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not delete %s/%s: %s", entry["path"], CHECKPOINT_FILE, e)
