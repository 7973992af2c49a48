"""Video-level metrics, test-view averaging, dedupe by sample_index, exactness under DDP."""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from app.run_store import load_scores, save_scores, write_confusion_csv
from tsn.evaluation import (
    compute_metrics,
    dedupe,
    evaluate,
    gather_predictions,
    result_from_predictions,
    video_scores,
)

# 8 videos, 6 classes, imbalanced: class 0 has 5 videos, classes 1 and 2 one each, class 3 one,
# classes 4 and 5 none.
SCORES = np.array([
    [9, 1, 0, 0, 0, 0],  # label 0, predicted 0
    [9, 1, 0, 0, 0, 0],  # 0 -> 0
    [9, 1, 0, 0, 0, 0],  # 0 -> 0
    [9, 1, 0, 0, 0, 0],  # 0 -> 0
    [1, 9, 0, 0, 0, 0],  # 0 -> 1
    [9, 1, 0, 0, 0, 0],  # 1 -> 0 (label at rank 2: in top 5)
    [0, 1, 2, 3, 4, 5],  # 2 -> 5 (label ranked 4th: in top 5)
    [5, 4, 3, 0, 2, 1],  # 3 -> 0 (label ranked 6th of 6: not in top 5)
], dtype=np.float32)
LABELS = np.array([0, 0, 0, 0, 0, 1, 2, 3])


def test_metrics_on_hand_made_scores():
    m = compute_metrics(SCORES, LABELS, 6)
    assert m["top1"] == pytest.approx(4 / 8)
    assert m["top5"] == pytest.approx(7 / 8)
    # per-class recall: class 0 4/5, classes 1, 2, 3 0/1; classes 4 and 5 absent (NaN, not 0)
    np.testing.assert_allclose(m["per_class_accuracy"][:4], [0.8, 0.0, 0.0, 0.0])
    assert np.isnan(m["per_class_accuracy"][4:]).all()
    # the authors' mean class accuracy != top-1 on an imbalanced set
    assert m["mean_class_accuracy"] == pytest.approx(0.8 / 4)
    expected = np.zeros((6, 6), np.int64)
    expected[0, 0], expected[0, 1], expected[1, 0], expected[2, 5], expected[3, 0] = 4, 1, 1, 1, 1
    np.testing.assert_array_equal(m["confusion"], expected)
    assert m["confusion"].sum() == 8


def test_top5_with_fewer_than_5_classes_and_ties():
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    m = compute_metrics(scores, np.array([1, 2]), 3)
    assert m["top1"] == 0.0  # ties rank the lower class index first
    assert m["top5"] == 1.0  # top-min(5, C)
    with pytest.raises(ValueError, match="labels must be in"):
        compute_metrics(scores, np.array([1, 3]), 3)


def test_dedupe_keeps_one_row_per_sample_sorted():
    idx = np.array([5, 2, 5, 9, 2])
    rows = np.array([[50], [20], [51], [90], [21]])
    labels = np.array([1, 0, 1, 2, 0])
    u, r, lb = dedupe(idx, rows, labels)
    np.testing.assert_array_equal(u, [2, 5, 9])
    np.testing.assert_array_equal(r[:, 0], [20, 50, 90])  # the first occurrence wins
    np.testing.assert_array_equal(lb, [0, 1, 2])
    gi, gs, gl = gather_predictions(idx, rows.astype(np.float32), labels)  # no process group
    np.testing.assert_array_equal(gi, [2, 5, 9])


class SnippetScoresAreInputs(nn.Module):
    """A stand-in TSN: the snippet scores of (B, K, 1, 1, 1, C) input are the input values."""

    def forward_snippet_scores(self, x):
        return x[:, :, 0, 0, 0, :]

    def forward(self, x):
        return self.forward_snippet_scores(x).mean(dim=1)


