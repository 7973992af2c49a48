"""What the training loop (`app.worker.train`) calls out to: the ``TrainHooks`` contract, the
local implementation (``LocalHooks``: checkpoints in the run store), the adapter the engine
sees, and the one epoch console line.

Hooks contract (every method is called on EVERY rank at the same points):

* ``load_latest() -> dict | None``: the checkpoint to resume from (a `tsn.checkpoint` dict).
* ``save_checkpoint(state_fn, metrics)``: ``state_fn()`` builds the checkpoint dict from the
  live objects; call it (on one rank suffices) before returning. ``metrics`` carries ``epoch``,
  ``step`` and, at epoch ends, ``val_top1`` etc. ``state_fn`` runs no collective (one rank
  calls it): every collective it needs has run before the hook is called. The checkpoint may
  be written after the hook returns (`app.checkpoint_writer`: from a host copy taken before).
* ``best_checkpoint() -> dict | None``: the checkpoint for the final test evaluation, once every
  checkpoint saved before has been written and recorded.
* ``close(wait)``: the end of the run (``wait=False``: it failed); a checkpoint being written
  is finished first when waiting.
* ``stop_requested() -> str | None``: local and cheap, after every step: why this process should
  stop (`app.preemption`; the default reads ``app.preemption.STOP``), else None.
* ``flush()``: every checkpoint saved so far is stored (before a stopped run ends).
* ``on_stop(m)``: the run stops on request after checkpointing (``m``: reason, ranks, epoch,
  step, seconds from the request to the stored checkpoint).
* ``on_step(metrics)``, ``on_epoch_end(metrics)``, ``on_eval(metrics)``: observation only.

The Ray job's implementation is `cluster.ray_hooks.RayHooks`; both keep the same checkpoint index
and retention rule (`app.run_store`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from app import distributed
from app.checkpoint_writer import CheckpointWriter
from app.preemption import STOP, stop_agreed
from app.run_store import RunStore, StepLog
from tsn.checkpoint import host_copy, load_checkpoint

log = logging.getLogger(__name__)


def format_epoch_line(m: dict) -> str:
    """The console line of an epoch end (the loop's epoch metrics), local and Ray runs alike."""
    wait = m.get("data_wait_s", 0.0) / m["train_seconds"] if m.get("train_seconds") else 0.0
    return (f"epoch {m.get('epoch')} done (step {m.get('step')}): train loss {m.get('train_loss', 0):.4f} | val "
            f"top1 {m.get('val_top1', 0):.3f} top5 {m.get('val_top5', 0):.3f} mean class acc "
            f"{m.get('val_mean_class_accuracy', 0):.3f} | {m.get('train_videos_per_s', 0):.1f} videos/s, "
            f"data wait {100 * wait:.0f}% | {m.get('epoch_seconds', 0):.1f}s")


def resume_fresh_warning(run_dir, count: int, newest_problem: str) -> str:
    """The one line a run says when every checkpoint it has is unreadable (truncated by a full
    disk or a crash mid-copy) and it starts over.

    Why start over rather than fail: re-running the command is how a run resumes, and it must
    make progress whoever died and whenever; nothing usable is lost (the files cannot be read),
    and the epochs those checkpoints covered are dropped from history.jsonl, so no epoch is
    listed twice. A user who would rather keep the run as it is stops here (Ctrl-C) and
    inspects the files the line names."""
    return (f"{run_dir}: none of its {count} checkpoint(s) can be read (newest: {newest_problem}); starting "
            f"the run over from epoch 0 and resetting history.jsonl")


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

    def close(self, wait: bool = True) -> None:
        pass

    def stop_requested(self) -> str | None:
        return STOP.reason

    def flush(self) -> None:
        pass

    def on_stop(self, m: dict) -> None:
        pass


class LocalHooks(TrainHooks):
    """Checkpoints and logs in a local run directory (``tsn train --local``).

    * checkpoints: `RunStore.save_checkpoint` (``checkpoints/ckpt-e{epoch}-s{step}.pt`` and the
      index, retention by ``checkpoint.keep_last`` / ``keep_best``), written by rank 0 in the
      background (`app.checkpoint_writer`) from a host copy of the state; the other ranks do
      not wait for it. ``best_checkpoint`` waits for the write in flight, then a barrier, so
      every rank sees the file. Resuming falls back to an older checkpoint when the newest
      cannot be read.
    * ``metrics.jsonl``: one event per epoch end and per evaluation (rank 0).
    * a log line every ``train.log_every_n_steps`` steps (means over the window) and one per
      epoch (rank 0).
    """

    def __init__(self, run_dir: str | Path, cfg):
        self.store = RunStore(run_dir)
        self.cfg = cfg
        self._window: list[dict] = []  # step metrics since the last log line
        self.writer = CheckpointWriter()

    def load_latest(self) -> dict | None:
        """The newest readable checkpoint of the index (older ones when newer cannot be read),
        else None. Rank 0 then cuts history.jsonl back to the epochs before the resume point;
        when checkpoints exist but none can be read, that is said in one warning and the run
        starts over with an empty history (`resume_fresh_warning`)."""
        state, unreadable = None, []
        for entry in reversed(self.store.checkpoint_entries()):
            path = self.store.local_checkpoint_path(entry)
            try:
                state = load_checkpoint(path)
                break
            except (FileNotFoundError, ValueError) as e:  # fall back to an older one
                unreadable.append(str(e))
        if distributed.rank() == 0:
            if state is not None:
                for problem in unreadable:
                    log.warning("skipping checkpoint: %s", problem)  # it names the file
            elif unreadable:  # one line, not one per file
                log.warning("%s", resume_fresh_warning(self.store.dir, len(unreadable), unreadable[0]))
                # Its entries name unreadable files: the retention rule must not keep one as "best".
                self.store.index_path.unlink(missing_ok=True)
            self.store.truncate_history(state["loader_position"][0] if state is not None else 0)
        return state

    def best_checkpoint(self) -> dict | None:
        self.writer.wait()  # rank 0's last checkpoint recorded, then every rank reads the index
        distributed.barrier()
        best = self.store.best_checkpoint_entry()
        return load_checkpoint(self.store.local_checkpoint_path(best)) if best else None

    def save_checkpoint(self, state_fn: Callable[[], dict], metrics: dict) -> None:
        if distributed.rank() != 0:
            return
        state = host_copy(state_fn())

        def write() -> None:
            t0 = time.perf_counter()
            path = self.store.save_checkpoint(state, metrics, keep_last=self.cfg.checkpoint.keep_last,
                                              keep_best=self.cfg.checkpoint.keep_best)
            log.info("checkpoint %s (epoch %d, step %d; written in %.2fs)", path, state["epoch"], state["step"],
                     time.perf_counter() - t0)
        self.writer.submit(write)
        if not self.cfg.checkpoint.background:
            self.writer.wait()

    def close(self, wait: bool = True) -> None:
        self.writer.close(wait=wait)

    def flush(self) -> None:
        self.writer.wait()

    def on_stop(self, m: dict) -> None:
        if distributed.rank() == 0:
            log.warning("stopped (%s) at epoch %d step %d: checkpoint stored %.1fs after the request; the same "
                        "command resumes at that step", m["reason"], m["epoch"], m["step"], m["stop_s"])
            self.store.append_event({"event": "stopped", **m})

    def on_step(self, metrics: dict) -> None:
        every = self.cfg.train.log_every_n_steps
        if distributed.rank() != 0 or not every:
            return
        self._window.append(metrics)
        if metrics["step"] % every == 0:
            w, self._window = self._window, []
            seconds = sum(m["step_s"] for m in w)
            log.info("epoch %d step %d: loss %.4f lr %.3g | %.1f videos/s, data wait %.0f%%",
                     metrics["epoch"], metrics["step"], sum(m["loss"] for m in w) / len(w), metrics["lr"],
                     sum(m["videos"] for m in w) / seconds, 100 * sum(m["data_wait_s"] for m in w) / seconds)

    def on_epoch_end(self, metrics: dict) -> None:
        if distributed.rank() != 0:
            return
        self._window = []
        log.info("%s", format_epoch_line(metrics))
        self.store.append_event({"event": "epoch_end", **metrics})

    def on_eval(self, metrics: dict) -> None:
        if distributed.rank() == 0:
            self.store.append_event({"event": "eval", **metrics})


class EngineHooks:
    """What `tsn.engine.train_one_epoch` calls: each step's metrics, with the loader's epoch
    progress and skipped-sample count added, go to this rank's step log and (with the run's
    ``total_steps`` and this process's ``start_step``, for ETAs) to the user's hooks;
    ``checkpoint(metrics)`` is the loop's mid-epoch save."""

    def __init__(self, hooks: TrainHooks, step_log: StepLog, loader, *, checkpoint: Callable[[dict], None],
                 total_steps: int, start_step: int, device="cpu", trackers=None):
        self.hooks, self.step_log, self.loader, self.checkpoint = hooks, step_log, loader, checkpoint
        self.trackers = trackers  # app.tracking.Trackers (rank 0's step metrics), or None
        self.extra = {"total_steps": total_steps, "start_step": start_step}
        self.device = device
        self.stopping: dict | None = None  # once agreed: {reason, ranks, requested_at}

    def should_stop(self) -> str | None:
        """Collective, after every step (`app.preemption`): the reason to stop once any rank was
        asked to, else None; the same on every rank, and it stays set."""
        if self.stopping is None:
            local = self.hooks.stop_requested()
            ranks = stop_agreed(local, self.device)
            if ranks:
                # Rare: the reasons and request times travel once (a rank may have both).
                asked = [a for a in distributed.all_gather((local, STOP.requested_at)) if a[0] is not None]
                reasons = sorted({reason for reason, _ in asked})
                self.stopping = {"reason": f"{', '.join(reasons)} (rank{'s' if len(ranks) > 1 else ''} "
                                           f"{', '.join(map(str, ranks))})",
                                 "ranks": ranks, "requested_at": min(t or time.time() for _, t in asked)}
        return self.stopping["reason"] if self.stopping else None

    def on_step(self, metrics: dict) -> None:
        stages = getattr(self.loader, "stage_times", None)
        metrics = {**metrics, "step_in_epoch": self.loader.position[1], "steps_per_epoch": len(self.loader),
                   "skipped_samples": len(getattr(self.loader, "skipped", ())),  # cumulative
                   "input_stages": stages.snapshot() if stages is not None and stages.enabled else {}}  # cumulative
        self.step_log.write(metrics)
        self.hooks.on_step({**metrics, **self.extra})
        if self.trackers is not None:
            self.trackers.step(metrics)
