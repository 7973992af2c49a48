"""Run plots are real PNGs drawn from the run directory's files."""

import json

import numpy as np

from app.plots import write_plots
from app.run_store import read_confusion


def test_write_plots_from_history_and_confusion(tmp_path):
    history = [dict(epoch=0, train_loss=1.5, val_top1=0.3, val_top5=0.8, val_mean_class_accuracy=0.25),
               dict(epoch=1, train_loss=1.1, val_top1=0.5, val_top5=0.9, val_mean_class_accuracy=0.45)]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (tmp_path / "confusion.csv").write_text("true\\predicted,a,b\na,3,1\nb,0,4\n")
    written = write_plots(tmp_path)
    assert [p.name for p in written] == ["curves.png", "confusion.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    names, cm = read_confusion(tmp_path / "confusion.csv")
    assert names == ["a", "b"] and np.array_equal(cm, [[3, 1], [0, 4]])


def test_nothing_to_plot(tmp_path):
    assert write_plots(tmp_path) == []
