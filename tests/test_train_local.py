"""`tsn train --local` end to end on the tiny packed dataset: outputs, resume, exact mid-epoch
resume, bad config, `tsn eval` / `tsn fuse`, and train() under 2-process DDP."""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from app import worker
from crash_hooks import Crash, CrashAtStep
from damage import copy_with_wiped_frames
from cli import evaluate as evaluate_cmd
from cli import main as cli
from cli import train as train_cmd
from tsn.checkpoint import load_checkpoint
from app.config import load_config

# 12 train / 6 val videos of 6 classes; 4 videos a batch -> 3 steps per epoch
TINY = ["augment.input_size=32", "augment.resize_short=48", "model.backbone=tiny", "model.test_segments=5",
        "train.batch_size_per_worker=4", "train.test_batch_size_per_worker=3", "train.log_every_n_steps=1",
        "optim.lr=0.01"]
RESULT_KEYS = {"top1", "top5", "mean_class_accuracy", "num_val_videos", "per_class_accuracy", "steps", "epochs",
               "history", "seconds", "checkpoint", "protocol"}


@pytest.fixture
def tsn(monkeypatch):
    """``tsn ARGS...`` through cli.main.main (its error handling), with train / eval / fuse
    registered even before cli.py lists them."""
    original = cli.build_parser

    def build_parser():
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for module, names in ((train_cmd, ("train",)), (evaluate_cmd, ("eval", "fuse"))):
            if not any(n in sub.choices for n in names):
                module.add_cli(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)
    return lambda *argv: cli.main([str(a) for a in argv])


def sets(packed, *extra):
    out = []
    for kv in (f"data.shards={packed}", *TINY, *extra):
        out += ["--set", kv]
    return out


