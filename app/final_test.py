"""The end of a run: the test protocol (``model.test_segments`` x the test views) of the best
checkpoint on the val split, and the run's result files (results.json, scores.npz,
confusion.csv; rank 0)."""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from app.build import TEST_CROPS, build_test_loader
from app.config import Config
from app.run_store import RunStore, save_scores, write_confusion_csv
from tsn.evaluation import EvalResult, evaluate, unwrap

log = logging.getLogger(__name__)


def final_test(cfg: Config, store: RunStore, hooks, net: nn.Module, device: torch.device, class_names: list[str],
               *, rank: int, world_size: int, global_step: int, history: list[dict], meta: dict,
               t_start: float, skipped: dict[str, list[dict]] | None = None,
               timing: dict | None = None) -> dict:
    """Load the best checkpoint's weights (``hooks.best_checkpoint()``; the last weights when
    none has val metrics) into ``net``, evaluate, write the result files on rank 0; returns the
    results dict (every rank). Every rank must call this (evaluation all-gathers).
    ``skipped``: split -> this rank's loader's skipped samples ({shard, key, reason} each; the
    test loader's are added here), counted once per sample over all ranks in results.json.
    ``timing``: this process's ``started_at`` (Unix time), ``setup_s`` (before the first epoch)
    and ``checkpoint_stalls`` (seconds the loop waited on each checkpoint), for results.json's
    ``timing`` (`timing_record`)."""
    best = hooks.best_checkpoint()
    if best is not None:
        unwrap(net).load_state_dict(best["model"])
    loader = build_test_loader(cfg, cfg.data.val_split, device, rank=rank, world_size=world_size)
    test = evaluate(net, loader, device, num_classes=len(class_names), amp=device.type == "cuda" and cfg.train.amp)
    skipped_by_split = count_skipped({**(skipped or {}), "test": getattr(loader, "skipped", [])})
    source = {"epoch": best["epoch"], "step": best["step"], **best.get("metrics", {})} if best else \
        {"epoch": None, "step": global_step, "note": "no checkpoint with val metrics: last weights"}
    hooks.on_eval({"phase": "test", "step": global_step, **test.metrics(), "checkpoint_step": source["step"]})
    results = results_dict(cfg, test, class_names, source, global_step=global_step, history=history, meta=meta,
                           seconds=time.perf_counter() - t_start)
    # The step records' and the Prometheus counter's number (training samples skipped), and
    # per split: a corrupt sample is named in the log where it was skipped.
    results["skipped_samples"] = skipped_by_split.get("train", 0)
    results["skipped_samples_by_split"] = skipped_by_split
    results["timing"] = timing_record(timing or {}, history, test_s=test.seconds)
    if rank == 0:
        save_scores(store.scores_path, test, class_names=class_names,
                    meta={"split": cfg.data.val_split, "segments": cfg.model.test_segments, "crops": TEST_CROPS,
                          "modality": cfg.model.modality, "checkpoint_step": source["step"]})
        write_confusion_csv(store.confusion_path, test.confusion, class_names)
        store.write_results(results)
        log.info("test (%d segments x %d crops, %d videos): top1 %.4f top5 %.4f mean class acc %.4f -> %s",
                 cfg.model.test_segments, TEST_CROPS, test.num_videos, test.top1, test.top5,
                 test.mean_class_accuracy, store.results_path)
    return results


def timing_record(timing: dict, history: list[dict], *, test_s: float) -> dict:
    """Where this worker process's time went (results.json ``timing``; the driver adds Ray's
    part, `cluster.job`): set-up before the first epoch, training, validation, the loop's
    waits on checkpoints, the final test. Epochs before a resume count in train / val (from
    history) but not in set-up or the checkpoint waits, which are this process's."""
    stalls = list(timing.get("checkpoint_stalls") or [])
    return {"started_at": timing.get("started_at"), "setup_s": timing.get("setup_s"),
            # a checkpoint taken inside an epoch stalls inside its train_seconds: counted once, as a stall
            "train_s": sum(h.get("train_seconds", 0.0) for h in history)
            - float(timing.get("mid_epoch_checkpoint_stall_s") or 0.0),
            "val_s": sum(h.get("val_seconds", 0.0) for h in history),
            "checkpoints": len(stalls), "checkpoint_stall_s": sum(stalls),
            "checkpoint_stall_max_s": max(stalls, default=0.0), "test_s": test_s}


def count_skipped(skipped: dict[str, list[dict]]) -> dict[str, int]:
    """split -> distinct corrupt samples skipped by any rank (each rank's loader may find the
    same sample: counted once, by shard and key). Collective when a process group is up."""
    keys = {split: sorted({(str(s.get("shard")), str(s.get("key"))) for s in items})
            for split, items in skipped.items()}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, keys)
    else:
        gathered = [keys]
    return {split: len({k for g in gathered for k in g.get(split, [])}) for split in keys}


def results_dict(cfg: Config, test: EvalResult, class_names: list[str], source: dict, *, global_step: int,
                 history: list[dict], meta: dict, seconds: float) -> dict:
    """results.json: the test metrics, per-class accuracy (null for a class without videos), the
    protocol, the checkpoint evaluated, the epoch history and the run's scale and timings."""
    def num(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    return {
        "finished": True,
        "top1": test.top1, "top5": test.top5, "mean_class_accuracy": test.mean_class_accuracy,
        "num_val_videos": test.num_videos, "test_loss": test.loss,
        "per_class_accuracy": {n: num(float(a)) for n, a in zip(class_names, test.per_class_accuracy)},
        "protocol": {"split": cfg.data.val_split, "segments": cfg.model.test_segments, "crops": TEST_CROPS,
                     "scores": "mean of pre-softmax snippet scores over segments x crops"},
        "checkpoint": source,
        "epochs": cfg.train.epochs, "steps": global_step, "history": history,
        "world_size": meta["world_size"], "global_batch_size": meta["global_batch_size"], "lr": meta["lr"],
        "modality": cfg.model.modality, "backbone": cfg.model.backbone, "dataset": cfg.data.shards,
        "lineage": meta.get("lineage"),
        "test_seconds": test.seconds, "seconds": seconds,
        "train_seconds": sum(h.get("train_seconds", 0.0) for h in history),
    }
