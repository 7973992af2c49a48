"""The distributed training job: `tsn train` runs `app.worker.train` on every Ray Train worker.

Driver (`run_job`): resolves the config (relative paths made absolute: workers do not share
the driver's working directory), prepares the embedded default dataset when it is missing,
starts a local Ray cluster or connects to ``--address``, and runs a `TorchTrainer`
(`ScalingConfig` from ``cluster.*``, gloo on CPU / NCCL on GPU, `FailureConfig(max_failures)`,
checkpoints kept by Ray under ``run.storage_path/run.name``). Re-running with the same
``run.name`` and ``run.storage_path`` resumes from the latest checkpoint.

Workers (`_train_worker`): `RayHooks` connect the training loop to Ray (checkpoints via
`ray.train.report`, restore via `ray.train.get_checkpoint`), to Prometheus (`WorkerMetrics`
on ``metrics.port + local_rank``) and to the console (rank 0 prints progress lines, which Ray
forwards to the driver and to `ray job logs`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from app.config import Config, config_from_dict, config_to_dict
from app.worker import TrainHooks

log = logging.getLogger(__name__)
progress_log = logging.getLogger("tsn.progress")

CHECKPOINT_FILE = "checkpoint.pt"
SCORE_ATTRIBUTE = "val_top1"


def is_uri(path: str) -> bool:
    return "://" in path


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


class RayHooks(TrainHooks):
    """`app.worker` hooks on a Ray Train worker (see `app.worker.TrainHooks` for the contract)."""

    def __init__(self, cfg: Config, run_dir: Path, *, progress_every_s: float = 5.0):
        import ray.train

        from cluster.metrics import WorkerMetrics, node_address, worker_port

        ctx = ray.train.get_context()
        self.rank, self.local_rank = ctx.get_world_rank(), ctx.get_local_rank()
        self.world_size = ctx.get_world_size()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.node = node_address()
        self.metrics = WorkerMetrics(cfg.run.name, self.rank, self.node,
                                     port=worker_port(cfg.metrics.port, self.local_rank))
        if self.metrics.port:
            say(f"rank {self.rank} metrics: http://{self.node}:{self.metrics.port}/metrics")
        self.progress_every_s = progress_every_s
        self._last_print = 0.0
        self._t0 = time.time()
        self._last_val: dict = {}
        (self.run_dir / "workers").mkdir(parents=True, exist_ok=True)
        # Lets operators (and the fault-tolerance test) find a rank's process.
        (self.run_dir / "workers" / f"rank{self.rank}.json").write_text(json.dumps(
            {"pid": os.getpid(), "node": self.node, "rank": self.rank, "metrics_port": self.metrics.port}))

    # --- checkpoints -------------------------------------------------------------------
    def load_latest(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            state = _load(Path(d) / CHECKPOINT_FILE)
        if self.rank == 0:
            say(f"resuming from {checkpoint.path} (epoch {state.get('epoch')}, step {state.get('step')})")
        return state

    def save_checkpoint(self, state_fn, metrics: dict) -> None:
        """Collective: every rank reports; rank 0 writes the state into a checkpoint."""
        import ray.train

        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        report.setdefault(SCORE_ATTRIBUTE, self._last_val.get("top1", -1.0))
        if self.rank != 0:
            ray.train.report(report)
            return
        import torch

        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="tsn-ckpt-") as tmp:
            path = Path(tmp) / CHECKPOINT_FILE
            torch.save(state_fn(), path)
            size = path.stat().st_size
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        self.metrics.observe_checkpoint(size, time.time() - t0)
        say(f"checkpoint at epoch {metrics.get('epoch')} step {metrics.get('step')} ({size / 1e6:.1f} MB, "
            f"{time.time() - t0:.1f}s)")

    def best_checkpoint(self) -> dict | None:
        """The retained checkpoint with the best val top-1 (ties: the later one)."""
        import ray.train

        reported = [c for c in ray.train.get_all_reported_checkpoints()
                    if c.metrics.get(SCORE_ATTRIBUTE, -1.0) is not None]
        if not reported:
            return None
        best = max(enumerate(reported), key=lambda ic: (ic[1].metrics.get(SCORE_ATTRIBUTE, -1.0), ic[0]))[1]
        with best.checkpoint.as_directory() as d:
            return _load(Path(d) / CHECKPOINT_FILE)

    # --- metrics and progress ----------------------------------------------------------
    def on_step(self, m: dict) -> None:
        self.metrics.observe_step(m)
        now = time.time()
        if self.rank == 0 and now - self._last_print >= self.progress_every_s:
            self._last_print = now
            say(format_progress(m, now - self._t0))

    def on_eval(self, m: dict) -> None:
        self.metrics.observe_eval(m)
        self._last_val = dict(m)

    def on_epoch_end(self, m: dict) -> None:
        if self.rank == 0:  # app.worker writes history.jsonl itself
            wait = m.get("data_wait_s", 0.0) / m["train_seconds"] if m.get("train_seconds") else 0.0
            say(f"epoch {m.get('epoch')} done (step {m.get('step')}): train loss {m.get('train_loss', 0):.4f} | val "
                f"top1 {m.get('val_top1', 0):.3f} top5 {m.get('val_top5', 0):.3f} mean class acc "
                f"{m.get('val_mean_class_accuracy', 0):.3f} | {m.get('train_videos_per_s', 0):.1f} videos/s, "
                f"data wait {100 * wait:.0f}% | {m.get('epoch_seconds', 0):.1f}s")

    def close(self) -> None:
        self.metrics.close()


def say(message: str) -> None:
    """A console line from a worker. Through logging, not print: Ray Train forwards worker
    log records to the driver and `ray job logs` once, but a print twice."""
    progress_log.info("[tsn] %s", message)


def _load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


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


def _train_worker(config: dict) -> None:
    """Ray Train entry point (runs on every worker)."""
    import torch

    from app.worker import train

    cfg = config_from_dict(config["cfg"])
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    _quiet_ray_train_reports()
    progress_log.setLevel(logging.INFO)
    hooks = RayHooks(cfg, Path(config["run_dir"]))
    try:
        train(cfg, Path(config["run_dir"]), hooks=hooks)
    finally:
        hooks.close()


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


def _quiet_ray_env() -> dict:
    """Environment for Ray processes: fewer per-report log lines in the console."""
    return {"RAY_TRAIN_V2_ENABLED": "1", "RAY_DEDUP_LOGS": "1"}


def run_job(cfg: Config, run_dir: str | Path | None = None, address: str | None = None) -> dict:
    """Run (or resume) the distributed training job; returns the results dict."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from app.data import ensure_dataset
    from app.config import DataConfig, dump_config

    default_shards = cfg.data.shards == DataConfig.shards
    cfg = resolve_paths(cfg)
    run_dir = Path(run_dir).resolve() if run_dir else default_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if default_shards:  # the embedded default: (re)built when missing or of another recipe
        d = cfg.data
        ensure_dataset(d.shards, d.synth_dir, classes=d.synth_classes, videos_per_class=d.synth_videos_per_class,
                       seed=d.synth_seed, short_side=d.pack_short_side, val_fraction=d.val_fraction)
    elif not (Path(cfg.data.shards) / "manifest.json").is_file():
        raise FileNotFoundError(f"data.shards={cfg.data.shards}: not a packed dataset (run `tsn pack` first)")
    dump_config(cfg, run_dir / "config.yaml")

    c = cfg.cluster
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")  # set inside a Ray job (`tsn submit`)
        if address:
            ray.init(address=address, runtime_env={"env_vars": _quiet_ray_env()})
        else:
            # The embedded default: a new local cluster sized for the job (logical CPUs; the
            # controller needs one besides the workers). address="local": a bare ray.init()
            # would join any cluster `ray start` left running on this machine.
            ray.init(address="local", num_cpus=int(c.num_workers * c.cpus_per_worker) + 1,
                     # The dashboard serves the State API that Ray Train's placement-group
                     # cleaner polls (without it: a warning every second), and the user's view.
                     include_dashboard=True, dashboard_host="127.0.0.1",
                     runtime_env={"env_vars": _quiet_ray_env()})
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": config_to_dict(cfg), "run_dir": str(run_dir)},
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                               resources_per_worker={"CPU": c.cpus_per_worker,
                                                                     **({"GPU": 1} if c.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep_last,
                checkpoint_score_attribute=SCORE_ATTRIBUTE if cfg.checkpoint.keep_best else None)),
    )
    t0 = time.time()
    result = trainer.fit()
    listing = [{"path": ck.path, **{k: m.get(k) for k in ("epoch", "step", SCORE_ATTRIBUTE, "train_loss")}}
               for ck, m in (result.best_checkpoints or [])]
    (run_dir / "checkpoints.json").write_text(json.dumps(
        {"latest": result.checkpoint.path if result.checkpoint else None, "checkpoints": listing}, indent=2) + "\n")
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    try:
        from app.plots import write_plots

        write_plots(run_dir)
        from cluster.dashboard import panels_from_logs, render

        render(panels_from_logs(run_dir), run_dir / "dashboard.png", title=f"tsn run {cfg.run.name}",
               xlabel="global step")
    except Exception as e:  # plots are a convenience; never lose the results over them
        log.warning("could not draw plots: %s", e)
    print(f"[tsn] finished in {time.time() - t0:.0f}s")
    print(f"[tsn] run directory : {run_dir}")
    print(f"[tsn] checkpoints   : {Path(cfg.run.storage_path) / cfg.run.name} (listed in {run_dir / 'checkpoints.json'})")
    if cfg.metrics.port:
        endpoints = []
        for f in sorted((run_dir / "workers").glob("rank*.json")):
            w = json.loads(f.read_text())
            if w.get("metrics_port"):
                endpoints.append(f"http://{w['node']}:{w['metrics_port']}/metrics")
        print(f"[tsn] metrics       : {', '.join(endpoints) or f'port {cfg.metrics.port} + local rank'} while "
              f"training (Prometheus file_sd: /tmp/ray/tsn_prom_sd/*.json; logged: {run_dir / 'steps'}/rank*.jsonl; "
              f"`tsn dashboard {run_dir}` draws them)")
    if results:
        print(f"[tsn] results       : {results_path}: top1 {results.get('top1'):.4f} top5 {results.get('top5'):.4f} "
              f"mean class accuracy {results.get('mean_class_accuracy'):.4f} ({results.get('num_val_videos')} videos)")
    return results


def run_from_args(args, cfg: Config) -> int:
    """`tsn train` without --local."""
    try:
        run_job(cfg, args.run_dir, args.address)
    except Exception as e:
        name = type(e).__name__
        if name in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            print(f"error: training failed after {cfg.cluster.max_failures} restart(s): {e}", file=sys.stderr)
            return 1
        raise
    return 0