def test_train_local_outputs_resume_and_finished_run(tsn, packed_jpeg, tmp_path, capsys):
    run = tmp_path / "run"
    assert tsn("train", "--local", "--run-dir", run, *sets(packed_jpeg, "train.epochs=2")) == 0
    results = json.loads((run / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["num_val_videos"] == 6 and results["steps"] == 6 and len(results["history"]) == 2
    assert 0 <= results["top1"] <= results["top5"] <= 1
    assert results["protocol"]["segments"] == 5 and results["protocol"]["crops"] == 10
    cfg = load_config(run / "config.yaml")
    assert cfg == load_config(None, [f"data.shards={packed_jpeg}", *TINY, "train.epochs=2"])
    index = json.loads((run / "checkpoints.json").read_text())
    assert [(e["epoch"], e["step"]) for e in index["checkpoints"]] == [(0, 3), (1, 6)]
    assert all("val_top1" in e["metrics"] for e in index["checkpoints"])
    scores = np.load(run / "scores.npz")
    assert scores["scores"].shape == (6, 6) and sorted(scores["sample_index"]) == list(range(6))
    assert (run / "confusion.csv").read_text().count("\n") == 7
    assert sum(1 for line in (run / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["event"] == "epoch_end") == 2
    print(capsys.readouterr().out)

    # the same command again: a finished run is detected, nothing is retrained
    mtimes = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    assert tsn("train", "--local", "--run-dir", run, *sets(packed_jpeg, "train.epochs=2")) == 0
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == mtimes
    assert json.loads((run / "results.json").read_text()) == results

    # more epochs: continues at epoch 2 / step 6
    assert tsn("train", "--local", "--run-dir", run, *sets(packed_jpeg, "train.epochs=3")) == 0
    more = json.loads((run / "results.json").read_text())
    assert more["steps"] == 9 and [h["epoch"] for h in more["history"]] == [0, 1, 2]
    assert more["history"][:2] == results["history"]
    index = json.loads((run / "checkpoints.json").read_text())
    kept = [(e["epoch"], e["step"]) for e in index["checkpoints"]]
    assert kept[-2:] == [(1, 6), (2, 9)] and len(kept) <= 3  # keep_last 2 (+ an older best)
    # Exactly what the config says: 3 written, the rule's choice kept, index and files alike.
    from app.run_store import retained

    written = [{"step": h["step"], "metrics": {"val_top1": h["val_top1"]}} for h in more["history"]]
    assert [e["step"] for e in index["checkpoints"]] == \
        [e["step"] for e in retained(written, keep_last=2, keep_best=True)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(e["file"] for e in index["checkpoints"])


def test_skipped_samples_count_over_the_whole_run_across_a_resume(tsn, packed_jpeg, tmp_path):
    """A run resumed after its last epoch (a driver lost once training was done) meets no corrupt
    sample again: results.json still counts the one the first process skipped, from the
    checkpoint, and a resumed epoch meeting it again counts it once."""
    data, _ = copy_with_wiped_frames(packed_jpeg, tmp_path / "data")
    run = tmp_path / "run"
    assert tsn("train", "--local", "--run-dir", run, *sets(data, "train.epochs=1")) == 0
    first = json.loads((run / "results.json").read_text())
    assert first["skipped_samples"] == 1 and first["skipped_samples_by_split"]["train"] == 1
    (run / "results.json").unlink()  # as if the process died in the final test
    assert tsn("train", "--local", "--run-dir", run, *sets(data, "train.epochs=1")) == 0
    again = json.loads((run / "results.json").read_text())
    assert again["steps"] == first["steps"] and again["skipped_samples_by_split"] == first["skipped_samples_by_split"]
    assert tsn("train", "--local", "--run-dir", run, *sets(data, "train.epochs=2")) == 0
    more = json.loads((run / "results.json").read_text())
    assert more["steps"] == 2 * first["steps"] and more["skipped_samples"] == 1
    assert load_checkpoint(run / "checkpoints" / json.loads((run / "checkpoints.json").read_text())
                           ["checkpoints"][-1]["file"])["meta"]["skipped"]["train"][0]["key"]


def test_bad_config_fails_before_any_work(tsn, packed_jpeg, tmp_path, capsys):
    run = tmp_path / "run"
    assert tsn("train", "--local", "--run-dir", run, *sets(packed_jpeg, "train.epoch=2")) == 2
    err = capsys.readouterr().err
    assert "train.epoch: unknown key" in err
    assert not run.exists()
    assert tsn("train", "--local", "--run-dir", run, *sets(packed_jpeg, "optim.lr=-1")) == 2
    assert "optim.lr: must be > 0" in capsys.readouterr().err
    assert tsn("train", "--local", "--run-dir", run, "--set", f"data.shards={tmp_path / 'none'}") == 2
    assert "not a packed dataset" in capsys.readouterr().err
    assert tsn("train", "--local", "--address", "auto", "--run-dir", run, *sets(packed_jpeg)) == 2
    assert "--address is for the distributed job" in capsys.readouterr().err
    # GPU decoding while the model trains on CPU (DALI would assert deep in its backend)
    assert tsn("train", "--local", "--run-dir", run, *sets(packed_jpeg, "loader.device=gpu", "train.device=cpu")) == 2
    assert "loader.device=gpu decodes and augments on the GPU, but training runs on CPU (train.device=cpu)" \
        in capsys.readouterr().err
    assert not run.exists()
    # a URI storage path is the Ray job's; the local loop would write a folder named "s3:"
    assert tsn("train", "--local", *sets(packed_jpeg, "run.storage_path=s3://bucket/runs")) == 2
    assert "run.storage_path=s3://bucket/runs: a URI is the Ray job's checkpoint storage" in capsys.readouterr().err
    assert not Path("s3:").exists()


def test_a_worker_never_prepares_data(tmp_path, monkeypatch):
    """The embedded default is generated and packed by the driver (`tsn train`), never by the
    training loop: called without it, the loop fails clearly and writes nothing."""
    from app.data import training_manifest

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None)
    assert cfg.data.uses_embedded_dataset
    with pytest.raises(FileNotFoundError, match="not a packed dataset"):
        training_manifest(cfg)
    with pytest.raises(FileNotFoundError, match="not a packed dataset"):
        worker.train(cfg, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_the_driver_prepares_only_the_embedded_default(tmp_path, monkeypatch):
    from app import data

    calls = []
    monkeypatch.setattr(data, "ensure_dataset", lambda shards, synth, **kw: calls.append((shards, synth, kw)) or {})
    cfg = load_config(None)
    data.prepare_dataset(cfg, progress=False)
    assert calls == [(cfg.data.shards, cfg.data.synth_dir, dict(
        classes=cfg.data.synth_classes, videos_per_class=cfg.data.synth_videos_per_class, seed=cfg.data.synth_seed,
        short_side=cfg.data.pack_short_side, val_fraction=cfg.data.val_fraction, progress=False))]
    with pytest.raises(FileNotFoundError, match="not a packed dataset"):  # a user's dataset is never made up
        data.prepare_dataset(load_config(None, [f"data.shards={tmp_path / 'mine'}"]))
    assert len(calls) == 1 and not (tmp_path / "mine").exists()


def test_missing_split_fails_in_the_driver(tsn, packed_jpeg, tmp_path, capsys):
    run = tmp_path / "run"
    assert tsn("train", "--local", "--run-dir", run, *sets(packed_jpeg, "data.val_split=test")) == 2
    assert "data.val_split='test': not packed in" in capsys.readouterr().err
    assert not run.exists()


def test_epoch_line():
    from app.hooks import format_epoch_line

    line = format_epoch_line({"epoch": 2, "step": 9, "train_loss": 1.23456, "val_top1": 0.5, "val_top5": 1.0,
                              "val_mean_class_accuracy": 0.25, "train_seconds": 4.0, "data_wait_s": 1.0,
                              "train_videos_per_s": 12.34, "epoch_seconds": 5.0})
    assert line == ("epoch 2 done (step 9): train loss 1.2346 | val top1 0.500 top5 1.000 mean class acc 0.250 "
                    "| 12.3 videos/s, data wait 25% | 5.0s")




def test_mid_epoch_resume_is_exact(packed_jpeg, tmp_path):
    """Crash in epoch 1 after a mid-epoch checkpoint; the resumed run ends with the same
    weights as an uninterrupted one (data order, dropout RNG, optimizer and schedule state)."""
    cfg = load_config(None, [f"data.shards={packed_jpeg}", *TINY, "train.epochs=2", "checkpoint.every_n_steps=1",
                             "optim.warmup_epochs=0.5", "optim.lr_steps=[1]", "model.dropout=0.5"])
    worker.train(cfg, tmp_path / "a")
    with pytest.raises(Crash):
        worker.train(cfg, tmp_path / "b", hooks=CrashAtStep(tmp_path / "b", cfg, step=5))
    index = json.loads((tmp_path / "b" / "checkpoints.json").read_text())
    assert index["checkpoints"][-1]["loader_position"] == [1, 1]  # step 4 = epoch 1, batch 1
    resumed = worker.train(cfg, tmp_path / "b")
    assert resumed["steps"] == 6
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "ckpt-e1-s6.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "ckpt-e1-s6.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["metrics"]["val_top1"] == b["metrics"]["val_top1"]
    # The resumed epoch's mean loss counts the steps before the crash too (carried in the
    # mid-epoch checkpoint), so the epoch logs agree.
    assert b["metrics"]["train_loss"] == pytest.approx(a["metrics"]["train_loss"], abs=1e-9)

    def history(run):  # the last record of each epoch
        return {h["epoch"]: h for h in map(json.loads, (run / "history.jsonl").read_text().splitlines())}

    assert history(tmp_path / "b")[1]["train_loss"] == pytest.approx(history(tmp_path / "a")[1]["train_loss"], abs=1e-9)


def test_eval_and_fuse_cli(tsn, packed_jpeg, tmp_path, capsys):
    run = tmp_path / "run"
    assert tsn("train", "--local", "--run-dir", run, *sets(packed_jpeg, "train.epochs=1")) == 0
    ckpt_file = next((run / "checkpoints").glob("*.pt"))
    out = tmp_path / "eval.npz"
    assert tsn("eval", "--checkpoint", ckpt_file, "--segments", 3, "--out", out, "--json", tmp_path / "m.json") == 0
    assert np.load(out)["scores"].shape == (6, 6)
    assert json.loads((tmp_path / "m.json").read_text())["num_videos"] == 6
    capsys.readouterr()
    fused = tmp_path / "fused.npz"
    assert tsn("fuse", out, run / "scores.npz", "--out", fused, "--json", tmp_path / "f.json") == 0
    printed = capsys.readouterr().out
    assert "fused" in printed and "x1.5" in printed  # default weights 1 : 1.5
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["weights"] == [1.0, 1.5] and report["fused"]["num_videos"] == 6
    a, b = np.load(out), np.load(run / "scores.npz")
    ia, ib = np.argsort(a["sample_index"]), np.argsort(b["sample_index"])
    expected = (a["scores"][ia] * 1.0 + b["scores"][ib] * 1.5) / 2.5
    np.testing.assert_allclose(np.load(fused)["scores"], expected, rtol=1e-5)
    assert tsn("fuse", out, run / "scores.npz", "--weights", 1) == 2


# ------------------------------------------------------------------------------- DDP


def _ddp_train(rank, world_size, port, packed, run_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        cfg = load_config(None, [f"data.shards={packed}", *TINY, "train.epochs=2", "train.batch_size_per_worker=2",
                                 "checkpoint.every_n_steps=2"])
        results = worker.train(cfg, run_dir)
        with open(os.path.join(run_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_train_under_two_process_ddp(packed_jpeg, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "ddp"
    run.mkdir()
    torch.multiprocessing.spawn(_ddp_train, args=(2, port, str(packed_jpeg), str(run)), nprocs=2, join=True)
    r0, r1 = (json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1))
    # 12 train videos / 2 ranks / 2 a batch = 3 steps per epoch; every val video counted once
    assert r0["steps"] == r1["steps"] == 6 and r0["world_size"] == 2 and r0["global_batch_size"] == 4
    assert r0["num_val_videos"] == r1["num_val_videos"] == 6
    agreed = ("epoch", "step", "train_loss", "val_top1", "val_top5", "val_mean_class_accuracy", "val_loss")
    assert r0["top1"] == r1["top1"]  # gathered: the same on every rank (timings are per rank)
    assert [{k: h[k] for k in agreed} for h in r0["history"]] == [{k: h[k] for k in agreed} for h in r1["history"]]
    index = json.loads((run / "checkpoints.json").read_text())
    assert [e["step"] for e in index["checkpoints"]][-1] == 6
    state = load_checkpoint(run / "checkpoints" / index["latest"])
    assert isinstance(state["rng"], list) and len(state["rng"]) == 2  # each rank's RNG
    assert not any(k.startswith("module.") for k in state["model"])


def test_the_single_snippet_baseline_trains_and_evaluates(tsn, packed_jpeg, tmp_path):
    """K = 1, one frame per sample (the paper's single-snippet baseline; issue 24: every
    training crashed in its first step): train, val and the test protocol all run."""
    run = tmp_path / "k1"
    assert tsn("train", "--local", "--run-dir", run,
               *sets(packed_jpeg, "train.epochs=1", "model.modality=rgb", "model.snippet_length=1",
                     "model.num_segments=1", "model.test_segments=1")) == 0
    result = json.loads((run / "results.json").read_text())
    assert result["num_val_videos"] == 6 and result["steps"] == 3
