"""The distributed training job: `tsn train` runs `app.worker.train` on every Ray Train worker.

Driver (`run_job`): prepares the dataset (`app.data.prepare_dataset`: the embedded default is
generated + packed here, once, never in a worker), resolves the config (relative paths made
absolute: workers do not share the driver's working directory), starts a local Ray cluster or
connects to ``--address``, and runs a `TorchTrainer` (`ScalingConfig` from ``cluster.*``: a
fixed group or, with ``num_workers: [min, max]``, an elastic one, `cluster.elastic`; gloo
on CPU / NCCL on GPU, `FailureConfig(max_failures)`, checkpoints stored by Ray under
``run.storage_path/run.name``). Re-running with the same ``run.name`` and ``run.storage_path``
resumes from the latest checkpoint. At the end: plots and a summary of the run store.

Object storage: ``data.shards`` and ``run.storage_path`` may be ``s3://`` URIs
(`dataloading.store.storage`; Ray Train stores checkpoints through ``pyarrow.fs``, which reads the
same variables). The driver's standard AWS variables are handed to every Ray worker in the
job's ``runtime_env`` (`_object_storage_env`): workers on other nodes do not inherit the
driver's environment. A read error mid-epoch that DALI's reader does not recover from fails
the worker; ``FailureConfig(max_failures)`` then restarts the group from the last checkpoint.

Workers (`_train_worker`): `app.worker.train` with `cluster.ray_hooks.RayHooks`.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

from app.config import Config, config_from_dict, config_to_dict
from app.run_store import RunStore, checkpoint_location, mirror_location
from cluster.connect import join
from cluster.elastic import scaling_kwargs
from dataloading.store.storage import is_uri

log = logging.getLogger(__name__)


def resolve_paths(cfg: Config) -> Config:
    """Absolute local paths for data and storage (URIs stay as they are)."""
    d = config_to_dict(cfg)
    for section, key in (("data", "shards"), ("data", "synth_dir"), ("run", "storage_path")):
        value = d[section][key]
        if value and not is_uri(value):
            d[section][key] = str(Path(value).expanduser().resolve())
    return config_from_dict(d)


def default_run_dir(cfg: Config) -> Path:
    if is_uri(cfg.run.storage_path):
        return Path("runs").resolve() / cfg.run.name
    return Path(cfg.run.storage_path) / cfg.run.name


def _train_worker(config: dict) -> None:
    """Ray Train entry point (runs on every worker)."""
    import torch

    from app.worker import train
    from cluster.preemption import leave_group
    from cluster.ray_hooks import RayHooks, progress_log
    from tsn.engine import TrainingStopped

    cfg = config_from_dict(config["cfg"])
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    _quiet_ray_train_reports()
    progress_log.setLevel(logging.INFO)
    hooks = RayHooks(cfg, Path(config["run_dir"]), driver=config.get("driver", ""),
                     resume_from=config.get("resume_from"))
    ok = False
    try:
        train(cfg, Path(config["run_dir"]), hooks=hooks)
        ok = True
    except TrainingStopped:
        hooks.close(wait=True)
        # Ray Train restarts the group from the stop's checkpoint (cluster.preemption); raising
        # only if it has not torn this worker down by then.
        leave_group(hooks.rank, wait_s=cfg.cluster.preemption_grace_s + 30)
        raise
    finally:
        hooks.close(wait=ok)


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report and checkpoint with its whole metrics dict at INFO (one long
    line per rank per report); the worker's own lines (`say`) carry what a user watches. Those
    loggers are named by module or by file path depending on the module: quiet both; best
    effort, since the names are Ray internals."""
    import importlib

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    for name in ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for logger_name in (name, getattr(module, "__file__", None)):
            if logger_name:
                logging.getLogger(logger_name).setLevel(logging.WARNING)


# How often Ray Train's controller polls the workers (Ray's default: 2 s). It registers one
# report per poll and a worker's report queue holds one, so this bounds how soon a checkpoint
# is committed: at 2 s, a run checkpointing every epoch of a second waits on the controller at
# every checkpoint (`cluster.ray_hooks`). A poll is one small RPC per worker.
POLL_INTERVAL_S = "0.5"
# How often Ray Train's preemption watcher reads Ray Core's drain state (Ray's default: 5 s): a
# notice of 30 s (GCE / Azure spot) leaves the run 25 s for a step and a checkpoint at 5 s;
# one small GCS request per second at 1 s (cluster.preemption).
PREEMPTION_POLL_INTERVAL_S = "1"


