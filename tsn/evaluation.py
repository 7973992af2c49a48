"""Video-level evaluation: top-1 / top-5 / mean class accuracy, exact under DDP.

Protocols (TSN.md section 6):

* **val** batches ``(B, K, L, C, H, W)``: one centre-crop view per segment; the video score is
  the model's output, i.e. the segmental consensus of the K snippet scores.
* **test** batches ``(B, V, K, L, C, H, W)`` (V = 10 crops, K = ``model.test_segments``, 25
  in the paper): the video score is the *average of the raw class scores* (pre-softmax) of all
  V x K views, as in the authors' test script. This is the average over the snippets whatever
  the training consensus is: a 'weighted' consensus has weights for the K training segments
  only and cannot be applied to 25 test snippets.

Metrics (``compute_metrics``), over N videos and C classes:

* ``top1`` / ``top5``: fraction of videos whose label is among the 1 / min(5, C) highest
  scores (ties: the lower class index ranks first).
* ``mean_class_accuracy``: the authors' metric, the mean over classes of the per-class recall
  (diagonal of the confusion matrix / row sum), over the classes *present* in the evaluated
  set (an absent class has no recall; counting it as 0 would punish a split for its content).
* ``confusion[true, predicted]`` counts (int64, C x C).

Under DDP every rank holds part of the videos (the loader partitions them; a rank may see a
sample twice when parts are padded): ``gather_predictions`` all-gathers
(sample_index, scores, label) from every rank and keeps one row per ``sample_index``, so the
metrics are those of the whole split exactly, on every rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EvalResult:
    """Metrics of one evaluation plus the per-video scores they came from (sorted by
    ``sample_index``). ``per_class_accuracy[c]`` is NaN for a class without videos."""

    top1: float
    top5: float
    mean_class_accuracy: float
    per_class_accuracy: np.ndarray  # (C,) float64
    confusion: np.ndarray  # (C, C) int64, rows = true class, columns = predicted
    sample_index: np.ndarray  # (N,) int64
    label: np.ndarray  # (N,) int64
    scores: np.ndarray  # (N, C) float32 video scores (pre-softmax)
    loss: float = float("nan")  # mean cross-entropy of the video scores
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def num_videos(self) -> int:
        return int(self.sample_index.shape[0])

    def metrics(self, prefix: str = "") -> dict:
        """Plain-JSON summary: ``{prefix}top1``, ``top5``, ``mean_class_accuracy``, ``loss``,
        ``num_videos``, ``seconds``."""
        out = {"top1": self.top1, "top5": self.top5, "mean_class_accuracy": self.mean_class_accuracy,
               "loss": self.loss, "num_videos": self.num_videos, "seconds": self.seconds}
        return {f"{prefix}{k}": v for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Metrics on gathered arrays
# --------------------------------------------------------------------------------------------


def topk_correct(scores: np.ndarray, label: np.ndarray, k: int) -> np.ndarray:
    """(N,) bool: label among the ``min(k, C)`` highest scores (stable: ties -> lower index)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (order == label[:, None]).any(axis=1)


