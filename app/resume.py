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


def check_resumable(checkpoint: dict, cfg: Config, world_size: int, where: str) -> None:
    """Fail when the data order of the checkpoint's run cannot be continued (another world size
    or per-worker batch); warn on other config differences."""
    meta = checkpoint.get("meta", {})
    old = (meta.get("world_size"), meta.get("batch_size_per_worker"))
    new = (world_size, cfg.train.batch_size_per_worker)
    if None not in old and old != new:
        raise ValueError(f"{where}: the run was trained with world_size={old[0]}, "
                         f"train.batch_size_per_worker={old[1]}; resuming with {new[0]}, {new[1]} would "
                         f"change its data order and schedule; use a new run dir (and model.init_from)")
    before, now = checkpoint.get("config") or {}, config_to_dict(cfg)
    changed = [f"{s}.{k}: {before[s][k]!r} -> {v!r}" for s, sec in now.items() for k, v in sec.items()
               if s in before and k in before[s] and before[s][k] != v]
    if changed:
        log.warning("resuming with a changed config: %s", "; ".join(changed))


def epoch_carry(checkpoint: dict | None, epoch: int, start_epoch: int, start_batch: int) -> tuple[float, int] | None:
    """The loss sums of the steps a mid-epoch checkpoint already holds for ``epoch`` (so the
    resumed epoch reports the same mean loss as an uninterrupted one), else None."""
    if checkpoint is None or epoch != start_epoch or start_batch == 0:
        return None
    m = checkpoint.get("metrics") or {}
    return (float(m["epoch_loss_sum"]), int(m["epoch_steps"])) if "epoch_steps" in m else None