def ray_process_env() -> dict:
    """Environment for Ray processes: fewer per-report log lines in the console, the
    controller's poll interval (`POLL_INTERVAL_S`) and the preemption watcher's
    (`PREEMPTION_POLL_INTERVAL_S`); the user's own values of those variables win."""
    return {"RAY_TRAIN_V2_ENABLED": "1", "RAY_DEDUP_LOGS": "1",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", POLL_INTERVAL_S),
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": os.environ.get("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S",
                                                                   PREEMPTION_POLL_INTERVAL_S)}


def _object_storage_env(cfg: Config) -> dict:
    """`object_storage_env` of the config's data and checkpoint locations."""
    return object_storage_env(cfg.data.shards, cfg.run.storage_path)


def object_storage_env(*locations: str) -> dict:
    """The driver's standard AWS variables (`dataloading.store.storage.AWS_ENV_VARS`: endpoint,
    credentials, region, profile), for the workers when one of ``locations`` (data,
    checkpoints) is in object storage: workers on other nodes do not share the driver's
    environment. Taken from the environment only, never from the config file; nothing when
    all are local paths."""
    from dataloading.store.storage import AWS_ENV_VARS

    if not any(is_uri(loc) for loc in locations if loc):
        return {}
    return {k: os.environ[k] for k in AWS_ENV_VARS if k in os.environ}


