"""Experiment tracking and lineage (`app.tracking`): a real MLflow tracking server (`mlflow
server` on loopback, from .venv-mlflow: scripts/setup_mlflow_server.sh) and TensorBoard's own
event reader, on `tsn train --local` runs; a resumed run continues its MLflow run; a server out
of reach fails the run before training; every run's lineage in results.json and checkpoints."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from app.tracking import extend_world_sizes, flatten, git_commit
from procs import free_port
from tsn.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / ".venv-mlflow" / "bin" / "mlflow"
TINY = ["augment.input_size=32", "augment.resize_short=48", "model.backbone=tiny", "model.test_segments=3",
        "train.batch_size_per_worker=4", "train.test_batch_size_per_worker=3", "train.log_every_n_steps=0",
        "optim.lr=0.01"]  # 12 train videos: 3 steps an epoch


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port (SQLite store, artifacts proxied to a local
    directory); its URI."""
    assert SERVER.is_file(), f"{SERVER} missing: run scripts/setup_mlflow_server.sh (scripts/test.sh does)"
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen([str(SERVER), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                             "--artifacts-destination", str(d / "artifacts")],
                            stdout=open(d / "server.log", "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None, (d / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    else:
        proc.kill()
        raise AssertionError("mlflow server did not start:\n" + (d / "server.log").read_text()[-3000:])
    try:
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _train(tsn_main, packed, run, *extra):
    from cli import main as cli

    args = ["train", "--local", "--run-dir", str(run)]
    for kv in (f"data.shards={packed}", *TINY, *extra):
        args += ["--set", kv]
    return cli.main(args)


def test_mlflow_and_tensorboard_record_the_run_and_a_resume_continues_it(mlflow_server, packed_jpeg, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    track = [f"tracking.mlflow_uri={mlflow_server}", "tracking.mlflow_experiment=tsn-test", "tracking.tensorboard=true",
             "tracking.log_every_n_steps=1", "run.name=tracked"]
    assert _train(None, packed_jpeg, run, "train.epochs=2", *track) == 0
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("tsn-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    run_id = r.info.run_id
    assert json.loads((run / "tracking.json").read_text())["mlflow_run_id"] == run_id
    assert r.info.run_name == "tracked" and r.info.status == "FINISHED"
    config = __import__("yaml").safe_load((run / "config.yaml").read_text())
    assert r.data.params == flatten(config)  # the resolved config, every key
    assert r.data.params["optim.lr"] == "0.01" and r.data.params["tracking.tensorboard"] == "True"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, 7))
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    val = client.get_metric_history(run_id, "epoch/val_top1")
    assert [(m.step, m.value) for m in val] == [(h["step"], pytest.approx(h["val_top1"])) for h in history]
    results = json.loads((run / "results.json").read_text())
    assert client.get_metric_history(run_id, "test/top1")[0].value == pytest.approx(results["top1"])
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "results.json", "confusion.csv",
                                                               "curves.png", "confusion.png"}
    manifest_sha = hashlib.sha256((Path(packed_jpeg) / "manifest.json").read_bytes()).hexdigest()
    assert r.data.tags["tsn.lineage.dataset.manifest_sha256"] == manifest_sha
    assert r.data.tags["tsn.best_checkpoint"].endswith(".pt") and Path(r.data.tags["tsn.best_checkpoint"]).is_file()

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 7))
    assert [e.value for e in events.Scalars("epoch/val_top1")] == pytest.approx([h["val_top1"] for h in history])
    assert events.Scalars("test/top1")[0].value == pytest.approx(results["top1"])

    # One more epoch: the same MLflow run continues (params unchanged, no duplicate run).
    assert _train(None, packed_jpeg, run, "train.epochs=3", *track) == 0
    assert len(client.search_runs([exp.experiment_id])) == 1
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "epoch/val_top1")] == [3, 6, 9]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, 10))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("epoch/val_top1")] == [3, 6, 9]


def test_an_mlflow_server_out_of_reach_fails_the_run_before_training(packed_jpeg, tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens
    t0 = time.time()
    assert _train(None, packed_jpeg, tmp_path / "run", "train.epochs=1", f"tracking.mlflow_uri={uri}") == 2
    assert time.time() - t0 < 60
    err = capsys.readouterr().err
    assert f"tracking.mlflow_uri={uri}: the MLflow server does not answer" in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_every_run_records_its_lineage_in_results_and_checkpoints(packed_jpeg, tmp_path):
    run = tmp_path / "run"
    assert _train(None, packed_jpeg, run, "train.epochs=1", "run.seed=7") == 0
    lineage = json.loads((run / "results.json").read_text())["lineage"]
    manifest_sha = hashlib.sha256((Path(packed_jpeg) / "manifest.json").read_bytes()).hexdigest()
    assert lineage["dataset"] == {"location": str(packed_jpeg), "manifest_sha256": manifest_sha}
    assert lineage["seeds"]["run.seed"] == 7
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert lineage["code"]["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert lineage["world_sizes"] == [{"step": 0, "world_size": 1}]
    index = json.loads((run / "checkpoints.json").read_text())
    ckpt = load_checkpoint(run / "checkpoints" / index["checkpoints"][-1]["file"])
    assert ckpt["meta"]["lineage"] == lineage


def test_lineage_pieces(monkeypatch, tmp_path):
    assert extend_world_sizes([], 0, 2) == [{"step": 0, "world_size": 2}]
    assert extend_world_sizes([{"step": 0, "world_size": 2}], 30, 2) == [{"step": 0, "world_size": 2}]
    assert extend_world_sizes([{"step": 0, "world_size": 2}], 30, 1) == [{"step": 0, "world_size": 2},
                                                                          {"step": 30, "world_size": 1}]
    monkeypatch.setenv("TSN_GIT_COMMIT", "abc123")
    assert git_commit() == "abc123"
    monkeypatch.delenv("TSN_GIT_COMMIT")
    assert git_commit(tmp_path) is None  # not a git checkout
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
