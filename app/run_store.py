"""The run directory: its file names, their writers and readers, and the checkpoint index.

Every file of a run is named here and nowhere else; local training (`app.worker` with
`app.hooks.LocalHooks`), the Ray job (`cluster.job`), `tsn dashboard` and the plots all go
through `RunStore`. One run is one directory (``run.storage_path/run.name`` or ``--run-dir``)::

    config.yaml            the resolved config (rank 0, at start)                 write_config
    history.jsonl          one JSON line per epoch (rank 0)                       append_history
    steps/rank{R}.jsonl    one JSON line per training step of rank R             open_step_log
    metrics.jsonl          epoch_end, eval and stopped events (rank 0, local runs); worker_group and stopped records (Ray)  append_event
    results.json           the final test (rank 0, at the end)                    write_results
    scores.npz             per-video test scores                                  save_scores
    confusion.csv          test confusion counts                                  write_confusion_csv
    checkpoints/           local runs: ckpt-e{epoch}-s{step}.pt                   save_checkpoint
    checkpoints.json       the checkpoint index (local and Ray runs)              record_checkpoint
    workers/rank{R}.json   Ray runs: pid, node, metrics port of each worker      write_worker_info
    driver.json            Ray runs: the driver's pid, host, local Ray session   write_driver_info
    curves.png, confusion.png, dashboard.png                                      app.plots, tsn dashboard
    tracking.json          the run's MLflow run id (tracking.mlflow_uri)          app.tracking
    tensorboard/           event files (tracking.tensorboard)                     app.tracking

JSON Lines files are appended to: a resumed run logs some steps / epochs again, and readers
keep the last record of a step / epoch; a line cut short by a crash is skipped with a warning.
``history.jsonl`` is cut back to the epochs before the resume point when a run resumes
(`truncate_history`): it never holds an epoch twice, nor one no checkpoint backs.
Every other file is replaced atomically (`dataloading.store.files`).

A Ray run whose ``run.storage_path`` is object storage keeps its run directory on a pod's
scratch disk (Kubernetes: an emptyDir) while its checkpoints are in the bucket; a lost pod
would take the run's record with it (the index: retention forgets the older checkpoints; the
history restarts). So the record (`MIRRORED_FILES`) is mirrored to
``run.storage_path/run.name/run/`` (`mirror_location`): each file PUT whole after each write
(small: an epoch line, an index entry), and copied back when a run starts and when the job
ends (`RunStore.restore`: a new pod, the driver's pod, which is not rank 0's on Kubernetes). Step logs, worker and driver
infos and the plots stay local (per step, per pod, or redrawn).

Checkpoint index (``checkpoints.json``), the same for local and Ray runs::

    {"checkpoints": [entry, ...] ordered by step, "latest": file | null, "best": file | null}
    entry = {"file":   the checkpoint's name: under RUN_DIR/checkpoints/ for local runs, Ray's
                       checkpoint directory name for Ray runs,
             "path":   where it was written (a local path, or Ray's path on its storage),
             "epoch", "step", "loader_position": [epoch, batch], "metrics": {...}, "time": unix s}

Retention (`retained`), one rule for both: the ``keep_last`` latest by step, plus with
``keep_best`` the best (`best_entry`: highest ``metrics.val_top1``, ties: the later step;
mid-epoch checkpoints carry no ``val_top1`` and are never the best). ``best`` in the index is
the best of the retained entries: the checkpoint the final test evaluates.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

from app.config import dump_config
from dataloading.store.files import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text, to_json

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.jsonl"
STEPS_DIR = "steps"
EVENTS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
SCORES_FILE = "scores.npz"
CONFUSION_FILE = "confusion.csv"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_INDEX = "checkpoints.json"
WORKERS_DIR = "workers"
DRIVER_FILE = "driver.json"
CURVES_PNG, CONFUSION_PNG, DASHBOARD_PNG = "curves.png", "confusion.png", "dashboard.png"

# What a step log line keeps of the training loop's step metrics (plus "time", unix seconds).
MIRROR_DIR = "run"
# The run's record, mirrored to object storage (module docstring): everything a resume, the
# retention rule and the final summary read.
TRACKING_FILE = "tracking.json"  # the run's MLflow run id (app.tracking): a resume on a new pod continues it
MIRRORED_FILES = (CONFIG_FILE, HISTORY_FILE, EVENTS_FILE, CHECKPOINT_INDEX, RESULTS_FILE, SCORES_FILE, CONFUSION_FILE,
                  TRACKING_FILE)
STEP_LOG_KEYS = ("epoch", "step", "step_in_epoch", "steps_per_epoch", "loss", "lr", "step_s", "data_wait_s",
                 "videos", "frames", "skipped_samples", "world_size", "global_batch_size", "sample_index")
BEST_METRIC = "val_top1"


def checkpoint_name(epoch: int, step: int) -> str:
    """A local checkpoint's file name under RUN_DIR/checkpoints/."""
    return f"ckpt-e{epoch}-s{step}.pt"