def confusion_matrix(label: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, ``[true, predicted]``."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (label, predicted), 1)
    return cm


def compute_metrics(scores: np.ndarray, label: np.ndarray, num_classes: int) -> dict:
    """top1, top5, mean_class_accuracy, per_class_accuracy, confusion of (N, C) video scores
    and (N,) labels (module docstring for the definitions)."""
    scores = np.asarray(scores, dtype=np.float64)
    label = np.asarray(label, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[1] != num_classes or label.shape != scores.shape[:1]:
        raise ValueError(f"expected scores (N, {num_classes}) and labels (N,), got "
                         f"{scores.shape} and {label.shape}")
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {label.min()}..{label.max()}")
    if label.size == 0:
        nan = float("nan")
        return {"top1": nan, "top5": nan, "mean_class_accuracy": nan,
                "per_class_accuracy": np.full(num_classes, np.nan),
                "confusion": np.zeros((num_classes, num_classes), np.int64)}
    cm = confusion_matrix(label, np.argmax(scores, axis=1), num_classes)
    counts = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(counts > 0, np.diag(cm) / np.maximum(counts, 1), np.nan)
    return {
        "top1": float(topk_correct(scores, label, 1).mean()),
        "top5": float(topk_correct(scores, label, 5).mean()),
        "mean_class_accuracy": float(np.nanmean(per_class)),
        "per_class_accuracy": per_class,
        "confusion": cm,
    }


def dedupe(sample_index: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Keep the first row of each ``sample_index``; return (sample_index, *arrays) sorted by it."""
    sample_index = np.asarray(sample_index, dtype=np.int64)
    unique, first = np.unique(sample_index, return_index=True)
    return (unique, *(np.asarray(a)[first] for a in arrays))


def gather_predictions(sample_index: np.ndarray, scores: np.ndarray, label: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All ranks' (sample_index (N,), scores (N, C), label (N,)), deduplicated by sample_index
    and sorted by it; on every rank. Without an initialised process group: this rank's only.

    Uses ``all_gather_object`` (pickles through the default group: fine for the O(videos x
    classes) numbers of an evaluation, and works on gloo and NCCL alike).
    """
    parts = [(np.asarray(sample_index), np.asarray(scores), np.asarray(label))]
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, parts[0])
        parts = gathered
    idx = np.concatenate([p[0] for p in parts]).astype(np.int64)
    sc = np.concatenate([p[1] for p in parts]).astype(np.float32)
    lb = np.concatenate([p[2] for p in parts]).astype(np.int64)
    sc = sc.reshape(idx.shape[0], -1)
    idx, sc, lb = dedupe(idx, sc, lb)
    return idx, sc, lb


def result_from_predictions(sample_index: np.ndarray, scores: np.ndarray, label: np.ndarray,
                            num_classes: int, *, seconds: float = 0.0) -> EvalResult:
    """EvalResult of already gathered and deduplicated (sample_index, scores, label)."""
    m = compute_metrics(scores, label, num_classes)
    loss = float("nan")
    if len(label):
        loss = float(F.cross_entropy(torch.as_tensor(scores, dtype=torch.float64),
                                     torch.as_tensor(label)).item())
    return EvalResult(top1=m["top1"], top5=m["top5"], mean_class_accuracy=m["mean_class_accuracy"],
                      per_class_accuracy=m["per_class_accuracy"], confusion=m["confusion"],
                      sample_index=np.asarray(sample_index, np.int64), label=np.asarray(label, np.int64),
                      scores=np.asarray(scores, np.float32), loss=loss, seconds=seconds)


# --------------------------------------------------------------------------------------------
# Running a model
# --------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The TSN inside a DDP / DataParallel wrapper (``.module``), else ``model``."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def video_scores(model: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """Video scores (B, C) of one batch under the val or test protocol (module docstring).

    ``frames``: (B, K, L, C, H, W) -> ``model(frames)`` (consensus); (B, V, K, L, C, H, W) ->
    mean of ``forward_snippet_scores`` over the V views and K snippets, one view at a time so
    that only B x K snippets are in the network at once.
    """
    if frames.dim() == 6:
        return model(frames)
    if frames.dim() != 7:
        raise ValueError(f"expected frames (B, K, L, C, H, W) or (B, V, K, L, C, H, W), got {tuple(frames.shape)}")
    total = None
    for v in range(frames.shape[1]):
        s = model.forward_snippet_scores(frames[:, v]).float().sum(dim=1)  # (B, C) summed over K
        total = s if total is None else total + s
    return total / (frames.shape[1] * frames.shape[2])


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str, *, num_classes: int,
             amp: bool = False) -> EvalResult:
    """Evaluate ``model`` on one pass of ``loader``; the result covers all ranks' videos.

    ``loader`` yields objects with ``frames`` (val or test layout), ``label`` (B,) and
    ``sample_index`` (B,). The DDP wrapper is bypassed (``unwrap``): evaluation needs no
    gradient sync, and DDP's buffer broadcast in forward would be a collective per batch.
    ``amp``: autocast float16 (CUDA only). Every rank must call this (it all-gathers).
    The model is left in eval mode.
    """
    t0 = time.perf_counter()
    net = unwrap(model)
    net.eval()
    device = torch.device(device)
    idx, scores, labels = [], [], []
    for batch in loader:
        frames = batch.frames.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16,
                            enabled=amp and device.type == "cuda"):
            s = video_scores(net, frames)
        scores.append(s.float().cpu().numpy())
        labels.append(batch.label.reshape(-1).cpu().numpy())
        idx.append(batch.sample_index.reshape(-1).cpu().numpy())
    empty = np.zeros((0, num_classes), np.float32)
    local = (np.concatenate(idx) if idx else np.zeros(0, np.int64),
             np.concatenate(scores) if scores else empty,
             np.concatenate(labels) if labels else np.zeros(0, np.int64))
    sample_index, all_scores, all_labels = gather_predictions(*local)
    return result_from_predictions(sample_index, all_scores, all_labels, num_classes,
                                   seconds=time.perf_counter() - t0)
