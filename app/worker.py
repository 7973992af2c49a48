"""The per-worker TSN training loop, and `tsn train`.

``train(cfg, run_dir, hooks=hooks)`` runs on every worker: in this process for
``tsn train --local`` (one worker, or one per process under torchrun), inside a Ray Train
worker for the cluster job (``cluster/`` wraps it and supplies its own ``TrainHooks``). It reads
rank and world size from ``torch.distributed`` when a process group is initialised (else 0 / 1).

Per worker::

    data      rank 0 generates + packs the embedded synthetic default when missing (barrier)
    loaders   TSNLoader(train, this rank's share), TSNLoader(val), resumed at the checkpoint's
              (epoch, batch)
    model     TSN from cfg.model (classes from the packed manifest), ImageNet weights
              (model.pretrained) and/or cross-modality seeding from an RGB run (model.init_from)
              on a fresh start; DDP when world_size > 1
    optim     SGD over tsn.practices.param_groups, lr linearly scaled with the global batch
              (tsn.schedule), per-iteration warmup + step schedule
    loop      per epoch: train_one_epoch -> evaluate(val) -> checkpoint; also every
              checkpoint.every_n_steps steps
    final     test protocol (model.test_segments x 10 crops) of the best checkpoint on the val
              split; rank 0 writes RUN_DIR/results.json, config.yaml, scores.npz, confusion.csv

Hooks contract (``TrainHooks``; every method is called on EVERY rank at the same points):

* ``load_latest() -> dict | None``: the checkpoint to resume from (a ``tsn.checkpoint`` dict).
* ``save_checkpoint(state_fn, metrics)``: ``state_fn()`` builds the checkpoint dict from the
  live objects; call it (on one rank suffices) before returning. ``metrics`` carries ``epoch``,
  ``step`` and, at epoch ends, ``val_top1`` etc.
* ``best_checkpoint() -> dict | None``: the checkpoint for the final test evaluation.
* ``on_step(metrics)``, ``on_epoch_end(metrics)``, ``on_eval(metrics)``: observation only.

``state_fn`` itself must not run collectives (one rank calls it); every collective train()
needs happens before the hook is called.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tsn import checkpoint as ckpt
from app.config import Config, DataConfig, config_to_dict, dump_config
from tsn.engine import train_one_epoch
from tsn.evaluation import EvalResult, evaluate, save_scores, unwrap, write_confusion_csv
from tsn.schedule import build_optimizer, build_scheduler, scaled_lr

log = logging.getLogger(__name__)

CHECKPOINTS_DIR, CHECKPOINTS_INDEX = "checkpoints", "checkpoints.json"
RESULTS_FILE, CONFIG_FILE, SCORES_FILE, CONFUSION_FILE = "results.json", "config.yaml", "scores.npz", "confusion.csv"
METRICS_LOG = "metrics.jsonl"
# Written by `train` itself whatever the hooks, for `tsn dashboard` and the plots: one JSON line
# per epoch (rank 0) and one per training step per rank (a resumed run appends; readers keep
# the last record of a step).
HISTORY_LOG, STEPS_DIR = "history.jsonl", "steps"
STEP_LOG_KEYS = ("epoch", "step", "step_in_epoch", "steps_per_epoch", "loss", "lr", "step_s", "data_wait_s",
                 "videos", "frames", "skipped_samples")


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


class TrainHooks:
    """No-op hooks: no resume, checkpoints discarded, nothing reported (contract: module doc)."""

    def load_latest(self) -> dict | None:
        return None

    def save_checkpoint(self, state_fn: Callable[[], dict], metrics: dict) -> None:
        pass

    def best_checkpoint(self) -> dict | None:
        return None

    def on_step(self, metrics: dict) -> None:
        pass

    def on_epoch_end(self, metrics: dict) -> None:
        pass

    def on_eval(self, metrics: dict) -> None:
        pass


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _distributed() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(v):
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


class LocalHooks(TrainHooks):
    """Checkpoints and logs in a local run directory (``tsn train --local``).

    * ``RUN_DIR/checkpoints/ckpt-e{epoch}-s{step}.pt``, written by rank 0 (``state_fn`` is only
      called there; the other ranks wait at a barrier, so afterwards every rank sees the file).
      Kept: the last ``checkpoint.keep_last`` plus, with ``keep_best``, the best by
      ``val_top1`` (ties: the later one); older files are deleted.
    * ``RUN_DIR/checkpoints.json``: ``{"checkpoints": [{file, epoch, step, loader_position,
      metrics, time}, ...] (by step), "latest": file, "best": file | null}``.
    * ``RUN_DIR/metrics.jsonl``: one JSON line per epoch end and per evaluation (rank 0).
    * step log lines every ``train.log_every_n_steps`` steps (rank 0).
    """

    def __init__(self, run_dir: str | Path, cfg: Config):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.ckpt_dir = self.run_dir / CHECKPOINTS_DIR
        self.index_path = self.run_dir / CHECKPOINTS_INDEX
        self._window: list[dict] = []  # step metrics since the last log line

    # ---- checkpoints
    def _entries(self) -> list[dict]:
        if not self.index_path.is_file():
            return []
        try:
            return json.loads(self.index_path.read_text())["checkpoints"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{self.index_path}: unreadable checkpoint index: {e}") from e

    @staticmethod
    def _best(entries: list[dict]) -> dict | None:
        scored = [e for e in entries if e.get("metrics", {}).get("val_top1") is not None]
        return max(scored, key=lambda e: (e["metrics"]["val_top1"], e["step"])) if scored else None

    def load_latest(self) -> dict | None:
        for entry in reversed(self._entries()):
            path = self.ckpt_dir / entry["file"]
            try:
                return ckpt.load_checkpoint(path)
            except (FileNotFoundError, ValueError) as e:  # fall back to an older one
                log.warning("skipping checkpoint %s: %s", path, e)
        return None

    def best_checkpoint(self) -> dict | None:
        best = self._best(self._entries())
        return ckpt.load_checkpoint(self.ckpt_dir / best["file"]) if best else None

    def save_checkpoint(self, state_fn: Callable[[], dict], metrics: dict) -> None:
        if _rank() == 0:
            state = state_fn()
            name = f"ckpt-e{state['epoch']}-s{state['step']}.pt"
            ckpt.write_checkpoint(self.ckpt_dir / name, state)
            entries = [e for e in self._entries() if e["file"] != name]
            entries.append({"file": name, "epoch": state["epoch"], "step": state["step"],
                            "loader_position": state["loader_position"], "metrics": metrics,
                            "time": time.time()})
            entries.sort(key=lambda e: e["step"])
            keep = entries[-self.cfg.checkpoint.keep_last:]
            best = self._best(entries)
            if self.cfg.checkpoint.keep_best and best is not None and best not in keep:
                keep = sorted([best, *keep], key=lambda e: e["step"])
            # Index first, then delete: a crash in between leaves orphans, never dangling entries.
            _write_json_atomic(self.index_path, {
                "checkpoints": keep, "latest": keep[-1]["file"],
                "best": best["file"] if best is not None and best in keep else None})
            for e in entries:
                if e not in keep:
                    (self.ckpt_dir / e["file"]).unlink(missing_ok=True)
            log.info("checkpoint %s (epoch %d, step %d)", self.ckpt_dir / name, state["epoch"], state["step"])
        _barrier()

    # ---- observation
    def on_step(self, metrics: dict) -> None:
        every = self.cfg.train.log_every_n_steps
        if _rank() != 0 or not every:
            return
        self._window.append(metrics)
        if metrics["step"] % every == 0:
            w, self._window = self._window, []
            seconds = sum(m["step_s"] for m in w)
            log.info("epoch %d step %d: loss %.4f lr %.3g | %.1f videos/s, data wait %.0f%%",
                     metrics["epoch"], metrics["step"], sum(m["loss"] for m in w) / len(w), metrics["lr"],
                     sum(m["videos"] for m in w) / seconds, 100 * sum(m["data_wait_s"] for m in w) / seconds)

    def on_epoch_end(self, metrics: dict) -> None:
        if _rank() != 0:
            return
        self._window = []
        log.info("epoch %d done (step %d): train loss %.4f | val top1 %.3f top5 %.3f mean class acc %.3f "
                 "| %.1fs", metrics["epoch"], metrics["step"], metrics["train_loss"], metrics["val_top1"],
                 metrics["val_top5"], metrics["val_mean_class_accuracy"], metrics["epoch_seconds"])
        self._append({"event": "epoch_end", **metrics})

    def on_eval(self, metrics: dict) -> None:
        if _rank() == 0:
            self._append({"event": "eval", **metrics})

    def _append(self, record: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / METRICS_LOG).open("a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")


class _EngineHooks:
    """What ``train_one_epoch`` calls: step metrics go to the user's hooks, with the run's
    ``total_steps`` and this process's ``start_step`` added (for ETAs), and to this rank's step
    log ``RUN_DIR/steps/rank{R}.jsonl`` (with the wall time); ``checkpoint`` saves a mid-epoch
    checkpoint through them."""

    def __init__(self, hooks: TrainHooks, save: Callable[[dict], None], *, total_steps: int, start_step: int,
                 step_log: Path | None = None, loader=None):
        self.hooks, self.save, self.loader = hooks, save, loader
        self.extra = {"total_steps": total_steps, "start_step": start_step}
        self._log = None
        if step_log is not None:
            step_log.parent.mkdir(parents=True, exist_ok=True)
            self._log = step_log.open("a", buffering=1)  # line-buffered: a crash loses no step

    def on_step(self, metrics: dict) -> None:
        if self.loader is not None:  # epoch progress and corrupt samples skipped so far (cumulative)
            metrics = {**metrics, "step_in_epoch": self.loader.position[1], "steps_per_epoch": len(self.loader),
                       "skipped_samples": len(getattr(self.loader, "skipped", ()))}
        if self._log is not None:
            record = {k: metrics[k] for k in STEP_LOG_KEYS if k in metrics}
            self._log.write(json.dumps({"time": round(time.time(), 3), **record}, default=_json_default) + "\n")
        self.hooks.on_step({**metrics, **self.extra})

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def checkpoint(self, metrics: dict) -> None:
        self.save(metrics)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def resolve_run_dir(cfg: Config, run_dir: str | os.PathLike | None) -> Path:
    """``run_dir`` when given, else ``run.storage_path / run.name``."""
    return Path(run_dir) if run_dir else Path(cfg.run.storage_path) / cfg.run.name


def select_device(cfg: Config) -> torch.device:
    """``train.device``: cpu, cuda (``LOCAL_RANK``'s GPU, as torchrun and Ray Train set it) or
    auto (cuda when available)."""
    want = cfg.train.device
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        if cfg.loader.device == "gpu":
            # DALI would fail deep in its backend with an assertion; say it before any work.
            why = "train.device=cpu" if want == "cpu" else "no CUDA device is visible to this process"
            raise ValueError(f"loader.device=gpu decodes and augments on the GPU, but training runs on CPU "
                             f"({why}); use loader.device=cpu")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.device=cuda: no CUDA device is visible to this process")
    index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def prepare_data(cfg: Config, rank: int) -> dict:
    """The packed dataset's manifest; rank 0 generates + packs the embedded synthetic default
    when ``data.shards`` is the default and missing or built from other ``data.synth_*``
    settings (the others wait at a barrier). A user's
    ``data.shards`` that does not exist is an error, never synthesised."""
    from dataloading import shards
    from app.data import ensure_dataset

    d = cfg.data
    manifest_path = Path(d.shards) / "manifest.json"
    if d.shards != DataConfig.shards and not manifest_path.is_file():
        raise FileNotFoundError(f"data.shards={d.shards}: not a packed dataset (no manifest.json); "
                                f"run `tsn pack` first")
    if rank == 0 and d.shards == DataConfig.shards:  # (re)built when missing or of another recipe
        ensure_dataset(d.shards, d.synth_dir, classes=d.synth_classes, videos_per_class=d.synth_videos_per_class,
                       seed=d.synth_seed, short_side=d.pack_short_side, val_fraction=d.val_fraction,
                       progress=False)
    _barrier()
    manifest = shards.load_manifest(d.shards)
    for key, split in (("data.train_split", d.train_split), ("data.val_split", d.val_split)):
        if split not in manifest.get("splits", {}):
            raise ValueError(f"{key}={split!r}: not packed in {manifest_path} (have: "
                             f"{', '.join(sorted(manifest.get('splits', {})))}); pack with a validation split")
    return manifest


def build_model(cfg: Config, num_classes: int, *, fresh: bool) -> nn.Module:
    """TSN from ``cfg.model``; on a fresh start also ImageNet weights (``model.pretrained``) and
    RGB-checkpoint seeding (``model.init_from``), in that order."""
    from tsn.backbones import load_backbone_weights
    from tsn.model import TSN

    m = cfg.model
    model = TSN(num_classes, m.num_segments, m.modality, m.snippet_length, backbone=m.backbone,
                consensus=m.consensus, dropout=m.dropout, partial_bn=m.partial_bn)
    if fresh and m.pretrained:
        left = load_backbone_weights(model.backbone, m.pretrained)
        log.info("backbone weights from %s (left at init: %s)", m.pretrained, left or "none")
    if fresh and m.init_from:
        left = ckpt.seed_from_rgb_checkpoint(model, m.init_from)
        log.info("cross-modality init from %s (left at init: %s)", m.init_from, left or "none")
    return model


def _gather_rng(world_size: int) -> list[dict]:
    """Every rank's RNG states, on every rank (so the checkpoint restores each rank's own)."""
    state = ckpt.rng_state()
    if world_size == 1:
        return [state]
    gathered: list = [None] * world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def _check_resumable(checkpoint: dict, cfg: Config, world_size: int, path_hint: str) -> None:
    """Fail when the data order of the checkpoint's run cannot be continued; warn on other
    config differences."""
    meta = checkpoint.get("meta", {})
    old = (meta.get("world_size"), meta.get("batch_size_per_worker"))
    new = (world_size, cfg.train.batch_size_per_worker)
    if None not in old and old != new:
        raise ValueError(f"{path_hint}: the run was trained with world_size={old[0]}, "
                         f"train.batch_size_per_worker={old[1]}; resuming with {new[0]}, {new[1]} would "
                         f"change its data order and schedule; use a new run dir (and model.init_from)")
    before, now = checkpoint.get("config") or {}, config_to_dict(cfg)
    changed = [f"{s}.{k}: {before[s][k]!r} -> {v!r}" for s, sec in now.items() for k, v in sec.items()
               if s in before and k in before[s] and before[s][k] != v]
    if changed:
        log.warning("resuming with a changed config: %s", "; ".join(changed))


def _finished_results(run_dir: Path, checkpoint: dict | None, cfg: Config) -> dict | None:
    """results.json of a run that trained all epochs and was test-evaluated at this checkpoint
    (rank 0 decides, every rank gets the answer)."""
    found = None
    if _rank() == 0 and checkpoint is not None and checkpoint["loader_position"][0] >= cfg.train.epochs:
        path = run_dir / RESULTS_FILE
        try:
            results = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            results = {}  # a damaged results.json: redo the final evaluation
        if results.get("finished") and results.get("steps") == checkpoint["step"]:
            found = results
    if _distributed() and torch.distributed.get_world_size() > 1:
        box = [found]
        torch.distributed.broadcast_object_list(box, src=0)
        found = box[0]
    return found


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(cfg: Config, run_dir: str | os.PathLike | None = None, *, hooks: TrainHooks | None = None) -> dict:
    """Train (or resume) one run on this worker; returns the results dict (every rank).

    ``run_dir`` (default ``run.storage_path/run.name``) receives, from rank 0, results.json,
    config.yaml, scores.npz, confusion.csv (and with the default ``LocalHooks``, checkpoints).
    A run whose checkpoint has all epochs and whose results.json matches it is not redone:
    its results are returned.
    """
    t_start = time.perf_counter()
    rank = _rank()
    world_size = torch.distributed.get_world_size() if _distributed() else 1
    device = select_device(cfg)  # first: a device mismatch fails before anything is written
    run_dir = resolve_run_dir(cfg, run_dir)
    hooks = hooks if hooks is not None else LocalHooks(run_dir, cfg)
    manifest = prepare_data(cfg, rank)
    class_names = list(manifest["classes"])

    checkpoint = hooks.load_latest()
    finished = _finished_results(run_dir, checkpoint, cfg)
    if finished is not None:
        log.info("run %s already finished at step %d (results.json): nothing to do", run_dir, finished["steps"])
        return finished
    if checkpoint is not None:
        _check_resumable(checkpoint, cfg, world_size, str(run_dir))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / CONFIG_FILE)
    start_epoch, start_batch = checkpoint["loader_position"] if checkpoint else (0, 0)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg, len(class_names), fresh=checkpoint is None).to(device)
    torch.manual_seed(cfg.run.seed + 1000 * rank + 1)  # then per-rank dropout streams
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model

    loaders = _build_loaders(cfg, rank, world_size, device, start_epoch, start_batch)
    global_batch = cfg.train.batch_size_per_worker * world_size
    lr = scaled_lr(cfg.optim.lr, global_batch, cfg.optim.lr_reference_batch)
    optimizer, scheduler, scaler = build_optimization(cfg, model, lr=lr, steps_per_epoch=len(loaders["train"]),
                                                      device=device)

    global_step, history = 0, []
    if checkpoint is not None:
        info = ckpt.restore_training(checkpoint, model, optimizer, scheduler, scaler, rank=rank)
        global_step, history = info["step"], list(checkpoint.get("meta", {}).get("history", []))
        log.info("resuming %s at epoch %d batch %d (step %d)", run_dir, start_epoch, start_batch, global_step)
    meta = {"world_size": world_size, "batch_size_per_worker": cfg.train.batch_size_per_worker,
            "global_batch_size": global_batch, "lr": lr, "class_names": class_names}

    def save(epoch: int, step: int, metrics: dict) -> None:
        rng = _gather_rng(world_size)  # collective: on every rank, before the hook
        position = loaders["train"].position

        def state_fn() -> dict:
            return ckpt.checkpoint_state(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                         epoch=epoch, step=step, loader_position=position,
                                         config=config_to_dict(cfg), metrics=metrics, rng=rng,
                                         meta={**meta, "history": history})
        hooks.save_checkpoint(state_fn, {"epoch": epoch, "step": step, **metrics})

    partial_keys = ("train_loss", "epoch_loss_sum", "epoch_steps")
    engine_hooks = _EngineHooks(hooks, lambda m: save(m["epoch"], m["step"], {k: m[k] for k in partial_keys}),
                                total_steps=cfg.train.epochs * len(loaders["train"]), start_step=global_step,
                                step_log=run_dir / STEPS_DIR / f"rank{rank}.jsonl", loader=loaders["train"])
    try:  # the step log is closed however training ends
        for epoch in range(start_epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            tr = train_one_epoch(net, loaders["train"], optimizer, scheduler, device, epoch=epoch,
                                 clip_grad_norm=cfg.train.clip_grad_norm, scaler=scaler, hooks=engine_hooks,
                                 start_step=global_step, checkpoint_every_n_steps=cfg.checkpoint.every_n_steps,
                                 carry=_epoch_carry(checkpoint, epoch, start_epoch, start_batch))
            global_step = tr["global_step"]
            _sync_buffers_from_rank0(model)
            val = evaluate(net, loaders["val"], device, num_classes=len(class_names), amp=scaler is not None)
            hooks.on_eval({"phase": "val", "epoch": epoch, "step": global_step, **val.metrics()})
            metrics = {"epoch": epoch, "step": global_step, "train_loss": tr["loss"], "lr": tr["lr"],
                       **val.metrics("val_"), "train_seconds": tr["seconds"], "data_wait_s": tr["data_wait_s"],
                       "train_videos_per_s": tr["videos_per_s"], "epoch_seconds": time.perf_counter() - t0}
            history.append(metrics)
            hooks.on_epoch_end(metrics)
            if rank == 0:
                with (run_dir / HISTORY_LOG).open("a") as f:
                    f.write(json.dumps(metrics, default=_json_default) + "\n")
            save(epoch, global_step, {k: v for k, v in metrics.items() if k not in ("epoch", "step")})
    finally:
        engine_hooks.close()

    return _final_test(cfg, run_dir, hooks, net, model, device, class_names, rank, world_size,
                       global_step=global_step, history=history, meta=meta, t_start=t_start)


def _epoch_carry(checkpoint: dict | None, epoch: int, start_epoch: int, start_batch: int):
    """The loss sums of the steps a mid-epoch checkpoint already holds for ``epoch`` (so the
    resumed epoch reports the same mean loss as an uninterrupted one), else None."""
    if checkpoint is None or epoch != start_epoch or start_batch == 0:
        return None
    m = checkpoint.get("metrics") or {}
    return (float(m["epoch_loss_sum"]), int(m["epoch_steps"])) if "epoch_steps" in m else None


def build_optimization(cfg: Config, model: nn.Module, *, lr: float, steps_per_epoch: int, device: torch.device):
    """(SGD over the authors' parameter groups, per-iteration WarmupStepLR, GradScaler or None).
    ``lr`` is the already scaled base lr; ``model`` the unwrapped TSN. AMP only on CUDA."""
    o = cfg.optim
    optimizer = build_optimizer(model, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                first_conv_lr_mult=o.first_conv_lr_mult)
    scheduler = build_scheduler(optimizer, steps_per_epoch=steps_per_epoch, lr_steps=o.lr_steps,
                                lr_gamma=o.lr_gamma, warmup_epochs=o.warmup_epochs)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.train.amp else None
    return optimizer, scheduler, scaler


def _sync_buffers_from_rank0(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluating.

    Without SyncBN each rank's running statistics drift on its own batches; rank 0's are the
    ones a checkpoint keeps. Evaluating with them on every rank makes the validation metrics
    those of the checkpointed model, and makes a run resumed after a crash (all ranks restored
    from rank 0's state) report exactly what the uninterrupted run reported.
    """
    if not _distributed() or torch.distributed.get_world_size() == 1:
        return
    for buf in model.buffers():
        torch.distributed.broadcast(buf.data, src=0)


def _build_loaders(cfg: Config, rank: int, world_size: int, device: torch.device, start_epoch: int,
                   start_batch: int) -> dict:
    from dataloading.loader import TSNLoader, pipeline_spec

    device_id = (device.index or 0) if cfg.loader.device == "gpu" else None
    common = {"rank": rank, "world_size": world_size, "device_id": device_id}
    d = cfg.data
    return {"train": TSNLoader(d.shards, d.train_split, pipeline_spec(cfg, "train"), start_epoch=start_epoch,
                               start_batch=start_batch, **common),
            "val": TSNLoader(d.shards, d.val_split, pipeline_spec(cfg, "val"), **common)}


def _final_test(cfg: Config, run_dir: Path, hooks: TrainHooks, net: nn.Module, model: nn.Module,
                device: torch.device, class_names: list[str], rank: int, world_size: int, *,
                global_step: int, history: list[dict], meta: dict, t_start: float) -> dict:
    """Test protocol on the val split with the best checkpoint's weights; rank 0 writes the
    run's result files. Returns the results dict."""
    from dataloading.loader import TSNLoader, pipeline_spec

    best = hooks.best_checkpoint()
    if best is not None:
        unwrap(model).load_state_dict(best["model"])
    d = cfg.data
    device_id = (device.index or 0) if cfg.loader.device == "gpu" else None
    loader = TSNLoader(d.shards, d.val_split, pipeline_spec(cfg, "test", cfg.train.test_batch_size_per_worker),
                       rank=rank, world_size=world_size, device_id=device_id)
    test = evaluate(net, loader, device, num_classes=len(class_names), amp=device.type == "cuda" and cfg.train.amp)
    source = {"epoch": best["epoch"], "step": best["step"], **best.get("metrics", {})} if best else \
        {"epoch": None, "step": global_step, "note": "no checkpoint with val metrics: last weights"}
    hooks.on_eval({"phase": "test", "step": global_step, **test.metrics(), "checkpoint_step": source["step"]})
    results = _results(cfg, test, class_names, source, global_step=global_step, history=history, meta=meta,
                       seconds=time.perf_counter() - t_start)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_scores(run_dir / SCORES_FILE, test, class_names=class_names,
                    meta={"split": d.val_split, "segments": cfg.model.test_segments, "crops": 10,
                          "modality": cfg.model.modality, "checkpoint_step": source["step"]})
        write_confusion_csv(run_dir / CONFUSION_FILE, test.confusion, class_names)
        _write_json_atomic(run_dir / RESULTS_FILE, results)
        log.info("test (%d segments x 10 crops, %d videos): top1 %.4f top5 %.4f mean class acc %.4f -> %s",
                 cfg.model.test_segments, test.num_videos, test.top1, test.top5, test.mean_class_accuracy,
                 run_dir / RESULTS_FILE)
    return results


def _results(cfg: Config, test: EvalResult, class_names: list[str], source: dict, *, global_step: int,
             history: list[dict], meta: dict, seconds: float) -> dict:
    def num(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    return {
        "finished": True,
        "top1": test.top1, "top5": test.top5, "mean_class_accuracy": test.mean_class_accuracy,
        "num_val_videos": test.num_videos, "test_loss": test.loss,
        "per_class_accuracy": {n: num(float(a)) for n, a in zip(class_names, test.per_class_accuracy)},
        "protocol": {"split": cfg.data.val_split, "segments": cfg.model.test_segments, "crops": 10,
                     "scores": "mean of pre-softmax snippet scores over segments x crops"},
        "checkpoint": source,
        "epochs": cfg.train.epochs, "steps": global_step, "history": history,
        "world_size": meta["world_size"], "global_batch_size": meta["global_batch_size"], "lr": meta["lr"],
        "modality": cfg.model.modality, "backbone": cfg.model.backbone, "dataset": cfg.data.shards,
        "test_seconds": test.seconds, "seconds": seconds,
        "train_seconds": sum(h.get("train_seconds", 0.0) for h in history),
    }