def checkpoint_entry(file: str, path: str | Path, state: dict, metrics: dict) -> dict:
    """The index entry of a checkpoint dict ``state`` (`tsn.checkpoint` layout) saved as ``file``
    at ``path``; ``metrics``: what the loop reported with it (``val_top1`` at epoch ends)."""
    return {"file": file, "path": str(path), "epoch": int(state["epoch"]), "step": int(state["step"]),
            "loader_position": list(state["loader_position"]), "metrics": dict(metrics), "time": time.time()}


def best_entry(entries: list[dict]) -> dict | None:
    """The entry with the highest ``metrics.val_top1`` (ties: the later step), or None."""
    scored = [e for e in entries if (e.get("metrics") or {}).get(BEST_METRIC) is not None]
    return max(scored, key=lambda e: (e["metrics"][BEST_METRIC], e["step"])) if scored else None


def retained(entries: list[dict], *, keep_last: int, keep_best: bool) -> list[dict]:
    """The entries the retention rule keeps, ordered by step: the ``keep_last`` latest, plus the
    best (`best_entry`) when ``keep_best``."""
    by_step = sorted(entries, key=lambda e: e["step"])
    keep = by_step[-keep_last:]
    best = best_entry(by_step) if keep_best else None
    if best is not None and best not in keep:
        keep = sorted([best, *keep], key=lambda e: e["step"])
    return keep


def write_checkpoint(path: str | Path, state: dict) -> Path:
    """``torch.save`` a checkpoint dict to ``path`` atomically (a crash never leaves a truncated
    file under the final name); default permissions, so a shared run directory stays readable."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return atomic_write(path, lambda f: torch.save(state, f))
    except Exception as e:
        if isinstance(e.__context__, KeyboardInterrupt):
            # Ctrl-C inside torch.save: its zip writer then fails on close ("unexpected pos"),
            # hiding the interrupt (exit 1 and a traceback instead of 130); nothing was replaced
            raise KeyboardInterrupt from None
        full = disk_full_error(e)
        if full is None:
            raise
        # torch.save reports a full disk as a RuntimeError ("unexpected pos ...") raised while
        # handling the OSError: name the file, the cause and the fix instead.
        raise OSError(full.errno, f"{path}: {os.strerror(full.errno).lower()} while writing a checkpoint "
                                  f"(nothing was replaced); free space there or move run.storage_path / "
                                  f"--run-dir, then re-run the command: the run resumes from its last "
                                  f"complete checkpoint") from e


def disk_full_error(error: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError in ``error``'s chain (itself, its cause or context), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


# --------------------------------------------------------------------------------------------
# JSON Lines
# --------------------------------------------------------------------------------------------


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(to_json(record, indent=None))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON Lines file ([] when missing); unreadable lines are skipped with a
    warning on stderr (a line cut short by a crash: the rest is still good)."""
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{n}: unreadable line skipped", file=sys.stderr)
    return records


