"""Resuming a run: is it finished, may it continue, what an interrupted epoch carries over."""

from __future__ import annotations

import logging

from app import distributed
from app.config import Config, config_to_dict
from app.run_store import RunStore

log = logging.getLogger(__name__)


def finished_results(store: RunStore, checkpoint: dict | None, cfg: Config) -> dict | None:
    """results.json of a run that trained all epochs and was test-evaluated at this checkpoint,
    else None (rank 0 decides, every rank gets the answer)."""
    found = None
    if distributed.rank() == 0 and checkpoint is not None and checkpoint["loader_position"][0] >= cfg.train.epochs:
        results = store.read_results() or {}  # a damaged results.json: redo the final evaluation
        if results.get("finished") and results.get("steps") == checkpoint["step"]:
            found = results
    return distributed.broadcast_from_rank0(found)


# Config keys the checkpoint's weights are shaped by: with another value they do not load
# (model.num_segments too under the weighted consensus, which holds a weight per segment).
WEIGHT_SHAPING_KEYS = (("model", "backbone"), ("model", "modality"), ("model", "snippet_length"),
                       ("model", "consensus"))


def config_changes(checkpoint: dict, cfg: Config) -> list[str]:
    """``section.key: old -> new`` for every config value that differs from the checkpoint's."""
    before, now = checkpoint.get("config") or {}, config_to_dict(cfg)
    return [f"{s}.{k}: {before[s][k]!r} -> {v!r}" for s, sec in now.items() for k, v in sec.items()
            if s in before and k in before[s] and before[s][k] != v]


def check_resumable(checkpoint: dict, cfg: Config, world_size: int, where: str,
                    manifest: dict | None = None) -> None:
    """Fail when the checkpoint's run cannot be continued: another per-worker batch (the batch
    and learning-rate rule keeps it fixed), a model whose weights the checkpoint's do not fit
    (`WEIGHT_SHAPING_KEYS`), a dataset (``manifest``) of other classes or too few samples for
    the interrupted epoch, or a mid-epoch checkpoint without the exact data state
    (`loader_resume`). Another world size is fine (the rest of the epoch is split over it; the
    lr follows the global batch). Warn on other config differences."""
    meta = checkpoint.get("meta", {})
    before, now = checkpoint.get("config") or {}, config_to_dict(cfg)
    keys = list(WEIGHT_SHAPING_KEYS) + ([("model", "num_segments")] if now["model"]["consensus"] == "weighted" else [])
    shaped = [(f"{s}.{k}", before[s][k], now[s][k]) for s, k in keys
              if k in before.get(s, {}) and before[s][k] != now[s][k]]
    if shaped:
        said = ", ".join(f"{name}={old!r} (now {new!r})" for name, old, new in shaped)
        raise ValueError(f"{where}: its checkpoints hold weights for {said}, which the new value cannot load; "
                         f"resume with the run's values, or train in a new run dir (model.init_from=<a checkpoint "
                         f"of this run> starts from its weights)")
    old_classes, classes = meta.get("class_names"), (manifest or {}).get("classes")
    if old_classes is not None and classes is not None and list(old_classes) != list(classes):
        raise ValueError(f"{where}: the run was trained on {len(old_classes)} classes ({_few(old_classes)}), "
                         f"data.shards={cfg.data.shards} has {len(classes)} ({_few(classes)}), or in another "
                         f"order: its classifier cannot continue on them; point data.shards back at the run's "
                         f"dataset, or train in a new run dir")
    old_batch = meta.get("batch_size_per_worker")
    if old_batch is not None and old_batch != cfg.train.batch_size_per_worker:
        raise ValueError(f"{where}: the run was trained with train.batch_size_per_worker={old_batch}; resuming "
                         f"with {cfg.train.batch_size_per_worker} would change its data accounting and schedule "
                         f"(elastic runs keep the per-worker batch and scale the lr with the world size); use "
                         f"a new run dir (and model.init_from)")
    if meta.get("world_size") not in (None, world_size):
        log.info("%s: resuming a run trained with world_size=%s on world_size=%d: the rest of the epoch is "
                 "split over %d ranks", where, meta.get("world_size"), world_size, world_size)
    _, _, remaining = loader_resume(checkpoint, where)
    split = ((manifest or {}).get("splits") or {}).get(cfg.data.train_split) or {}
    if remaining and "num_samples" in split and max(end for _, end in remaining) > int(split["num_samples"]):
        raise ValueError(f"{where}: its interrupted epoch covers samples up to {max(end for _, end in remaining)}, "
                         f"data.shards={cfg.data.shards} has {split['num_samples']} in split {cfg.data.train_split!r} "
                         f"(another dataset?); point data.shards back at the run's dataset, or train in a new run dir")
    changed = config_changes(checkpoint, cfg)
    if changed:
        log.warning("resuming with a changed config: %s", "; ".join(changed))


def _few(names, n: int = 3) -> str:
    return ", ".join(map(str, list(names)[:n])) + (", ..." if len(names) > n else "")


def epoch_carry(checkpoint: dict | None, epoch: int, start_epoch: int, start_batch: int) -> tuple[float, int] | None:
    """The loss sums of the steps a mid-epoch checkpoint already holds for ``epoch`` (so the
    resumed epoch reports the same mean loss as an uninterrupted one), else None."""
    if checkpoint is None or epoch != start_epoch or start_batch == 0:
        return None
    m = checkpoint.get("metrics") or {}
    return (float(m["epoch_loss_sum"]), int(m["epoch_steps"])) if "epoch_steps" in m else None


def loader_resume(checkpoint: dict | None, where: str = "checkpoint") -> tuple[int, int, list | None]:
    """(start_epoch, start_batch, remaining) for the train loader (`TSNLoader`): the
    checkpoint's ``loader_state`` (epoch, steps done, position intervals left), or at an epoch
    end of an older checkpoint its ``loader_position`` (epoch, 0) with the whole epoch left.
    A mid-epoch checkpoint without ``loader_state`` (written before exact data accounting) is
    refused: its data order cannot be continued."""
    if checkpoint is None:
        return 0, 0, None
    epoch, batch = (int(v) for v in checkpoint["loader_position"])
    state = checkpoint.get("loader_state")
    if state is None:
        if batch:
            raise ValueError(f"{where}: mid-epoch checkpoint (loader_position [{epoch}, {batch}]) without "
                             f"'loader_state': written before exact data accounting, its epoch cannot be "
                             f"continued; resume from an epoch-end checkpoint (remove the later ones from "
                             f"checkpoints.json) or use a new run dir")
        return epoch, 0, None
    if (int(state["epoch"]), int(state["batch"])) != (epoch, batch):
        raise ValueError(f"{where}: loader_state at ({state['epoch']}, {state['batch']}) disagrees with "
                         f"loader_position [{epoch}, {batch}]")
    return epoch, batch, [tuple(int(v) for v in pair) for pair in state["remaining"]]


def schedule_iteration(steps_per_epoch: int, epoch: int, remaining: list | None, num_samples: int) -> int:
    """Where the per-iteration lr schedule (`tsn.schedule.WarmupStepLR`, ``steps_per_epoch`` at
    the current world size) continues a run resumed at another world size: ``epoch *
    steps_per_epoch`` plus the used fraction of the epoch's samples in steps, rounded."""
    left = num_samples if remaining is None else sum(b - a for a, b in remaining)
    return epoch * steps_per_epoch + round(steps_per_epoch * (num_samples - left) / max(num_samples, 1))
