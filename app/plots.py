"""PNG plots of a finished run, from files in its run directory (no server needed).

- ``history.jsonl`` (one JSON object per epoch: ``epoch``, ``train_loss``, ``val_top1``,
  ``val_top5``, ``val_mean_class_accuracy``, ``lr``, ...) -> ``curves.png``
- ``confusion.csv`` (`tsn.evaluation.write_confusion_csv`) -> ``confusion.png``
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def read_history(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_confusion(path: str | Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    return names, np.array([[int(v) for v in r[1:]] for r in rows[1:]], dtype=np.int64)


def plot_curves(history: list[dict], out: str | Path) -> Path:
    """Loss and accuracy per epoch (a resumed run's repeated epochs: the last record wins)."""
    by_epoch = {int(h["epoch"]): h for h in history}
    epochs = sorted(by_epoch)
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (("train_loss", ax_loss, "train loss"), ("val_loss", ax_loss, "val loss"),
                           ("val_top1", ax_acc, "val top-1"), ("val_top5", ax_acc, "val top-5"),
                           ("val_mean_class_accuracy", ax_acc, "val mean class acc.")):
        points = [(e, by_epoch[e][key]) for e in epochs if by_epoch[e].get(key) is not None]
        if points:
            x, y = zip(*points)
            ax.plot(x, y, marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def plot_confusion(names: list[str], confusion: np.ndarray, out: str | Path) -> Path:
    """Row-normalised confusion matrix (recall per true class) with the counts written in."""
    plt = _pyplot()
    n = len(names)
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros(confusion.shape, float), where=rows > 0)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=60, ha="right")
    ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion (row-normalised)")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center",
                            color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def write_plots(run_dir: str | Path) -> list[Path]:
    """Draw whatever the run directory has data for; returns the PNGs written."""
    run_dir = Path(run_dir)
    written = []
    history = read_history(run_dir)
    if history:
        written.append(plot_curves(history, run_dir / "curves.png"))
    if (run_dir / "confusion.csv").is_file():
        written.append(plot_confusion(*read_confusion(run_dir / "confusion.csv"), run_dir / "confusion.png"))
    return written
