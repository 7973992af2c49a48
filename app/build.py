"""The training loop's parts, built from the config: device, model, optimisation, loaders.

Each function reads only the config sections it names and returns plain torch / loader
objects; `app.worker` wires them, `app.evaluate` reuses the device, model and test loader.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from app.config import Config
from tsn.schedule import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# The "crops" that results.json and scores files record for the test protocol: the paper's 10
# (5 crops x 2 flips). NOTE: with augment.flip=false the test loader makes the 5 unflipped
# views only (PipelineSpec.num_views); the recorded value is kept as it was.
TEST_CROPS = 10

# Memory for the batches the training and validation loaders prepare ahead on their own
# thread (the torch finishing step off the training thread; `TSNLoader` prefetch_batches), per
# loader: at least 2 batches, more when they fit. The thread also prepares the next epoch while
# validation and the checkpoint run, so the deeper the queue the more of an epoch is ready
# before it starts (the embedded default's 11 batches of ~5 MB: all of them; UCF101 at 224 px,
# 32 RGB clips x 3 segments, ~58 MB a batch: 4).
PREFETCH_BUDGET_BYTES = 256 << 20


def select_device(cfg: Config) -> torch.device:
    """``train.device``: cpu, cuda (``LOCAL_RANK``'s GPU, as torchrun and Ray Train set it) or
    auto (cuda when available). Fails when ``loader.device=gpu`` but training runs on CPU."""
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


def build_model(cfg: Config, num_classes: int, *, fresh: bool) -> nn.Module:
    """TSN from ``cfg.model``; on a fresh start also ImageNet weights (``model.pretrained``:
    'imagenet' for the backbone's published weights through timm's / torch.hub's cache, or a
    local file; `tsn.backbones.load_backbone_weights`) and RGB-checkpoint seeding
    (``model.init_from``), in that order. The input those weights expect is the data path's
    (`app.preprocessing.resolve_preprocessing`)."""
    from tsn.backbones import load_backbone_weights
    from tsn.checkpoint import seed_from_rgb_checkpoint
    from tsn.model import TSN

    m = cfg.model
    model = TSN(num_classes, m.num_segments, m.modality, m.snippet_length, backbone=m.backbone,
                consensus=m.consensus, dropout=m.dropout, partial_bn=m.partial_bn,
                shift_fold_div=m.temporal_shift.fold_div, shift_place=m.temporal_shift.place)
    if fresh and m.pretrained:
        left = load_backbone_weights(model.backbone, m.pretrained)
        log.info("backbone weights from %s (left at init: %s)", m.pretrained, left or "none")
    if fresh and m.init_from:
        left = seed_from_rgb_checkpoint(model, m.init_from)
        log.info("cross-modality init from %s (left at init: %s)", m.init_from, left or "none")
    return model


def wrap_ddp(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several workers, else itself."""
    if world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


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


def _device_id(cfg: Config, device: torch.device) -> int | None:
    """The GPU DALI decodes on (``loader.device=gpu``: the training device), else None."""
    return (device.index or 0) if cfg.loader.device == "gpu" else None


def build_loaders(cfg: Config, device: torch.device, *, rank: int, world_size: int, start_epoch: int,
                  start_batch: int, remaining=None) -> dict:
    """``{"train", "val"}`` TSNLoaders of this rank; train resumes at (start_epoch, start_batch)
    with ``remaining`` position intervals of the epoch left (`TSNLoader`; None: the whole
    epoch, or a resume at the same world size).
    Both prepare batches in a background thread and, knowing ``train.epochs``, start their next
    epoch while the current one ends (`TSNLoader`: prefetch_batches, epochs)."""
    from app.pipeline import pipeline_spec
    from dataloading.pipeline.loader import TSNLoader, prefetch_depth

    d = cfg.data
    common = {"rank": rank, "world_size": world_size, "device_id": _device_id(cfg, device), "epochs": cfg.train.epochs,
              **shard_access(cfg)}
    train, val = pipeline_spec(cfg, "train"), pipeline_spec(cfg, "val")
    return {"train": TSNLoader(d.shards, d.train_split, train, start_epoch=start_epoch, start_batch=start_batch,
                               remaining=remaining,
                               prefetch_batches=prefetch_depth(train, PREFETCH_BUDGET_BYTES), **common),
            "val": TSNLoader(d.shards, d.val_split, val, prefetch_batches=prefetch_depth(val, PREFETCH_BUDGET_BYTES),
                             **common)}


def shard_access(cfg: Config) -> dict:
    """How a `TSNLoader` reads ``data.shards`` (its ``cache``, ``read_threads`` and
    ``streaming`` arguments): every command that reads shards passes these, so `tsn stream`,
    `tsn eval` and `tsn bench-train` use the node cache as training does."""
    d = cfg.data
    return {"cache": shard_cache(cfg), "read_threads": d.read_requests_in_flight,
            "stage_timing": cfg.loader.stage_timing,
            "streaming": {"ahead_shards": d.fetch_ahead_shards, "requests_in_flight": d.fetch_requests_in_flight,
                          "part_bytes": d.fetch_part_bytes}}


def shard_cache(cfg: Config):
    """The node's shard cache (``data.cache_dir``, ``data.cache_size_bytes``), or None when
    unset or when the shards are local (nothing to cache)."""
    from dataloading.store import storage
    from dataloading.store.cache import ShardCache

    d = cfg.data
    if d.cache_dir is None or not storage.is_uri(d.shards):
        return None
    return ShardCache(d.cache_dir, d.cache_size_bytes)


def build_test_loader(cfg: Config, split: str, device: torch.device, *, rank: int = 0, world_size: int = 1,
                      mode: str = "test"):
    """The test protocol's loader (``model.test_segments`` x ``num_views`` views) over ``split``;
    ``mode="val"``: the val protocol instead (``model.num_segments`` centre crops: `tsn predict
    --fast`), at the same batch size."""
    from app.pipeline import pipeline_spec
    from dataloading.pipeline.loader import TSNLoader

    return TSNLoader(cfg.data.shards, split, pipeline_spec(cfg, mode, cfg.train.test_batch_size_per_worker),
                     rank=rank, world_size=world_size, device_id=_device_id(cfg, device), **shard_access(cfg))
