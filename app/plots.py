"""PNG plots of a finished run, from files in its run directory (no server needed; names and
readers: `app.run_store`).

- ``history.jsonl`` (one JSON object per epoch: ``epoch``, ``train_loss``, ``val_top1``,
  ``val_top5``, ``val_mean_class_accuracy``, ``lr``, ...) -> ``curves.png``
- ``confusion.csv`` -> ``confusion.png``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.run_store import RunStore, read_confusion


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


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
    store = RunStore(run_dir)
    written = []
    history = store.read_history()
    if history:
        written.append(plot_curves(list(history.values()), store.curves_png))
    if store.confusion_path.is_file():
        written.append(plot_confusion(*read_confusion(store.confusion_path), store.confusion_png))
    return written