def test_test_protocol_averages_raw_scores_over_views_and_segments():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 25, 1, 1, 1, 4, generator=g)  # (B, V=10 crops, K=25, L, C, H, W=classes)
    out = video_scores(SnippetScoresAreInputs(), x)
    expected = x[:, :, :, 0, 0, 0, :].mean(dim=(1, 2))  # plain mean of pre-softmax scores
    torch.testing.assert_close(out, expected)
    loader = [SimpleNamespace(frames=x, label=torch.tensor([0, 1]), sample_index=torch.tensor([7, 3]))]
    r = evaluate(SnippetScoresAreInputs(), loader, "cpu", num_classes=4)
    np.testing.assert_array_equal(r.sample_index, [3, 7])  # sorted by sample_index
    np.testing.assert_allclose(r.scores, expected.numpy()[[1, 0]], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="expected frames"):
        video_scores(SnippetScoresAreInputs(), x[0, 0])  # 5-D: neither layout


def test_val_protocol_is_the_model_consensus():
    from tsn.model import TSN

    torch.manual_seed(0)
    model = TSN(5, 3, "rgb", 1, backbone="tiny", consensus="max", partial_bn=False).eval()
    x = torch.randn(3, 3, 1, 3, 16, 16)
    loader = [SimpleNamespace(frames=x, label=torch.tensor([0, 1, 2]), sample_index=torch.arange(3))]
    r = evaluate(model, loader, "cpu", num_classes=5)
    with torch.no_grad():
        np.testing.assert_allclose(r.scores, model(x).numpy(), rtol=1e-5)
    assert not model.training
    assert r.loss == pytest.approx(torch.nn.functional.cross_entropy(model(x), torch.arange(3)).item(), rel=1e-5)


def test_scores_and_confusion_files(tmp_path):
    r = result_from_predictions(np.arange(8), SCORES, LABELS, 6)
    names = [f"c{i}" for i in range(6)]
    save_scores(tmp_path / "s.npz", r, class_names=names, meta={"modality": "rgb"})
    back = load_scores(tmp_path / "s.npz")
    np.testing.assert_array_equal(back["scores"], SCORES)
    np.testing.assert_array_equal(back["label"], LABELS)
    assert back["class_names"] == names and back["meta"] == {"modality": "rgb"}
    assert r.metrics()["num_videos"] == 8 and json.dumps(r.metrics())
    write_confusion_csv(tmp_path / "c.csv", r.confusion, names)
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert lines[0] == "true\\predicted,c0,c1,c2,c3,c4,c5"
    assert lines[1] == "c0,4,1,0,0,0,0"
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_scores(tmp_path / "missing.npz")


# ------------------------------------------------------------------------- DDP exactness

# Rank 0 holds videos 0-4 and a duplicate of 6; rank 1 holds 5-7 and duplicates of 0 and 4 (as a
# padded last batch would): the gathered metrics must be those of the 8 videos exactly.
RANK_ROWS = {0: [0, 1, 2, 3, 4, 6], 1: [5, 6, 7, 0, 4]}


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        rows = RANK_ROWS[rank]
        frames = torch.from_numpy(SCORES[rows]).reshape(len(rows), 1, 1, 1, 1, 6)  # (B, K=1, L, C, H, W)
        loader = [SimpleNamespace(frames=frames[i:i + 2], label=torch.from_numpy(LABELS[rows][i:i + 2]),
                                  sample_index=torch.tensor(rows[i:i + 2])) for i in range(0, len(rows), 2)]
        r = evaluate(SnippetScoresAreInputs(), loader, "cpu", num_classes=6)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({**r.metrics(), "sample_index": r.sample_index.tolist(),
                       "confusion": r.confusion.tolist()}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_are_exact_under_ddp(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = compute_metrics(SCORES, LABELS, 6)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["num_videos"] == 8 and r["sample_index"] == list(range(8))
        assert r["top1"] == pytest.approx(single["top1"]) and r["top5"] == pytest.approx(single["top5"])
        assert r["mean_class_accuracy"] == pytest.approx(single["mean_class_accuracy"])
        assert r["confusion"] == single["confusion"].tolist()
