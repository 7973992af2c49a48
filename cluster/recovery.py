"""What a re-run of `tsn train` does after the previous driver died (SIGKILL, OOM, a lost
machine), before any worker starts (`cluster.job.run_job` calls these in the driver).

* `find_resume_point`: the newest COMPLETE checkpoint in the run's checkpoint directory
  (``run.storage_path/run.name/checkpoint_*/checkpoint.pt``, newest first by Ray's time-stamped
  directory names, the first that `tsn.checkpoint.load_checkpoint` reads), whether or not Ray
  registered it: Ray registers a checkpoint only after every rank reported and its controller
  polled, so a driver killed in between leaves the newest one unregistered, and Ray alone would
  resume from an older one and redo finished epochs. The workers take the newer (by step) of it
  and Ray's own (`cluster.ray_hooks.RayHooks.load_latest`).
* the run store follows: history.jsonl is cut back to the epochs before the resume point (never
  an epoch twice), the resume checkpoint enters the index (``checkpoints.json``) under the
  retention rule, and checkpoint directories beyond it are removed. Ray's run snapshot
  (``checkpoint_manager_snapshot.json``, its list of registered checkpoints) is dropped: on a
  re-run Ray would check that every directory it lists still exists, and the retention rule
  deletes directories (`cluster.ray_hooks`); the resume point found here is at least as new as
  Ray's latest. When checkpoints exist but none can be read: one warning
  (`app.hooks.resume_fresh_warning`), the index and history reset, and the run starts over.
* `reap_previous_session`: a killed driver's local Ray cluster (started by ``ray.init`` in that
  driver) can leave processes behind (the dashboard, its agents); the driver records its Ray
  session directory in ``driver.json`` (`record_session`), and the next run on the same host
  terminates the processes whose command line names that session directory, once the recorded
  driver is gone. Nothing else is touched: another run's cluster has its own session directory.
* `remove_stale_sd_entries`: the killed workers' Prometheus file-SD entries of this run (on this
  node) are removed, so Prometheus stops scraping ports nobody serves.

Object-storage runs (``run.storage_path`` a URI) keep Ray's own resume point and snapshot;
only local checkpoint directories are scanned.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from app.hooks import resume_fresh_warning
from app.run_store import RunStore, checkpoint_entry
from tsn.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"  # the file inside each of Ray's checkpoint directories (cluster.ray_hooks)
CHECKPOINT_DIR_GLOB = "checkpoint_*"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's list of registered checkpoints


def driver_preflight(cfg, store: RunStore, location: str) -> dict | None:
    """The driver's steps between preparing the dataset and starting Ray (`cluster.job`): stop
    a killed predecessor's leftovers, drop stale discovery entries, find the resume point
    (`prepare_resume`; local checkpoint storage only), and on a fresh start read
    ``model.init_from`` once here (a bad file fails in one line, not in every worker after Ray
    started). Returns the resume point for the workers, or None."""
    from cluster.metrics import DEFAULT_SD_DIR
    from dataloading.store.storage import is_uri
    from tsn.checkpoint import read_init_from

    reap_previous_session(store)
    remove_stale_sd_entries(cfg.run.name, DEFAULT_SD_DIR)
    resume = None
    if not is_uri(location):
        resume = prepare_resume(store, Path(location), keep_last=cfg.checkpoint.keep_last,
                                keep_best=cfg.checkpoint.keep_best)
    if resume is None and cfg.model.init_from:
        read_init_from(cfg.model.init_from)
    return resume


def checkpoint_dirs(location: Path) -> list[Path]:
    """Ray's checkpoint directories of a run, newest first (their names are time stamps)."""
    return sorted((p for p in location.glob(CHECKPOINT_DIR_GLOB) if p.is_dir()), key=lambda p: p.name, reverse=True)


def find_resume_point(location: Path) -> tuple[Path | None, dict | None, list[str]]:
    """(directory, checkpoint dict) of the newest readable checkpoint under ``location`` (None,
    None without one) and the problems of the newer ones that could not be read."""
    unreadable = []
    for d in checkpoint_dirs(location):
        f = d / CHECKPOINT_FILE
        if not f.is_file():  # released by the retention rule, or an upload that never started
            continue
        try:
            return d, load_checkpoint(f), unreadable
        except (FileNotFoundError, ValueError) as e:
            unreadable.append(str(e))
    return None, None, unreadable