class StepLog:
    """This rank's ``steps/rank{R}.jsonl``, open for appending, line-buffered (a crash loses no
    step). A context manager; ``write(metrics)`` keeps `STEP_LOG_KEYS` and adds the wall time."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = path.open("a", buffering=1)

    def write(self, metrics: dict) -> None:
        record = {"time": round(time.time(), 3), **{k: metrics[k] for k in STEP_LOG_KEYS if k in metrics}}
        self._file.write(to_json(record, indent=None))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Scores and confusion files (also written outside run directories: `tsn eval`, `tsn fuse`)
# --------------------------------------------------------------------------------------------


def save_scores(path: str | Path, result, *, class_names: list[str] | None = None, meta: dict | None = None) -> None:
    """Per-video scores of a `tsn.evaluation.EvalResult` as ``.npz``: ``sample_index`` (N,),
    ``label`` (N,), ``scores`` (N, C) float32 pre-softmax, ``class_names`` (C,) str, ``meta``
    (a JSON string). Atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = np.asarray(class_names if class_names is not None else
                       [str(c) for c in range(result.scores.shape[1])], dtype=str)
    atomic_write(path, lambda f: np.savez(f, sample_index=result.sample_index, label=result.label,
                                          scores=result.scores, class_names=names,
                                          meta=np.asarray(json.dumps(meta or {}))))


def load_scores(path: str | Path) -> dict:
    """Read a `save_scores` file: dict of sample_index, label, scores, class_names (list), meta
    (dict). Raises ValueError naming the file when a member is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scores file not found")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("sample_index", "label", "scores") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: not a scores file (missing {', '.join(missing)})")
        out = {k: z[k] for k in ("sample_index", "label", "scores")}
        out["class_names"] = [str(c) for c in z["class_names"]] if "class_names" in z.files else None
        out["meta"] = json.loads(str(z["meta"])) if "meta" in z.files else {}
    if out["scores"].ndim != 2 or out["scores"].shape[0] != out["sample_index"].shape[0]:
        raise ValueError(f"{path}: scores {out['scores'].shape} do not match {out['sample_index'].shape[0]} videos")
    return out


def write_confusion_csv(path: str | Path, confusion: np.ndarray, class_names: list[str]) -> None:
    """Confusion counts as CSV: header ``true\\predicted,<class>...``, one row per true class."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["true\\predicted", *class_names])
    for name, row in zip(class_names, confusion):
        w.writerow([name, *(int(v) for v in row)])
    atomic_write_text(path, text.getvalue())


