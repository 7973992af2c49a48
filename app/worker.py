"""The per-worker TSN training loop.

``train(cfg, run_dir, hooks=hooks)`` runs on every worker: in this process for
``tsn train --local`` (one worker, or one per process under torchrun), inside a Ray Train
worker for the cluster job (`cluster.ray_hooks` supplies its own hooks). It reads rank and world
size from ``torch.distributed`` when a process group is initialised (else 0 / 1). The dataset
is already prepared (`app.data.prepare_dataset` runs in the driver); the worker only loads it.

Per worker::

    resume    hooks.load_latest(); a run already finished at that checkpoint returns its results
    model     TSN from cfg.model (classes from the manifest), pretrained / init_from on a fresh
              start; DDP when world_size > 1
    loaders   TSNLoader(train, this rank's chunk of the epoch's order) resumed at the
              checkpoint's loader_state (epoch, steps done, position intervals left), with
              any world size: the rest of the epoch is split over this one; TSNLoader(val)
    optim     SGD over tsn.practices.param_groups, lr linearly scaled with the global batch
              (batch and lr rule: the per-worker batch is fixed, lr = optim.lr x global batch /
              optim.lr_reference_batch), per-iteration warmup + step schedule in epochs of
              the current world size (restarted at the right point after a resize)
    loop      per epoch: train_one_epoch -> evaluate(val) -> history.jsonl -> checkpoint;
              also a checkpoint every checkpoint.every_n_steps steps (the engine calls back)
    final     test protocol of the best checkpoint (`app.final_test`)

Checkpoints: ``save`` below builds ``state_fn`` and calls ``hooks.save_checkpoint``, which
writes it (`app.run_store.RunStore.save_checkpoint` locally; Ray's storage in the Ray job).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from app import distributed
from app.build import build_loaders, build_model, build_optimization, select_device, wrap_ddp
from app.config import Config, config_to_dict
from app.data import training_manifest
from app.final_test import final_test
from app.hooks import EngineHooks, LocalHooks, TrainHooks
from app.preprocessing import preprocessing_record
from app.resume import (check_resumable, config_changes, epoch_carry, finished_results, loader_resume,
                        schedule_iteration)
from app.run_store import TRACKING_FILE, RunStore, mirror_location
from app.tracking import Trackers, extend_world_sizes, lineage
from dataloading.store.storage import is_uri
from tsn import checkpoint as ckpt
from tsn.engine import TrainingStopped, train_one_epoch
from tsn.evaluation import evaluate
from tsn.schedule import scaled_lr

log = logging.getLogger(__name__)

# What a mid-epoch checkpoint keeps of the engine's checkpoint metrics (the epoch's loss so far).
PARTIAL_EPOCH_KEYS = ("train_loss", "epoch_loss_sum", "epoch_steps")


def resolve_run_dir(cfg: Config, run_dir: str | os.PathLike | None) -> Path:
    """``run_dir`` when given, else ``run.storage_path / run.name`` (a local path: a URI such as
    ``s3://...`` is Ray Train's checkpoint storage, which only the Ray job writes to)."""
    if run_dir:
        return Path(run_dir)
    if is_uri(cfg.run.storage_path):
        raise ValueError(f"run.storage_path={cfg.run.storage_path}: a URI is the Ray job's checkpoint storage; "
                         f"`tsn train --local` writes a local run directory: pass --run-dir DIR or a local "
                         f"run.storage_path")
    return Path(cfg.run.storage_path) / cfg.run.name


def train(cfg: Config, run_dir: str | os.PathLike | None = None, *, hooks: TrainHooks | None = None) -> dict:
    """Train (or resume) one run on this worker; returns the results dict (every rank).

    ``run_dir`` (default ``run.storage_path/run.name``) receives the run store's files (with the
    default `LocalHooks`, the checkpoints too). A run whose checkpoint has all epochs and whose
    results.json matches it is not redone: its results are returned.
    """
    t_start, started_at = time.perf_counter(), time.time()
    rank, world_size = distributed.rank(), distributed.world_size()
    device = select_device(cfg)  # first: a device mismatch fails before anything is written
    store = RunStore(resolve_run_dir(cfg, run_dir), mirror=mirror_location(cfg.run.storage_path, cfg.run.name))
    if rank == 0:
        store.restore()  # the record of a run in object storage, on a pod that may be new (app.run_store)
    owned = hooks is None  # LocalHooks made here are closed here; a caller closes its own
    hooks = hooks if hooks is not None else LocalHooks(store.dir, cfg)
    manifest = training_manifest(cfg)
    class_names = list(manifest["classes"])

    checkpoint = hooks.load_latest()
    finished = finished_results(store, checkpoint, cfg)
    if finished is not None:
        changed = config_changes(checkpoint, cfg)
        if changed and rank == 0:  # said, not silently ignored
            log.warning("run %s is finished: its results stand and these changes do nothing (train them in a new "
                        "run dir): %s", store.dir, "; ".join(changed))
        log.info("run %s already finished at step %d (results.json): nothing to do", store.dir, finished["steps"])
        return finished
    if checkpoint is not None:
        check_resumable(checkpoint, cfg, world_size, str(store.dir), manifest)
    if rank == 0:
        store.write_config(cfg)
    start_epoch, start_batch, remaining = loader_resume(checkpoint, str(store.dir))

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg, len(class_names), fresh=checkpoint is None).to(device)
    torch.manual_seed(cfg.run.seed + 1000 * rank + 1)  # then per-rank dropout streams
    net = wrap_ddp(model, device, world_size)
    loaders = build_loaders(cfg, device, rank=rank, world_size=world_size, start_epoch=start_epoch,
                            start_batch=start_batch, remaining=remaining)
    global_batch = cfg.train.batch_size_per_worker * world_size
    lr = scaled_lr(cfg.optim.lr, global_batch, cfg.optim.lr_reference_batch)
    steps_per_epoch = loaders["train"].full_epoch_steps  # a whole epoch at this world size
    optimizer, scheduler, scaler = build_optimization(cfg, model, lr=lr, steps_per_epoch=steps_per_epoch,
                                                      device=device)
    global_step, history = 0, []
    # Corrupt samples skipped before a resume (split -> [{shard, key, reason}]): results.json
    # counts the whole run's, also when the resumed run has no epoch left to meet them again.
    skipped_before: dict[str, list[dict]] = {}
    if checkpoint is not None:
        resized = checkpoint.get("meta", {}).get("world_size", world_size) != world_size
        global_step = ckpt.restore_training(checkpoint, model, optimizer, None if resized else scheduler, scaler,
                                            rank=rank)["step"]
        if resized:  # the schedule in epochs at the new world size, the lr of the new global batch
            scheduler.restart(schedule_iteration(steps_per_epoch, start_epoch, remaining,
                                                 loaders["train"].num_samples), lr=lr)
        history = list(checkpoint.get("meta", {}).get("history", []))
        skipped_before = dict(checkpoint.get("meta", {}).get("skipped", {}))
        log.info("resuming %s at epoch %d batch %d (step %d)", store.dir, start_epoch, start_batch, global_step)
    before = (checkpoint or {}).get("meta", {}).get("lineage", {}).get("world_sizes", [])
    record = lineage(cfg, extend_world_sizes(before, global_step, world_size))  # app.tracking
    meta = {"world_size": world_size, "batch_size_per_worker": cfg.train.batch_size_per_worker,
            "global_batch_size": global_batch, "lr": lr, "class_names": class_names,
            "preprocessing": preprocessing_record(cfg),  # what eval / predict feed the network (app.preprocessing)
            "lineage": record}
    trackers = Trackers(cfg, store.dir, rank=rank, start_step=global_step, lineage_record=record,
                        config_dict=config_to_dict(cfg))  # an MLflow server out of reach fails here
    if trackers.mlflow is not None:
        store.mirror_files(store.dir / TRACKING_FILE)  # a new pod's resume continues the same MLflow run

    stalls: list[float] = []  # seconds the loop waited on each checkpoint (the write runs in the background)

    def skipped_so_far() -> dict[str, list[dict]]:
        """This rank's skipped samples of the run (those found before a resume included)."""
        return {split: [*skipped_before.get(split, []), *getattr(loaders[split], "skipped", [])]
                for split in ("train", "val")}

    def save(epoch: int, step: int, metrics: dict) -> None:
        t0 = time.perf_counter()
        # One collective on every rank, before the hook (each all_gather_object is two gloo
        # round trips and a pickle): every rank's RNG states, so that each resumes its own
        # streams, and every rank's skipped samples, since the rank that met a corrupt sample
        # may not be rank 0, whose checkpoint keeps them all.
        gathered = distributed.all_gather((ckpt.rng_state(), skipped_so_far()))
        rng = [rank_rng for rank_rng, _ in gathered]
        skipped = distributed.merge_skipped(rank_skipped for _, rank_skipped in gathered)
        position, loader_state = loaders["train"].position, loaders["train"].state

        def state_fn() -> dict:
            state = ckpt.checkpoint_state(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                          epoch=epoch, step=step, loader_position=position,
                                          config=config_to_dict(cfg), metrics=metrics, rng=rng,
                                          meta={**meta, "history": history, "skipped": skipped})
            # The exact data state (app.resume.loader_resume): every rank computes the same one.
            return {**state, "loader_state": loader_state}
        hooks.save_checkpoint(state_fn, {"epoch": epoch, "step": step, **metrics})
        stalls.append(time.perf_counter() - t0)

    mid_epoch_stalls: list[float] = []  # those inside an epoch: also inside its train_seconds

    def save_mid_epoch(m: dict) -> None:
        save(m["epoch"], m["step"], {k: m[k] for k in PARTIAL_EPOCH_KEYS})
        mid_epoch_stalls.append(stalls[-1])

    setup_s = time.perf_counter() - t_start  # resume, model, loaders: before the first epoch
    try:
        with store.open_step_log(rank) as step_log:  # closed however training ends
            engine_hooks = EngineHooks(hooks, step_log, loaders["train"], checkpoint=save_mid_epoch,
                                       total_steps=cfg.train.epochs * steps_per_epoch, start_step=global_step,
                                       device=device, trackers=trackers)
            for epoch in range(start_epoch, cfg.train.epochs):
                t0 = time.perf_counter()
                if epoch > start_epoch and scheduler.last_epoch != epoch * steps_per_epoch:
                    scheduler.restart(epoch * steps_per_epoch)  # after a resized epoch: milestones on epoch starts
                tr = train_one_epoch(net, loaders["train"], optimizer, scheduler, device, epoch=epoch,
                                     clip_grad_norm=cfg.train.clip_grad_norm, scaler=scaler, hooks=engine_hooks,
                                     start_step=global_step, checkpoint_every_n_steps=cfg.checkpoint.every_n_steps,
                                     carry=epoch_carry(checkpoint, epoch, start_epoch, start_batch))
                global_step = tr["global_step"]
                distributed.sync_buffers_from_rank0(model)
                val = evaluate(net, loaders["val"], device, num_classes=len(class_names), amp=scaler is not None)
                hooks.on_eval({"phase": "val", "epoch": epoch, "step": global_step, **val.metrics()})
                metrics = {"epoch": epoch, "step": global_step, "train_loss": tr["loss"], "lr": tr["lr"],
                           "world_size": world_size, "global_batch_size": global_batch,
                           **val.metrics("val_"), "train_seconds": tr["seconds"], "data_wait_s": tr["data_wait_s"],
                           "train_videos_per_s": tr["videos_per_s"], "epoch_seconds": time.perf_counter() - t0}
                history.append(metrics)
                hooks.on_epoch_end(metrics)
                trackers.epoch(metrics)
                if rank == 0:
                    store.append_history(metrics)
                save(epoch, global_step, {k: v for k, v in metrics.items() if k not in ("epoch", "step")})
                if engine_hooks.stopping:  # asked during the epoch's last step: its end checkpoint stands
                    raise TrainingStopped(engine_hooks.stopping["reason"], epoch=epoch, step=global_step)

        results = final_test(cfg, store, hooks, net, device, class_names, rank=rank, world_size=world_size,
                             global_step=global_step, history=history, meta=meta, t_start=t_start,
                             skipped=skipped_so_far(),
                             timing={"started_at": started_at, "setup_s": setup_s, "checkpoint_stalls": stalls,
                                     "mid_epoch_checkpoint_stall_s": sum(mid_epoch_stalls)})
        if trackers.active:
            _track_results(trackers, store, results, global_step)
    except TrainingStopped as stopped:
        # The stop's checkpoint is stored (committed, in a Ray job) on every rank's watch before
        # the run ends: the process may be gone seconds later.
        hooks.flush()
        distributed.barrier()
        hooks.on_stop({"reason": stopped.reason, "ranks": engine_hooks.stopping["ranks"], "epoch": stopped.epoch,
                       "step": stopped.step, "time": round(time.time(), 3),
                       "stop_s": round(time.time() - engine_hooks.stopping["requested_at"], 3)})
        _close(loaders, hooks if owned else None, wait=False)
        trackers.close(failed=False)
        raise
    except BaseException:
        # however training fails (an error, Ctrl-C): the prefetching thread stops before the
        # interpreter does (a daemon thread inside torch at exit aborts the process: SIGABRT
        # instead of exit code 130), without waiting for reads still retrying a dead server
        _close(loaders, hooks if owned else None, wait=False)  # a checkpoint being written still finishes
        trackers.close(failed=True)
        raise
    _close(loaders, hooks if owned else None, wait=True)
    return results


def _track_results(trackers: Trackers, store: RunStore, results: dict, step: int) -> None:
    """Rank 0 at the end of a finished run: the test metrics, the plots and the run's files, the
    best checkpoint's location (app.tracking)."""
    from app.plots import write_plots

    trackers.test(results, step)
    plots = write_plots(store.dir)
    best = store.best_checkpoint_entry()
    where = (best.get("path") or str(store.local_checkpoint_path(best))) if best else ""
    trackers.finish([store.config_path, store.results_path, store.confusion_path, *plots],
                    tags={"tsn.best_checkpoint": where, "tsn.top1": f"{results['top1']:.4f}"})


def _close(loaders: dict, hooks: TrainHooks | None, *, wait: bool) -> None:
    """Stop the loaders' threads (``wait=False``: without waiting for reads in flight) and the
    hooks this function owns (their checkpoint thread is no daemon: a write still finishes)."""
    for loader in loaders.values():
        loader.close(wait=wait)
    if hooks is not None:
        hooks.close(wait=wait)
