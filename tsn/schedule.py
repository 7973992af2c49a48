"""Optimiser and learning-rate schedule of TSN training.

* ``build_optimizer``: SGD (momentum 0.9 in the paper) over ``tsn.practices.param_groups``:
  every group carries its own ``lr_mult`` / ``decay_mult`` (first conv x5 / x10 for motion
  nets, biases x2 and no decay, ...).
* ``scaled_lr``: the linear scaling rule. ``optim.lr`` is specified for a reference *global*
  batch of ``optim.lr_reference_batch`` videos; a run with a global batch of
  ``batch_size_per_worker * world_size`` videos uses ``lr * global / reference``.
  ``lr_reference_batch = 0`` turns scaling off (``optim.lr`` is used as given). The authors
  trained with a global batch of 128 (TSN.md section 5): ``lr_reference_batch: 128`` keeps
  their lr meaning when the number of workers changes.
* ``WarmupStepLR``: per-iteration schedule. With ``it`` optimizer steps done, ``S`` steps per
  epoch and ``W = ceil(warmup_epochs * S)`` warmup iterations, every group gets::

      lr_group = base_lr_group * warmup(it) * lr_gamma ** #{e in lr_steps : e * S <= it}
      warmup(it) = (it + 1) / W   for it < W,   1 afterwards

  where ``base_lr_group = lr * lr_mult`` (the group's lr when the scheduler was built), so the
  per-group multipliers are preserved. ``lr_steps`` are in epochs.  Call ``scheduler.step()``
  once after every optimizer step.

  Elastic runs: ``S`` is a whole epoch's steps at the *current* world size, so warmup and the
  step milestones stay in epochs when the world size changes. A run resumed at another world
  size continues with `WarmupStepLR.restart` at iteration ``epoch * S + round(S * done)``
  (``done``: the fraction of the epoch's samples already used) and its new base lr (the
  linear scaling rule on the new global batch); at every later epoch start the loop puts the
  count back on ``epoch * S`` (a no-op unless the resized epoch took another number of steps),
  so milestones fall exactly on epoch boundaries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from tsn.practices import param_groups


def scaled_lr(lr: float, global_batch_size: int, reference_batch_size: int) -> float:
    """The linear scaling rule: ``lr * global_batch_size / reference_batch_size``.

    ``reference_batch_size = 0`` means "no scaling" and returns ``lr`` unchanged.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if reference_batch_size < 0:
        raise ValueError(f"reference_batch_size must be >= 0, got {reference_batch_size}")
    if reference_batch_size == 0:
        return lr
    return lr * global_batch_size / reference_batch_size


def build_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float,
                    first_conv_lr_mult: Sequence[float] | None = None) -> torch.optim.SGD:
    """SGD over the authors' parameter groups of ``model`` (unwrap DDP first: ``ddp.module``).

    Group ``g`` starts at ``lr * g['lr_mult']`` with weight decay ``weight_decay *
    g['decay_mult']``; ``first_conv_lr_mult`` None picks the modality's default.
    """
    groups = param_groups(model, lr, weight_decay,
                          None if first_conv_lr_mult is None else tuple(first_conv_lr_mult))
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def warmup_iterations(warmup_epochs: float, steps_per_epoch: int) -> int:
    """``ceil(warmup_epochs * steps_per_epoch)``: a fractional warmup covers at least the span
    asked for (the 1e-9 absorbs float products such as 0.1 * 30 = 3.0000000000000004)."""
    return max(0, math.ceil(warmup_epochs * steps_per_epoch - 1e-9))


def lr_factor(iteration: int, *, steps_per_epoch: int, lr_steps: Sequence[float] = (),
              lr_gamma: float = 0.1, warmup_epochs: float = 0.0) -> float:
    """Multiplier of every group's base lr after ``iteration`` optimizer steps (formula: module
    docstring)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    warmup_iters = warmup_iterations(warmup_epochs, steps_per_epoch)
    factor = (iteration + 1) / warmup_iters if iteration < warmup_iters else 1.0
    # Compare in iterations (integers when the steps are whole epochs): no float round-off at
    # the boundary.
    decays = sum(1 for e in lr_steps if iteration >= e * steps_per_epoch)
    return factor * lr_gamma ** decays


class WarmupStepLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup then step decay, per iteration; each group keeps its own base lr.

    ``last_epoch`` (torch's name) counts *iterations* here. The state dict holds only numbers,
    lists and tuples, so it loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int,
                 lr_steps: Sequence[float] = (), lr_gamma: float = 0.1, warmup_epochs: float = 0.0,
                 last_epoch: int = -1):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.steps_per_epoch = int(steps_per_epoch)
        self.lr_steps = tuple(float(e) for e in lr_steps)
        self.lr_gamma = float(lr_gamma)
        self.warmup_epochs = float(warmup_epochs)
        super().__init__(optimizer, last_epoch)

    def factor(self, iteration: int) -> float:
        return lr_factor(iteration, steps_per_epoch=self.steps_per_epoch, lr_steps=self.lr_steps,
                         lr_gamma=self.lr_gamma, warmup_epochs=self.warmup_epochs)

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def restart(self, iteration: int, lr: float | None = None) -> None:
        """Continue the schedule as if ``iteration`` optimizer steps of ``steps_per_epoch`` had
        been done; with ``lr``, every group's base lr becomes ``lr * lr_mult`` (a resume whose
        global batch changed). Sets the groups' lr at once."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["initial_lr"] = lr * group.get("lr_mult", 1.0)
            self.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        self.last_epoch = int(iteration)
        for group, value in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = value
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, *, steps_per_epoch: int,
                    lr_steps: Sequence[float] = (), lr_gamma: float = 0.1,
                    warmup_epochs: float = 0.0) -> WarmupStepLR:
    """``WarmupStepLR`` on ``optimizer``; sets the groups' lr for iteration 0 at once."""
    if any(not math.isfinite(e) for e in lr_steps):
        raise ValueError(f"lr_steps must be finite epochs, got {list(lr_steps)}")
    return WarmupStepLR(optimizer, steps_per_epoch=steps_per_epoch, lr_steps=lr_steps,
                        lr_gamma=lr_gamma, warmup_epochs=warmup_epochs)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's lr for ``lr_mult`` 1: group lr / lr_mult of the first group."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_mult", 1.0)