def read_confusion(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(class names, (C, C) int64 counts) of a `write_confusion_csv` file."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0][1:], np.array([[int(v) for v in r[1:]] for r in rows[1:]], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# The run directory
# --------------------------------------------------------------------------------------------


def mirror_location(storage_path: str, run_name: str) -> str | None:
    """Where a run's record is mirrored: ``storage_path/run_name/run`` when ``storage_path``
    is object storage, else None (a local storage path holds the run directory itself)."""
    from dataloading.store import storage

    return storage.join(checkpoint_location(storage_path, run_name), MIRROR_DIR) if storage.is_uri(storage_path) else None


def checkpoint_location(storage_path: str, run_name: str) -> str:
    """Where the Ray job keeps a run's checkpoints: ``storage_path/run_name`` (a URI stays one)."""
    from dataloading.store import storage

    return storage.join(storage_path, run_name)


class RunStore:
    """One run directory (layout: module docstring). Creating it writes nothing; writers create
    the directories they need. ``mirror``: the object-storage prefix its record is mirrored to
    (`mirror_location`), or None."""

    def __init__(self, run_dir: str | Path, mirror: str | None = None):
        self.dir = Path(run_dir)
        self.mirror = mirror.rstrip("/") if mirror else None
        self.config_path = self.dir / CONFIG_FILE
        self.history_path = self.dir / HISTORY_FILE
        self.events_path = self.dir / EVENTS_FILE
        self.results_path = self.dir / RESULTS_FILE
        self.scores_path = self.dir / SCORES_FILE
        self.confusion_path = self.dir / CONFUSION_FILE
        self.checkpoints_dir = self.dir / CHECKPOINTS_DIR
        self.index_path = self.dir / CHECKPOINT_INDEX
        self.steps_dir = self.dir / STEPS_DIR
        self.workers_dir = self.dir / WORKERS_DIR
        self.driver_path = self.dir / DRIVER_FILE
        self.curves_png = self.dir / CURVES_PNG
        self.confusion_png = self.dir / CONFUSION_PNG
        self.dashboard_png = self.dir / DASHBOARD_PNG

    # ---- config
    def write_config(self, cfg) -> None:
        """The resolved config as YAML (`app.config.dump_config`)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.config_path)
        self.mirror_files(self.config_path)

    def run_name(self) -> str:
        """``run.name`` of the saved config (the ``run`` label of the run's metrics), else the
        directory's name. Read as plain YAML: a run of an older config schema still answers."""
        import yaml

        if self.config_path.is_file():
            name = (yaml.safe_load(self.config_path.read_text()) or {}).get("run", {}).get("name")
            if name:
                return str(name)
        return self.dir.name

    # ---- logs
    def append_history(self, metrics: dict) -> None:
        append_jsonl(self.history_path, metrics)
        self.mirror_files(self.history_path)

    def read_history(self) -> dict[int, dict]:
        """epoch -> its last record."""
        return {int(h["epoch"]): h for h in read_jsonl(self.history_path) if "epoch" in h}

    def truncate_history(self, before_epoch: int) -> int:
        """Keep only the records of epochs < ``before_epoch`` in history.jsonl (rewritten
        atomically; 0 empties it): a resumed run redoes the epochs after its checkpoint, so their
        earlier records describe weights that no longer exist. Returns the records dropped."""
        records = read_jsonl(self.history_path)
        kept = [r for r in records if int(r.get("epoch", -1)) < before_epoch]
        if len(kept) != len(records):
            atomic_write_text(self.history_path, "".join(to_json(r, indent=None) for r in kept))
            self.mirror_files(self.history_path)
        return len(records) - len(kept)

    def append_event(self, record: dict) -> None:
        append_jsonl(self.events_path, record)
        self.mirror_files(self.events_path)

    def step_log_path(self, rank: int) -> Path:
        return self.steps_dir / f"rank{rank}.jsonl"

    def open_step_log(self, rank: int) -> StepLog:
        return StepLog(self.step_log_path(rank))

    def read_step_logs(self) -> dict[int, list[dict]]:
        """rank -> step records ordered by step (a step logged twice: the last record wins)."""
        out = {}
        for path in sorted(self.steps_dir.glob("rank*.jsonl")):
            m = re.fullmatch(r"rank(\d+)\.jsonl", path.name)
            if m:
                by_step = {int(r["step"]): r for r in read_jsonl(path) if "step" in r}
                out[int(m.group(1))] = [by_step[s] for s in sorted(by_step)]
        return out

    # ---- results
    def write_results(self, results: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.results_path, results)
        self.mirror_files(self.scores_path, self.confusion_path, self.results_path)  # written just before it

    def read_results(self) -> dict | None:
        """results.json, or None when missing or damaged (a damaged one is redone)."""
        try:
            return json.loads(self.results_path.read_text()) if self.results_path.is_file() else None
        except json.JSONDecodeError:
            return None

    # ---- Ray workers
    def write_worker_info(self, rank: int, info: dict) -> None:
        self.workers_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.workers_dir / f"rank{rank}.json", info, indent=None)

    def read_worker_infos(self) -> list[dict]:
        """Every worker's info, by rank."""
        return [json.loads(p.read_text()) for p in sorted(self.workers_dir.glob("rank*.json"))]

    def write_driver_info(self, info: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.driver_path, info, indent=None)

    def read_driver_info(self) -> dict | None:
        """driver.json, or None when missing or damaged."""
        try:
            return json.loads(self.driver_path.read_text()) if self.driver_path.is_file() else None
        except json.JSONDecodeError:
            return None

    # ---- checkpoint index
    def checkpoint_entries(self) -> list[dict]:
        """The index's entries, ordered by step ([] without an index)."""
        if not self.index_path.is_file():
            return []
        try:
            return json.loads(self.index_path.read_text())["checkpoints"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{self.index_path}: unreadable checkpoint index: {e}") from e

    def best_checkpoint_entry(self) -> dict | None:
        return best_entry(self.checkpoint_entries())

    def record_checkpoint(self, entry: dict, *, keep_last: int, keep_best: bool,
                          release: Callable[[dict], None]) -> list[dict]:
        """Add ``entry`` to the index (replacing an entry of the same step: the same training
        state saved again), apply the retention rule, write the index, then ``release(e)`` every
        entry no longer kept (delete its file). Index first: a crash in between leaves orphan
        files, never entries without a file. Returns the kept entries."""
        before = self.checkpoint_entries()
        entries = [e for e in before if e["step"] != entry["step"]] + [entry]
        keep = retained(entries, keep_last=keep_last, keep_best=keep_best)
        best = best_entry(keep)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.index_path, {"checkpoints": keep, "latest": keep[-1]["file"],
                                            "best": best["file"] if best is not None else None})
        self.mirror_files(self.index_path)
        for e in before:
            if e not in keep and e["file"] != entry["file"]:  # a replaced file was overwritten
                release(e)
        return keep

    def save_checkpoint(self, state: dict, metrics: dict, *, keep_last: int, keep_best: bool) -> Path:
        """A local checkpoint: ``state`` to checkpoints/ckpt-e{epoch}-s{step}.pt, recorded in the
        index under the retention rule (files no longer kept are deleted). Returns its path."""
        name = checkpoint_name(state["epoch"], state["step"])
        path = write_checkpoint(self.checkpoints_dir / name, state)
        self.record_checkpoint(checkpoint_entry(name, path, state, metrics), keep_last=keep_last,
                               keep_best=keep_best,
                               release=lambda e: (self.checkpoints_dir / e["file"]).unlink(missing_ok=True))
        return path

    # ---- the mirror (module docstring)
    def mirror_files(self, *paths: Path) -> None:
        """PUT each existing file of ``paths`` whole to the mirror (no-op without one). A failed
        upload is a warning, not a failure: the local copy stays and the next write PUTs the
        whole file again."""
        if self.mirror is None:
            return
        from dataloading.store import storage

        for path in paths:
            if not path.is_file():
                continue
            uri = storage.join(self.mirror, path.name)
            try:
                storage.put_bytes(uri, path.read_bytes())
            except (OSError, ValueError) as e:
                log.warning("%s: not mirrored to %s (%s); the local copy stays, its next write retries", path, uri, e)

    def restore(self) -> list[str]:
        """Copy every file the mirror holds into this run directory, replacing the local copy:
        the mirror is the record (each write is PUT at once; a failed PUT is redone by the
        next write), the local directory may be another pod's or a lost one's successor.
        Returns the names copied; no-op without a mirror."""
        if self.mirror is None:
            return []
        from dataloading.store import storage

        listed = storage.list_sizes(self.mirror)
        restored = []
        for name in MIRRORED_FILES:
            uri, local = storage.join(self.mirror, name), self.dir / name
            if uri in listed:
                self.dir.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(local, storage.read_bytes(uri))
                restored.append(name)
        if restored:
            log.info("%s: restored %s from %s", self.dir, ", ".join(restored), self.mirror)
        return restored

    def local_checkpoint_path(self, entry: dict) -> Path:
        """Where a local run's checkpoint is: by its name, so a moved run directory still resumes."""
        return self.checkpoints_dir / entry["file"]
