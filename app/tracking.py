"""Experiment tracking (MLflow, TensorBoard) and the lineage every run records.

Lineage (`lineage`, every run, tracked or not): in results.json's ``lineage`` and in every
checkpoint's ``meta.lineage``::

    dataset      {location, manifest_sha256}: data.shards and the SHA-256 of its manifest.json
                 (the manifest lists every shard with its size and checksum, so equal hashes
                 mean the same data)
    seeds        {run.seed, data.synth_seed}
    code         {git_commit (None when the code is not a git checkout and TSN_GIT_COMMIT is
                 unset: the image sets it at build time), version (the package's)}
    world_sizes  [{step, world_size}]: the world size from each global step on (a step of 0:
                 from the start), one entry per change (restarts on fewer or more workers)

Trackers (`Trackers`, rank 0 only; ``tracking.*`` in the config, both off by default):

* MLflow (``tracking.mlflow_uri``; the ``mlflow-skinny`` client: a training image needs no
  server). One MLflow run per run directory: its id is kept in ``RUN_DIR/tracking.json``, so a
  resumed run (a re-run of the command, a restarted worker group) continues it. Params = the
  resolved config (dotted keys, set once: MLflow params cannot change); tags = the lineage, the
  run directory and the best checkpoint's location; metrics = the step metrics every
  ``tracking.log_every_n_steps`` steps, every epoch's and the final test's; artifacts =
  config.yaml, results.json, confusion.csv and the plots. A server that cannot be reached when
  the run starts fails it then, naming the URI. Once training runs, each batch of metrics is
  sent from a background thread, so training never waits on the server. A send that fails is
  logged once and dropped, and training goes on.
* TensorBoard (``tracking.tensorboard``): event files in ``RUN_DIR/tensorboard``
  (``torch.utils.tensorboard``; `tensorboard --logdir RUN_DIR`), the same scalars under
  ``train/``, ``val/`` and ``test/``. A resumed run purges the events after its resume step, so a
  crash's partial steps are not drawn twice.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app.run_store import TRACKING_FILE

log = logging.getLogger(__name__)

STEP_KEYS = ("loss", "lr", "grad_norm", "data_wait_s", "step_s")  # what a step sends (with videos/s)
EPOCH_KEYS = ("train_loss", "val_top1", "val_top5", "val_mean_class_accuracy", "val_loss", "train_videos_per_s",
              "epoch_seconds", "data_wait_s", "world_size", "lr")


class TrackingServerError(ValueError):
    """The configured tracking server cannot be used: the CLI reports it as a bad config (one
    line naming ``tracking.mlflow_uri``, exit code 2), before training starts."""


# --- lineage ------------------------------------------------------------------------------
def git_commit(code_dir: str | os.PathLike | None = None) -> str | None:
    """The commit of the code being run: TSN_GIT_COMMIT when set (an image has no .git), else
    ``git rev-parse HEAD`` in the project's directory, else None."""
    if os.environ.get("TSN_GIT_COMMIT"):
        return os.environ["TSN_GIT_COMMIT"]
    code_dir = Path(code_dir) if code_dir else Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(code_dir), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("tsn-train")
    except metadata.PackageNotFoundError:
        return None


def lineage(cfg, world_sizes: list[dict]) -> dict:
    """The run's lineage (module docstring)."""
    from dataloading.store import storage

    manifest = storage.join(cfg.data.shards, "manifest.json")
    return {"dataset": {"location": cfg.data.shards, "manifest_sha256": storage.sha256(manifest)},
            "seeds": {"run.seed": cfg.run.seed, "data.synth_seed": cfg.data.synth_seed},
            "code": {"git_commit": git_commit(), "version": _version()},
            "world_sizes": world_sizes}


def extend_world_sizes(before: list[dict], step: int, world_size: int) -> list[dict]:
    """``before`` with ``{step, world_size}`` appended when the world size changed (or nothing
    was recorded yet)."""
    if before and before[-1]["world_size"] == world_size:
        return list(before)
    return [*before, {"step": step, "world_size": world_size}]


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"section.key": str(value)} (MLflow params are strings)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