def prepare_resume(store: RunStore, location: Path, *, keep_last: int, keep_best: bool) -> dict | None:
    """Bring the run store in line with the newest complete checkpoint under ``location``
    (module docstring) and return ``{"path", "epoch", "step", "loader_position"}`` of it for
    the workers, or None when the run starts from scratch."""
    chosen, state, unreadable = find_resume_point(location)
    drop_ray_snapshot(location)
    if chosen is None:
        if unreadable:
            log.warning("%s", resume_fresh_warning(location, len(unreadable), unreadable[0]))
            store.index_path.unlink(missing_ok=True)  # its entries name unreadable files
        dropped = store.truncate_history(0)
        if dropped and not unreadable:
            log.warning("%s: no checkpoint to resume from: history.jsonl reset (%d epoch record(s) dropped)",
                        location, dropped)
        return None
    resume_epoch = int(state["loader_position"][0])
    dropped = store.truncate_history(resume_epoch)
    if chosen.name not in {e["file"] for e in store.checkpoint_entries()}:
        metrics = {"epoch": state["epoch"], "step": state["step"], **(state.get("metrics") or {})}
        store.record_checkpoint(checkpoint_entry(chosen.name, chosen, state, metrics), keep_last=keep_last,
                                keep_best=keep_best, release=lambda e: _release(location / e["file"]))
    kept = {e["file"] for e in store.checkpoint_entries()} | {chosen.name}
    pruned = [d.name for d in checkpoint_dirs(location) if d.name not in kept and _release(d)]
    log.info("resuming from %s (epoch %d, step %d; newest complete checkpoint)%s%s", chosen, state["epoch"],
             state["step"],
             f"; history.jsonl cut back to epochs < {resume_epoch} ({dropped} record(s) dropped)" if dropped else "",
             f"; pruned {len(pruned)} checkpoint director{'y' if len(pruned) == 1 else 'ies'}" if pruned else "")
    return {"path": str(chosen / CHECKPOINT_FILE), "epoch": int(state["epoch"]), "step": int(state["step"]),
            "loader_position": [int(v) for v in state["loader_position"]]}


def _release(directory: Path) -> bool:
    """Remove a checkpoint directory the run no longer keeps; True when there was one."""
    if not directory.is_dir():
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


def drop_ray_snapshot(location: Path) -> bool:
    """Delete Ray Train's run snapshot of a local run (module docstring); True when there was one."""
    snapshot = location / RAY_SNAPSHOT_FILE
    if not snapshot.is_file():
        return False
    snapshot.unlink()
    log.debug("%s: dropped Ray's run snapshot; resuming from the newest complete checkpoint on disk", snapshot)
    return True


def newer_resume_point(ray_checkpoint, resume_from: str | None, load_ray) -> tuple[str | None, dict | None]:
    """A worker's resume point: (where, checkpoint dict) of the newer by step of Ray's latest
    registered checkpoint (``ray_checkpoint``, read with ``load_ray``) and the driver's newest
    complete one on disk (``resume_from``, `prepare_resume`); (None, None) for a fresh start.
    Either may be unreadable (Ray's truncated, the driver's released by retention since): the
    other is used, with a warning."""
    state, where = None, None
    if ray_checkpoint is not None:
        try:
            state, where = load_ray(ray_checkpoint), str(ray_checkpoint.path)
        except (FileNotFoundError, ValueError) as e:
            log.warning("Ray's latest checkpoint %s cannot be read (%s): not resuming from it", ray_checkpoint.path, e)
    if resume_from and (where is None or Path(where) != Path(resume_from).parent):
        try:
            disk = load_checkpoint(resume_from)
        except (FileNotFoundError, ValueError) as e:
            log.warning("the driver's resume checkpoint cannot be read any more (%s)", e)
        else:
            if state is None or int(disk["step"]) > int(state["step"]):
                state, where = disk, str(Path(resume_from).parent)
    return where, state


# --- the previous driver's local Ray cluster ------------------------------------------------


def record_session(store: RunStore, session_dir: str | None) -> None:
    """driver.json: this driver's pid, host and local Ray session directory (None: it joined an
    existing cluster, whose processes are not this run's to stop)."""
    store.write_driver_info({"pid": os.getpid(), "host": socket.gethostname(), "session_dir": session_dir,
                             "start_time": round(time.time(), 3)})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def session_processes(session_dir: str) -> list[int]:
    """Pids of this machine's processes whose command line names ``session_dir`` (Ray passes
    every process of a session its session / log directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session_dir in cmdline:
            found.append(int(entry.name))
    return found


def reap_previous_session(store: RunStore, grace_s: float = 5.0) -> list[int]:
    """Stop what the previous driver's local Ray cluster left running (module docstring), if
    that driver ran on this host and is gone; returns the pids signalled."""
    info = store.read_driver_info()
    if not info or not info.get("session_dir") or info.get("host") != socket.gethostname():
        return []
    if _alive(int(info.get("pid", 0))):
        return []  # still running (or its pid reused: then leave it be): its cluster is in use
    # A session directory is /tmp/ray/session_<time>_<pid>: unique per ray.init, never reused.
    pids = session_processes(info["session_dir"])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if pids:
        log.warning("stopped %d process(es) left by the previous driver's Ray cluster (%s)", len(pids),
                    info["session_dir"])
    return pids


def local_session_dir() -> str | None:
    """The session directory of the Ray cluster this driver started (``ray.init`` with a local
    cluster), None when unknown. Ray has no public accessor: best effort on its node object."""
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        return node.get_session_dir_path() if node is not None else None
    except Exception:  # a Ray internal: never fail a run over it
        return None


# --- Prometheus file-SD entries -------------------------------------------------------------


def remove_stale_sd_entries(run_name: str, sd_dir: str) -> list[str]:
    """Delete this run's file-SD entries on this node (written by workers a killed driver took
    down without their cleanup); the new workers write fresh ones. Returns the names removed."""
    d = Path(sd_dir)
    removed = []
    for p in d.glob(f"tsn-{run_name}-rank*.json") if d.is_dir() else ():
        p.unlink(missing_ok=True)
        removed.append(p.name)
    if removed:
        log.info("removed %d stale Prometheus file-SD entr%s of run %s", len(removed),
                 "y" if len(removed) == 1 else "ies", run_name)
    return removed
