"""Training checkpoints: one ``torch.save`` file that ``torch.load(weights_only=True)`` reads.

A checkpoint is a dict of tensors, numbers, strings, lists / tuples and dicts only (no pickled
classes), so loading it never runs code from the file::

    format_version  1
    model           the unwrapped TSN's state_dict (no ``module.`` prefix)
    optimizer       optimizer.state_dict()
    scheduler       scheduler.state_dict() or None
    scaler          GradScaler.state_dict() or None
    epoch           the epoch the checkpoint was taken in (0-based)
    step            global optimizer steps done
    loader_position [epoch, batch]: where the train loader resumes (TSNLoader start_epoch /
                    start_batch); [epoch + 1, 0] at an epoch end
    loader_state    {epoch, batch, remaining, num_samples}: the epoch's work left as position
                    intervals of its world-size-independent order (dataloading/planning/order.py), so a
                    resume on another world size splits the rest (written by app/worker.py)
    config          the resolved Config as a plain dict (app.config.config_to_dict)
    metrics         plain dict of numbers (train loss, val top1, ...)
    rng             {'torch': uint8 tensor, 'cuda': [uint8 tensor] , 'numpy': {...},
                     'python': [...]}, or a list of such dicts, one per rank
    meta            plain dict (world_size, global batch, time, ...)

This module defines the format (build, read, restore); writing a file is the run store's
(`app.run_store.write_checkpoint`: atomic, so a crash never leaves a truncated checkpoint).
"""

from __future__ import annotations

import pickle
import random
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tsn.evaluation import unwrap
from tsn.practices import init_from_rgb_checkpoint

FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# RNG states as plain data
# --------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's torch (CPU + CUDA), numpy and python RNG states as tensors / lists."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": [int(py_version), [int(v) for v in py_state], py_gauss],
    }


def set_rng_state(state: Mapping) -> None:
    """Restore what ``rng_state`` returned (CUDA states only when as many devices exist)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))


# --------------------------------------------------------------------------------------------
# Build / read / restore
# --------------------------------------------------------------------------------------------


def checkpoint_state(*, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                     scaler=None, epoch: int, step: int, loader_position: tuple[int, int],
                     config: dict, metrics: dict | None = None, rng: Any = None,
                     meta: dict | None = None) -> dict:
    """The checkpoint dict (layout: module docstring). ``rng``: ``rng_state()`` of this process
    when None, or a list of every rank's states (gathered by `app.worker`'s checkpoint save)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "loader_position": [int(loader_position[0]), int(loader_position[1])],
        "config": config,
        "metrics": dict(metrics or {}),
        "rng": rng if rng is not None else rng_state(),
        "meta": {"time": time.time(), **(meta or {})},
    }


def host_copy(obj: Any) -> Any:
    """A copy of a checkpoint dict (or any nest of dicts / lists / tuples) whose tensors are new
    CPU tensors sharing no memory with the live model and optimizer: what a background writer
    may serialise while training goes on (``state_dict()`` tensors ARE the parameters, and
    ``.cpu()`` of a CPU tensor returns the same tensor). The only part of a checkpoint on the
    training loop's critical path; on GPU the copies go device-to-host."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


def unreadable_reason(error: Exception) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused a file: torch's own
    message is a paragraph of advice (including "set weights_only=False", which would run the
    file's code); keep the line naming the cause."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, pickle.UnpicklingError) or text.startswith("Weights only load failed"):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        cause = next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")), None)
        what = f" ({cause.rstrip('.')})" if cause else ""
        return f"not a weights-only torch checkpoint{what}; pickled objects or code are never loaded"
    if isinstance(error, (EOFError, KeyError)) or "zip archive" in text or "central directory" in text:
        return f"truncated or not a torch checkpoint ({type(error).__name__}: {text.splitlines()[0]})"
    return text.splitlines()[0]


def read_weights_only(path: str | Path, what: str, map_location: str | torch.device = "cpu"):
    """``torch.load(path, weights_only=True)`` with one-line errors starting with ``what`` (the
    file's role, e.g. "model.init_from=PATH"): FileNotFoundError when missing, ValueError when
    unreadable (truncated, foreign, or holding pickled code, which is never run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated / foreign / pickled-objects files
        raise ValueError(f"{what}: cannot be read as a weights-only checkpoint: {unreadable_reason(e)}") from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = read_weights_only(path, str(path), map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a tsn checkpoint (expected a dict with a 'model' entry)")
    if state.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state['format_version']} is newer than this "
                         f"code's ({FORMAT_VERSION})")
    return state


def restore_training(checkpoint: Mapping, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     scheduler=None, scaler=None, *, rank: int = 0, restore_rng: bool = True) -> dict:
    """Load a checkpoint's model / optimizer / scheduler / scaler / RNG state into live objects.

    ``model`` may be DDP-wrapped. RNG: a per-rank list restores entry ``rank``; a single state
    is restored on rank 0 only (other ranks keep their own seeding). Returns
    ``{epoch, step, loader_position (tuple), metrics}``.
    """
    unwrap(model).load_state_dict(checkpoint["model"])
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None and checkpoint.get("scheduler") is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler") is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    rng = checkpoint.get("rng")
    if restore_rng and rng is not None:
        if isinstance(rng, list):
            if rank < len(rng):
                set_rng_state(rng[rank])
        elif rank == 0:
            set_rng_state(rng)
    return {"epoch": int(checkpoint["epoch"]), "step": int(checkpoint["step"]),
            "loader_position": tuple(int(v) for v in checkpoint["loader_position"]),
            "metrics": dict(checkpoint.get("metrics") or {})}


def read_init_from(path: str | Path) -> Mapping:
    """The weights file of ``model.init_from`` (a `tsn train` checkpoint or a bare state dict),
    read weights-only; a one-line ValueError naming it when unreadable or not a mapping. The
    driver calls this before any worker starts (`cluster.job`), the worker again when seeding."""
    state = read_weights_only(path, f"model.init_from={path}")
    if not isinstance(state, Mapping):
        raise ValueError(f"model.init_from={path}: holds a {type(state).__name__}, expected a checkpoint "
                         f"(`tsn train` output) or a state dict")
    return state


def seed_from_rgb_checkpoint(model: nn.Module, path: str | Path) -> list[str]:
    """Cross-modality pre-training from a local RGB checkpoint (ours, or a bare state dict).

    ``tsn.practices.init_from_rgb_checkpoint`` on its model weights: the first conv is
    mean-replicated over the new input channels, every other backbone tensor copied, ``fc`` /
    ``consensus`` copied when the shapes match. Returns the keys left at their init.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from: checkpoint not found: {path}")
    state = read_init_from(path)
    try:
        # A tsn checkpoint keeps the weights under 'model'; practices unwraps that (and
        # {'state_dict': ...} files, 'module.' prefixes) itself.
        return init_from_rgb_checkpoint(unwrap(model), state)
    except ValueError as e:
        raise ValueError(f"model.init_from={path}: {e}") from e