# --- trackers -----------------------------------------------------------------------------
class Trackers:
    """The configured trackers of one run, on rank 0 (no-ops elsewhere and when none is
    configured). Create it before training (a server that cannot be reached fails here)."""

    def __init__(self, cfg, run_dir: str | os.PathLike, *, rank: int, start_step: int, lineage_record: dict,
                 config_dict: dict):
        self.every = cfg.tracking.log_every_n_steps
        self.mlflow = self.tensorboard = None
        if rank != 0:
            return
        self.run_dir = Path(run_dir)
        if cfg.tracking.mlflow_uri:
            self.mlflow = _MLflow(cfg.tracking.mlflow_uri, cfg.tracking.mlflow_experiment, run_name=cfg.run.name,
                                  run_dir=self.run_dir, lineage_record=lineage_record, config_dict=config_dict)
        if cfg.tracking.tensorboard:
            self.tensorboard = _TensorBoard(self.run_dir / "tensorboard", start_step=start_step,
                                            config_dict=config_dict)

    @property
    def active(self) -> bool:
        return self.mlflow is not None or self.tensorboard is not None

    def step(self, m: dict) -> None:
        if not self.active or int(m["step"]) % self.every:
            return
        values = {k: float(m[k]) for k in STEP_KEYS if m.get(k) is not None}
        if m.get("step_s"):
            values["videos_per_s"] = m["videos"] * m.get("world_size", 1) / m["step_s"]
        self._log("train/", values, int(m["step"]))

    def epoch(self, m: dict) -> None:
        values = {k: float(m[k]) for k in EPOCH_KEYS if isinstance(m.get(k), (int, float))}
        self._log("epoch/", values, int(m["step"]))

    def test(self, results: dict, step: int) -> None:
        self._log("test/", {k: float(results[k]) for k in ("top1", "top5", "mean_class_accuracy")
                            if isinstance(results.get(k), (int, float))}, step)

    def _log(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics({prefix + k: v for k, v in values.items()}, step)
        if self.tensorboard is not None:
            self.tensorboard.log({prefix + k: v for k, v in values.items()}, step)

    def finish(self, files: list[Path], tags: dict[str, str]) -> None:
        """The end of a finished run: artifacts (files that exist), tags, FINISHED."""
        if self.mlflow is not None:
            self.mlflow.finish([f for f in files if f.is_file()], tags)
        if self.tensorboard is not None:
            self.tensorboard.close()

    def close(self, failed: bool) -> None:
        """Training ends otherwise (an error, a stop): what was sent stays; the MLflow run is
        marked FAILED or KILLED until a resume continues it."""
        if self.mlflow is not None:
            self.mlflow.end("FAILED" if failed else "KILLED")
        if self.tensorboard is not None:
            self.tensorboard.close()


class _MLflow:
    def __init__(self, uri: str, experiment: str, *, run_name: str, run_dir: Path, lineage_record: dict,
                 config_dict: dict):
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.uri = uri
        _check_reachable(uri)
        self.client = MlflowClient(tracking_uri=uri)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tsn-mlflow")
        self._warned = False
        record = run_dir / TRACKING_FILE
        known = json.loads(record.read_text()).get("mlflow_run_id") if record.is_file() else None
        try:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            run = self._existing(known, exp_id)
            resumed = run is not None
            if run is None:
                run = self.client.create_run(exp_id, run_name=run_name)
            self.run_id = run.info.run_id
            if resumed:
                self.client.update_run(self.run_id, status="RUNNING")
            else:  # params are immutable in MLflow: set once, by the run that created it
                params = [Param(k, v[:6000]) for k, v in sorted(flatten(config_dict).items())]
                for i in range(0, len(params), 100):  # MLflow's batch limit
                    self.client.log_batch(self.run_id, params=params[i:i + 100])
            tags = {"tsn.run_dir": str(run_dir.resolve()), **{f"tsn.lineage.{k}": str(v) for k, v in
                                                              flatten(lineage_record).items()}}
            self.client.log_batch(self.run_id, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
        except Exception as e:
            raise TrackingServerError(f"tracking.mlflow_uri={uri}: {type(e).__name__}: {e}") from None
        run_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"mlflow_run_id": self.run_id, "mlflow_uri": uri}) + "\n")
        log.info("MLflow run %s (%s) in experiment %r at %s", self.run_id, "resumed" if resumed else "new",
                 experiment, uri)

    def _existing(self, run_id: str | None, exp_id: str):
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception:  # deleted, or another server: a new run
            return None
        return run if run.info.experiment_id == exp_id else None

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self._pool.submit(self._send, lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def _send(self, call) -> None:
        try:
            call()
        except Exception as e:
            if not self._warned:  # once: the server may be down for a while
                self._warned = True
                log.warning("MLflow at %s: a batch of metrics was not recorded (training goes on): %s", self.uri, e)

    def finish(self, files: list[Path], tags: dict[str, str]) -> None:
        self._pool.shutdown(wait=True)
        try:
            for f in files:
                self.client.log_artifact(self.run_id, str(f))
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)
            self.client.set_terminated(self.run_id, status="FINISHED")
        except Exception as e:
            log.warning("MLflow at %s: the run's artifacts or end were not recorded: %s", self.uri, e)

    def end(self, status: str) -> None:
        self._pool.shutdown(wait=True)
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:
            log.warning("MLflow at %s: the run's end was not recorded: %s", self.uri, e)


def _check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """A tracking server that does not answer its health check fails the run at its start, in
    seconds (the MLflow client would retry with back-off for minutes). Local stores (file:,
    sqlite:) have nothing to reach."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            r.read()
    except (urllib.error.URLError, OSError) as e:
        raise TrackingServerError(f"tracking.mlflow_uri={uri}: the MLflow server does not answer "
                              f"({getattr(e, 'reason', e)}); start it, fix the URI, or set tracking.mlflow_uri: null") from None


class _TensorBoard:
    def __init__(self, log_dir: Path, *, start_step: int, config_dict: dict):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a crashed process wrote after the resume point are dropped
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            import yaml

            self.writer.add_text("config", "```\n" + yaml.safe_dump(config_dict, sort_keys=False) + "\n```")

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
