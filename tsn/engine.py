"""One training epoch and one evaluation pass (in the style of torchvision's video reference).

Every function takes its dependencies as arguments and works with or without an initialised
``torch.distributed`` process group (a DDP-wrapped model is fine). Mixed precision is used only
on CUDA, when a ``GradScaler`` is passed.

Per optimizer step ``train_one_epoch`` measures, on this rank:

* ``data_wait_s``: wall time blocked in ``next(loader)`` (the data path's share),
* ``step_s``: wall time of the whole iteration, data wait included (so
  ``data_wait_s / step_s`` is the fraction of time starved of data),
* ``compute_s = step_s - data_wait_s`` (forward, backward, clip, optimizer step; on CUDA the
  loss read-back synchronises, so it includes the GPU work),
* ``videos`` (real samples of the batch), ``frames`` (decoded frames: K x frames per snippet x
  entries, padding included: the data path decoded them),
* ``world_size``, ``global_batch_size`` (per-worker batch x world size) and ``sample_index``
  (the split's sample indices of the batch's real entries, a list: a run's step logs give the
  multiset of samples it trained on).

Padding rule (batches with ``real``, the training loader's `dataloading.pipeline.loader.Batch`): the
loss backpropagated on a rank is ``sum over real entries of cross-entropy / B`` (B = the batch's
entries = the per-worker batch size), so padded entries weigh nothing and every real sample
weighs ``1 / (world_size * B)`` in the step's (DDP-averaged) gradient, as in a full step: a
partly padded step is a smaller global batch at the same per-sample weight, the linear
scaling rule's view. The reported loss is the mean over the real entries (0.0, and left out of
the epoch's mean, on a step where this rank has none). A batch without ``real`` is all real.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tsn.schedule import current_lr


def _frames_in(batch, frames: torch.Tensor) -> int:
    """Decoded frames of a batch: its frame indices when the loader reports them (rgb_diff reads
    L + 1 frames per snippet), else B x K x L."""
    fi = getattr(batch, "frame_indices", None)
    return int(fi.numel()) if fi is not None else int(math.prod(frames.shape[:3]))


def train_step(model: nn.Module, frames: torch.Tensor, label: torch.Tensor,
               optimizer: torch.optim.Optimizer, *, clip_grad_norm: float | None = None,
               scaler: torch.amp.GradScaler | None = None,
               real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step on one batch: cross-entropy on the consensus scores, backward,
    optional clipping of the total gradient L2 norm, step.

    ``frames`` (B, K, L, C, H, W) and ``label`` (B,) already on the model's device. With a
    ``scaler`` the forward runs under float16 autocast (CUDA) and gradients are unscaled before
    clipping. ``real`` (B,) bool: which entries are real (the padding rule, module docstring);
    None = all. Returns (loss (detached scalar: the mean over real entries, 0 when there is
    none), total gradient norm before clipping or None).
    """
    optimizer.zero_grad(set_to_none=True)
    device_type = frames.device.type
    masked = real is not None and not bool(real.all())
    with torch.autocast(device_type=device_type, dtype=torch.float16, enabled=scaler is not None):
        scores = model(frames)
        if masked:
            weight = real.to(device=scores.device, dtype=torch.float32)
            per_sample = F.cross_entropy(scores.float(), label, reduction="none") * weight
            loss = per_sample.sum() / len(label)
            reported = per_sample.sum().detach() / max(int(real.sum()), 1)
        else:
            loss = F.cross_entropy(scores.float(), label)
    grad_norm = None
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = nn.utils.clip_grad_norm_(_trainable(optimizer), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad_norm is not None:
            grad_norm = nn.utils.clip_grad_norm_(_trainable(optimizer), clip_grad_norm)
        optimizer.step()
    return (reported if masked else loss.detach()), grad_norm


def _trainable(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    # The optimizer's parameters are exactly the trainable ones (Partial BN's frozen affine
    # parameters are in no group), so the norm is over what is actually updated.
    return [p for g in optimizer.param_groups for p in g["params"]]


class TrainingStopped(Exception):
    """The run stopped on request (`app.preemption`) after checkpointing at global ``step``."""

    def __init__(self, reason: str, *, epoch: int, step: int):
        super().__init__(f"stopped at epoch {epoch} step {step}: {reason}")
        self.reason, self.epoch, self.step = reason, epoch, step


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler,
                    device: torch.device | str, *, epoch: int, clip_grad_norm: float | None = None,
                    scaler: torch.amp.GradScaler | None = None, hooks: Any = None,
                    start_step: int = 0, checkpoint_every_n_steps: int = 0,
                    carry: tuple[float, int] | None = None) -> dict:
    """Train on one pass of ``loader`` (the rest of the epoch when the loader resumes mid-epoch).

    ``loader`` yields objects with ``frames`` (B, K, L, C, H, W) and ``label`` (B,); ``scheduler``
    (or None) is stepped after every optimizer step. ``start_step``: global optimizer steps done
    before this call; step ``s`` below is the global count *after* the step (1-based).
    ``hooks`` (optional) gets ``hooks.on_step({epoch, step, loss, lr, grad_norm, videos, frames,
    data_wait_s, step_s, compute_s, h2d_s, world_size, global_batch_size, sample_index})`` after every step and, when ``checkpoint_every_n_steps``
    > 0, ``hooks.checkpoint({epoch, step, train_loss, epoch_loss_sum, epoch_steps})`` after every
    step ``s`` divisible by it, except on the epoch's last batch (the caller checkpoints at the
    epoch end anyway). When ``hooks`` has ``should_stop()`` it is called after every step on
    every rank (it may run a collective) and returns a reason or None: with a reason, the step
    is checkpointed the same way and `TrainingStopped` raised (on the epoch's last batch the
    caller's epoch-end checkpoint stands for it). Both are called on every rank at the same steps (all ranks have equal
    batch counts); ``epoch_loss_sum`` / ``epoch_steps`` are this epoch's sums over all ranks so
    far (a collective; steps where a rank had no real entry are not counted for it), which a
    resumed call gets back as ``carry`` so that the epoch's mean loss is the one an uninterrupted
    epoch would have had. Pass the same ``carry`` on every rank.

    Returns this call's summary: ``epoch, steps, global_step, loss`` (the epoch's mean over
    steps and ranks, ``carry`` included), ``videos`` (real samples) / ``frames`` (this rank), ``seconds``,
    ``data_wait_s`` (sums),
    ``videos_per_s`` (this rank), ``lr`` (after the last step).
    """
    device = torch.device(device)
    model.train()
    num_batches = len(loader) if hasattr(loader, "__len__") else None
    step = start_step
    world_size = _world_size()
    loss_sum, steps, loss_steps, videos, frames_total, data_wait_total = 0.0, 0, 0, 0, 0, 0.0
    # The epoch's steps before a resume, over all ranks: counted once (on rank 0).
    carry_loss, carry_steps = carry if carry is not None and _rank() == 0 else (0.0, 0)
    t_epoch = time.perf_counter()
    iterator = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        t_data = time.perf_counter()
        frames = batch.frames.to(device, non_blocking=True)
        label = batch.label.to(device, non_blocking=True)
        t_copy = time.perf_counter()  # issuing the copies (from pinned memory on CUDA they overlap the step)
        real = getattr(batch, "real", None)
        loss, grad_norm = train_step(model, frames, label, optimizer, clip_grad_norm=clip_grad_norm,
                                     scaler=scaler, real=real)
        if scheduler is not None:
            scheduler.step()
        loss_value = float(loss.item())  # also synchronises CUDA: step_s includes the GPU work
        b, n_frames = int(frames.shape[0]), _frames_in(batch, frames)
        n_real = b if real is None else int(real.sum())
        if n_real and not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at epoch {epoch}, step {step + 1}")
        t_end = time.perf_counter()
        step, steps = step + 1, steps + 1
        if n_real:
            loss_sum, loss_steps = loss_sum + loss_value, loss_steps + 1
        videos, frames_total = videos + n_real, frames_total + n_frames
        data_wait_total += t_data - t0
        if hooks is not None:
            index = getattr(batch, "sample_index", None)
            index = [] if index is None else (index if real is None else index[real])
            hooks.on_step({"epoch": epoch, "step": step, "loss": loss_value, "lr": current_lr(optimizer),
                           "grad_norm": None if grad_norm is None else float(grad_norm),
                           "videos": n_real, "frames": n_frames, "data_wait_s": t_data - t0,
                           "step_s": t_end - t0, "compute_s": t_end - t_data, "h2d_s": t_copy - t_data,
                           "world_size": world_size,
                           "global_batch_size": b * world_size, "sample_index": [int(i) for i in index]})
            last_batch = num_batches is not None and _position_in_epoch(loader, steps) >= num_batches
            stop = hooks.should_stop() if hasattr(hooks, "should_stop") else None  # collective
            due = checkpoint_every_n_steps and step % checkpoint_every_n_steps == 0
            if (due or stop) and not last_batch:
                total, count = _sum_over_ranks(carry_loss + loss_sum, carry_steps + loss_steps, device)
                hooks.checkpoint({"epoch": epoch, "step": step, "train_loss": total / count,
                                  "epoch_loss_sum": total, "epoch_steps": count})
                if stop:
                    raise TrainingStopped(stop, epoch=epoch, step=step)
    seconds = time.perf_counter() - t_epoch
    total, count = _sum_over_ranks(carry_loss + loss_sum, carry_steps + loss_steps, device)
    return {"epoch": epoch, "steps": steps, "global_step": step,
            "loss": total / count if count else float("nan"), "videos": videos,
            "frames": frames_total, "seconds": seconds, "data_wait_s": data_wait_total,
            "videos_per_s": videos / seconds if seconds > 0 else 0.0, "lr": current_lr(optimizer)}


def _position_in_epoch(loader, steps_this_call: int) -> int:
    """Batches of the epoch delivered so far: ``loader.position[1]`` for a resumable TSNLoader,
    else the steps of this call."""
    position = getattr(loader, "position", None)
    return int(position[1]) if position is not None else steps_this_call


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def _sum_over_ranks(total: float, count: int, device: torch.device) -> tuple[float, int]:
    """(sum(total), sum(count)) over all ranks (this rank's values without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        # NCCL reduces CUDA tensors only; gloo CPU ones.
        on = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=on)
        torch.distributed.all_reduce(t)
        total, count = float(t[0]), int(t[1])
    return total, count
