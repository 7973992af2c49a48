"""The training loop's hooks on a Ray Train worker (`app.hooks` has the contract).

* Checkpoints: Ray keeps them (``ray.train.report`` stores each in
  ``run.storage_path/run.name/checkpoint_*``; ``ray.train.get_checkpoint`` restores the latest
  after a failure), off the training loop's critical path: every rank reports with
  ``checkpoint_upload_mode=ASYNC`` (the report returns once the ranks agreed on the directory
  name), and rank 0 hands Ray an upload function that writes a host copy of the state
  (``torch.save``) and stores it, in Ray's upload thread. Rank 0's `app.checkpoint_writer.CheckpointWriter` job
  then waits until Ray has committed the checkpoint (every rank's report processed by the
  controller) and only then records it in the run store's index (``checkpoints.json``, the
  schema of local runs) under the run store's retention rule; the next checkpoint waits for
  that job (one in flight). A checkpoint no longer kept is deleted with its directory on local
  storage (the driver drops Ray's run snapshot, which would check on a re-run that every
  directory it was given exists: `cluster.recovery`), its file only in object storage (Ray
  resumes from its snapshot there). The job keeps every directory from Ray's own retention
  (``CheckpointConfig(num_to_keep=None)``: it cannot say "the last K plus the best"). The best
  checkpoint is the index's.
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
import threading
import time
from pathlib import Path

from app import distributed
from app.checkpoint_writer import CheckpointWriter
from app.config import Config
from app.hooks import TrainHooks, format_epoch_line
from app.run_store import RunStore, checkpoint_entry, checkpoint_location, disk_full_error, mirror_location, write_checkpoint
from app.preemption import STOP
from cluster import preemption
from cluster.elastic import STOP_EVENT, GroupTracker, totals
from dataloading.store.storage import is_uri
from tsn.checkpoint import host_copy, load_checkpoint

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
    full = disk_full_error(error)
    if full is None:
        return error
    location = checkpoint_location(cfg.run.storage_path, cfg.run.name)
    if not is_uri(location):
        for d in Path(location).glob("checkpoint_*"):
            if d.stat().st_mtime >= since:
                shutil.rmtree(d, ignore_errors=True)
    return OSError(full.errno, f"{location}: {os.strerror(full.errno).lower()} while Ray stored a "
                               f"checkpoint (nothing was replaced); free space there or move run.storage_path, then "
                               f"re-run the command: the run resumes from its last complete checkpoint")


def _load(checkpoint) -> dict:
    """The `tsn.checkpoint` dict inside one of Ray's checkpoints.

    Remote (object storage): downloaded into a directory of this process's own, not through
    ``Checkpoint.as_directory``. That one shares a temporary directory among the processes of a
    node, and one rank's clean-up could delete or overwrite the file while another rank still
    read it (seen: rank 1 read a torn copy of the checkpoint rank 0 resumed from, fell back to
    an older one, and the ranks' collectives no longer matched)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return load_checkpoint(Path(checkpoint.path) / CHECKPOINT_FILE)
    local = tempfile.mkdtemp(prefix="tsn-resume-")
    try:
        checkpoint.to_directory(local)  # a path of ours: Ray shares it with no other process
        return load_checkpoint(Path(local) / CHECKPOINT_FILE)
    finally:
        shutil.rmtree(local, ignore_errors=True)


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
        self.writer = CheckpointWriter()
        self.node_id = node_id
        preemption.install_sigterm_handler()  # on this process's main thread (cluster.preemption)
        self._told_ray = False
        self.stored: list[dict] = []  # rank 0: {step, size_bytes, store_s} of each committed checkpoint
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
        # Every rank chose on its own: a rank that could not read the checkpoint the others
        # resume from would train from another step and hang or corrupt the collectives.
        chosen = distributed.all_gather((str(path), int(state.get("step") or 0) if state else None))
        if len(set(chosen)) > 1:
            raise RuntimeError(f"the ranks would resume from different checkpoints ({chosen}): one could not read "
                               f"the checkpoint the others read; the group restarts")
        if state is None:
            return None
        if self.rank == 0:
            say(f"resuming from {path} (epoch {state.get('epoch')}, step {state.get('step')})")
            self.group.resumed_step = int(state.get("step") or 0)
        return state

    def save_checkpoint(self, state_fn, metrics: dict) -> None:
        """Collective: every rank reports (asynchronously); rank 0 hands Ray the state to store
        and records it once committed (module docstring)."""
        import ray.train

        t0 = time.perf_counter()
        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        if self.rank != 0:
            ray.train.report(report, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            self.metrics.observe_checkpoint_stall(time.perf_counter() - t0)
            return
        state = host_copy(state_fn())
        self.writer.wait()  # back-pressure: the previous checkpoint stored and committed
        # The host copy goes to the upload function, which drops it once written.
        upload = {"written": threading.Event(), "state": state}
        entry_state = {k: state[k] for k in ("epoch", "step", "loader_position")}
        del state
        since = time.time()

        def store_checkpoint(checkpoint, dir_name: str):
            """Ray's upload thread: write the state into Ray's local temporary directory, then
            let Ray store that directory as ``dir_name`` (local path or object storage)."""
            try:
                t = time.perf_counter()
                path = write_checkpoint(Path(checkpoint.path) / CHECKPOINT_FILE, upload.pop("state"))
                upload["size"] = path.stat().st_size
                persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
                upload["seconds"] = time.perf_counter() - t
                upload["checkpoint"] = persisted
                return persisted
            except Exception as e:
                raise _storage_full(e, self.cfg, since=since) from e
            finally:
                upload["written"].set()

        local = tempfile.mkdtemp(prefix="tsn-ckpt-")  # Ray deletes it after the upload
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(local),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         checkpoint_upload_fn=store_checkpoint)
        background = self.cfg.checkpoint.background
        stall = time.perf_counter() - t0
        self.writer.submit(lambda: self._commit(upload, entry_state, metrics, stall if background else None))
        if not background:
            self.writer.wait()  # stored and committed before training goes on
        self.metrics.observe_checkpoint_stall(time.perf_counter() - t0)

    def _commit(self, upload: dict, state: dict, metrics: dict, stall_s: float | None) -> None:
        """The writer's job for one checkpoint: once Ray stored it, wait until Ray committed it,
        then record it in the index and apply the retention rule."""
        import ray.train

        upload["written"].wait()
        persisted = upload.get("checkpoint")
        if persisted is None:  # the upload failed: Ray fails the worker with its error
            return
        # Retention may delete older checkpoints only once Ray has committed this one: the
        # controller registers it after every rank's report (it polls the workers), and a rank
        # dying in between makes Ray restore the PREVIOUS one. This call blocks until the
        # controller has processed this rank's latest report (if the group fails instead, the
        # worker is stopped here and nothing is deleted).
        committed = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if persisted.path not in {c.checkpoint.path for c in committed}:
            say(f"checkpoint at step {metrics.get('step')} not committed by Ray: keeping every older one")
            return
        self.store.record_checkpoint(checkpoint_entry(Path(persisted.path).name, persisted.path, state, metrics),
                                     keep_last=self.cfg.checkpoint.keep_last, keep_best=self.cfg.checkpoint.keep_best,
                                     release=lambda e: _release(persisted.filesystem, e))
        self.metrics.observe_checkpoint(upload["size"], upload["seconds"])
        self.stored.append({"step": state["step"], "size_bytes": upload["size"], "store_s": upload["seconds"]})
        how = (f"stored in {upload['seconds']:.2f}s in the background; training waited {stall_s:.3f}s"
               if stall_s is not None else f"stored in {upload['seconds']:.2f}s; training waited for it")
        say(f"checkpoint at epoch {metrics.get('epoch')} step {metrics.get('step')} ({upload['size'] / 1e6:.1f} MB, "
            f"{how})")

    def best_checkpoint(self) -> dict | None:
        """The index's best checkpoint (rank 0 reads the index; every rank loads it)."""
        import ray.train

        best = None
        if self.rank == 0:
            self.writer.wait()  # every checkpoint saved before is committed and indexed
            entry, latest = self.store.best_checkpoint_entry(), ray.train.get_checkpoint()
            if entry is not None and latest is not None:  # the same storage as the latest
                best = ray.train.Checkpoint(entry["path"], filesystem=latest.filesystem)
        best = distributed.broadcast_from_rank0(best)
        return _load(best) if best is not None else None

    # --- stopping on request (cluster.preemption) ----------------------------------------
    def stop_requested(self) -> str | None:
        if STOP.reason is None:
            reason = preemption.notice()
            if reason is not None:
                STOP.request(reason)
        elif not self._told_ray and STOP.reason == "SIGTERM":
            self._told_ray = True
            preemption.tell_ray(self.rank, self.cfg.cluster.preemption_grace_s)
        return STOP.reason

    def flush(self) -> None:
        self.writer.wait()  # rank 0: the stop's checkpoint stored and committed by Ray

    def on_stop(self, m: dict) -> None:
        if self.rank == 0:
            self.store.append_event({"event": STOP_EVENT, "world_size": self.world_size, **m})
            say(f"stopping: {m['reason']}; checkpoint at epoch {m['epoch']} step {m['step']} stored "
                f"{m['stop_s']:.1f}s after the request, the group restarts from it")

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

    def close(self, wait: bool = True) -> None:
        try:
            self.writer.close(wait=wait)
        finally:
            self.metrics.close()


def _release(filesystem, entry: dict) -> None:
    """Free a checkpoint the retention rule no longer keeps: delete its directory on local
    storage, its file in object storage (see the module docstring). Best effort: a checkpoint
    already gone is fine."""
    import pyarrow.fs

    local = isinstance(filesystem, pyarrow.fs.LocalFileSystem)
    try:
        if local:
            filesystem.delete_dir(entry["path"])
        else:
            filesystem.delete_file(f"{entry['path']}/{CHECKPOINT_FILE}")
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not delete %s%s: %s", entry["path"], "" if local else f"/{CHECKPOINT_FILE}", e)