def worker_disk_full(error: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError a worker failed with, from Ray's ``WorkerGroupError``
    (``worker_failures``: rank -> the worker's exception, possibly in Ray's wrapper, whose
    ``cause`` is the original), as an OSError holding its message; else None."""
    from app.run_store import disk_full_error

    for failure in (getattr(error, "worker_failures", None) or {}).values():
        for candidate in (failure, getattr(failure, "cause", None)):
            full = disk_full_error(candidate) if isinstance(candidate, BaseException) else None
            if full is not None:
                return OSError(full.errno, full.strerror)
    return None



def start_or_join(store: RunStore, address: str | None, env_vars: dict, local_cpus) -> None:
    """Connect this driver to Ray unless it is: the cluster at ``address`` (or ``RAY_ADDRESS``,
    set inside a Ray job, `tsn submit`), joined with its token (`cluster.connect`), else a new
    local cluster of ``local_cpus()`` logical CPUs, recorded in ``store`` so that the next run
    stops what a kill leaves of it. ``env_vars``: every Ray process's environment."""
    import ray

    from cluster.recovery import local_session_dir, record_session

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        join(address, runtime_env={"env_vars": env_vars})
        return
    # address="local": a bare ray.init() would join any cluster `ray start` left running on this
    # machine. The dashboard serves the State API that Ray Train's placement-group cleaner polls
    # (without it: a warning every second), and the user's view.
    ray.init(address="local", num_cpus=local_cpus(), include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": env_vars})
    record_session(store, local_session_dir())


def run_job(cfg: Config, run_dir: str | Path | None = None, address: str | None = None, *,
            callbacks: tuple | list = ()) -> dict:
    """Run (or resume) the distributed training job; returns the results dict. ``callbacks``:
    Ray Train callbacks of the run (`tsn tune`'s report to Ray Tune: `cluster.tune`)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.ray_trainer import trainer_class  # Ray's own, with a prompt end

    from app.data import check_dataset_fits, check_training_splits, prepare_dataset
    from cluster.recovery import driver_preflight

    # Before resolving the paths: the embedded default is recognised by its configured path.
    manifest = prepare_dataset(cfg)
    check_training_splits(cfg, manifest)
    check_dataset_fits(cfg, manifest, cfg.cluster.max_workers)  # here, not in every worker after Ray started
    cfg = resolve_paths(cfg)
    store = RunStore(Path(run_dir).resolve() if run_dir else default_run_dir(cfg),
                     mirror=mirror_location(cfg.run.storage_path, cfg.run.name))
    store.restore()  # a run in object storage: its record, whichever pod wrote it (app.run_store)
    store.write_config(cfg)
    # A killed predecessor's leftovers, and the newest complete checkpoint (cluster.recovery).
    resume = driver_preflight(cfg, store, checkpoint_location(cfg.run.storage_path, cfg.run.name))

    c = cfg.cluster
    env_vars = {**ray_process_env(), **_object_storage_env(cfg)}
    t_ray = time.time()
    # The embedded default: a new local cluster sized for the job (logical CPUs; the
    # controller needs one besides the workers).
    start_or_join(store, address, env_vars, lambda: int(c.max_workers * c.cpus_per_worker) + 1)
    trainer = trainer_class(TorchTrainer)(
        _train_worker,
        # driver: this invocation's id; worker groups started under it after the first are
        # restarts (cluster.elastic).
        train_loop_config={"cfg": config_to_dict(cfg), "run_dir": str(store.dir), "driver": uuid.uuid4().hex,
                           "resume_from": resume["path"] if resume else None},
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(**scaling_kwargs(c)),  # fixed or elastic: cluster.elastic
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage_path, callbacks=list(callbacks) or None,
            failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
            # Ray deletes no checkpoint: retention is the run store's rule, applied by RayHooks
            # (Ray's own num_to_keep cannot express "the last K plus the best").
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None)),
    )
    t0 = time.time()
    ray_start_s = t0 - t_ray
    try:
        trainer.fit()
    except Exception as e:
        full = worker_disk_full(e)
        if full is None:
            raise
        raise full from None  # the one line a worker wrote (`ray_hooks._storage_full`), not Ray's report
    fit_s = time.time() - t0
    store.restore()  # rank 0's record (on Kubernetes another pod's), for the summary and the plots
    results = store.read_results() or {}
    split = time_split(results.get("timing") or {}, ray_start_s=ray_start_s, fit_started_at=t0, fit_s=fit_s)
    if split is not None:  # this invocation trained (not a finished run's results.json)
        results["timing"] = split
        store.write_results(results)
    try:
        from app.plots import write_plots
        from cluster.dashboard import panels_from_logs, render

        write_plots(store.dir)
        render(panels_from_logs(store.dir), store.dashboard_png, title=f"tsn run {cfg.run.name}",
               xlabel="global step")
    except Exception as e:  # plots are a convenience; never lose the results over them
        log.warning("could not draw plots: %s", e)
    _print_summary(cfg, store, results, time.time() - t0, split)
    return results


def time_split(worker: dict, *, ray_start_s: float, fit_started_at: float, fit_s: float) -> dict | None:
    """The job's time from the run's own records: the driver's Ray start-up and
    ``trainer.fit`` wall time, split with rank 0's ``timing`` (`app.final_test.timing_record`)
    into worker start-up (Ray placing the group and starting its processes, and restarts
    before the last group), set-up, training, validation, checkpoint waits, final test and the
    rest. None when ``worker`` is not from this fit (a finished run's results, returned as
    they were)."""
    started = worker.get("started_at")
    if started is None or started < fit_started_at:
        return None
    parts = {k: float(worker.get(k) or 0.0) for k in ("setup_s", "train_s", "val_s", "checkpoint_stall_s", "test_s")}
    split = {**worker, "ray_start_s": ray_start_s, "fit_s": fit_s, "worker_start_s": started - fit_started_at}
    split["other_s"] = fit_s - split["worker_start_s"] - sum(parts.values())
    split["outside_train_val_test_ratio"] = (fit_s - parts["train_s"] - parts["val_s"] - parts["test_s"]) / fit_s
    return split


def format_time_split(t: dict) -> str:
    """The summary's time line (`time_split`)."""
    return (f"Ray start {t['ray_start_s']:.1f}s, then {t['fit_s']:.1f}s: worker start-up {t['worker_start_s']:.1f}s, "
            f"set-up {t['setup_s']:.1f}s, training {t['train_s']:.1f}s, validation {t['val_s']:.1f}s, checkpoint "
            f"waits {t['checkpoint_stall_s']:.1f}s ({t['checkpoints']} checkpoints), final test {t['test_s']:.1f}s, "
            f"other {t['other_s']:.1f}s ({100 * t['outside_train_val_test_ratio']:.0f}% outside training, validation "
            f"and test)")


def _print_summary(cfg: Config, store: RunStore, results: dict, seconds: float, split: dict | None) -> None:
    from cluster.metrics import DEFAULT_SD_DIR

    print(f"[tsn] finished in {seconds:.0f}s")
    if split is not None:
        print(f"[tsn] time          : {format_time_split(split)}")
    print(f"[tsn] run directory : {store.dir}")
    print(f"[tsn] checkpoints   : {checkpoint_location(cfg.run.storage_path, cfg.run.name)} (listed in {store.index_path})")
    if cfg.metrics.port:
        # the address the endpoint answers on (loopback for local runs: metrics.bind_address)
        endpoints = [w.get("metrics_url") or f"http://{w['node']}:{w['metrics_port']}/metrics"
                     for w in store.read_worker_infos() if w.get("metrics_port")]
        print(f"[tsn] metrics       : {', '.join(endpoints) or f'port {cfg.metrics.port} + local rank'} while "
              f"training (Prometheus file_sd: {DEFAULT_SD_DIR}/*.json; logged: {store.steps_dir}/rank*.jsonl; "
              f"`tsn dashboard {store.dir}` draws them)")
    if results:
        print(f"[tsn] results       : {store.results_path}: top1 {results.get('top1'):.4f} top5 "
              f"{results.get('top5'):.4f} mean class accuracy {results.get('mean_class_accuracy'):.4f} "
              f"({results.get('num_val_videos')} videos)")
