"""Datasets and checkpoints in object storage: a real S3-compatible server on loopback (moto's
server mode, `conftest.s3_server`, request signatures checked), the tiny packed dataset
uploaded to it, and every reader pointed at ``s3://``: `tsn train --local`, `tsn inspect
--verify`, `tsn eval`, `tsn stream`, the Ray job with checkpoints in the bucket and a killed
worker; a missing shard and wrong credentials fail before anything is written."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import numpy as np
import pytest
import s3
from procs import free_port_pair
from procs import start_tsn as start
from procs import wait_tsn as wait

from app.config import load_config
from cli import main as cli
from dataloading.format import shards
from dataloading.pack import inspect
from dataloading.store import storage

TINY = ["augment.input_size=32", "augment.resize_short=48", "model.backbone=tiny", "model.test_segments=5",
        "train.batch_size_per_worker=4", "train.test_batch_size_per_worker=3", "optim.lr=0.01"]


def tsn(*argv) -> int:
    return cli.main([str(a) for a in argv])


def sets(data, *extra):
    return [x for kv in (f"data.shards={data}", *TINY, *extra) for x in ("--set", kv)]


# --- the storage layer -------------------------------------------------------------------------

def test_storage_reads_lists_and_names_missing_objects(s3_env, packed_jpeg, packed_jpeg_s3):
    manifest = shards.load_manifest(packed_jpeg_s3)
    assert manifest == shards.load_manifest(packed_jpeg)
    tars, idxs, n = shards.split_shards(packed_jpeg_s3, "train")
    local_tars, local_idxs, local_n = shards.split_shards(packed_jpeg, "train")
    assert n == local_n and len(tars) == len(local_tars) > 1
    assert tars[0] == f"{packed_jpeg_s3}/{manifest['splits']['train']['shards'][0]['path']}"
    assert storage.read_bytes(idxs[0]) == open(local_idxs[0], "rb").read()
    sizes = storage.list_sizes(packed_jpeg_s3)
    assert sizes[tars[0]] == os.path.getsize(local_tars[0])
    with pytest.raises(FileNotFoundError, match="nothing.tar: no such object"):
        storage.read_bytes(f"{packed_jpeg_s3}/nothing.tar")
    with pytest.raises(FileNotFoundError, match="not a packed dataset"):
        shards.load_manifest(f"s3://{s3_env['bucket']}/no-such-prefix")
    with pytest.raises(ValueError, match="only local paths and s3://"):
        shards.load_manifest("gs://bucket/prefix")


def test_a_loader_reads_the_manifest_of_s3_once(s3_env, packed_jpeg_s3, monkeypatch):
    """Each read is a GET at the store's latency before the first shard's fetch can start (it
    was read twice: once more by split_shards)."""
    from dataloading.pipeline.loader import TSNLoader
    from dataloading.planning.spec import PipelineSpec

    reads = []
    load = shards.load_manifest
    monkeypatch.setattr(shards, "load_manifest", lambda d: reads.append(d) or load(d))
    loader = TSNLoader(packed_jpeg_s3, "train", PipelineSpec(mode="train", batch_size=2))
    loader.close()
    assert reads == [packed_jpeg_s3]
    assert shards.split_shards(packed_jpeg_s3, "train", load(packed_jpeg_s3)) == shards.split_shards(packed_jpeg_s3, "train")


def test_inspect_and_verify_from_s3_match_local(s3_env, packed_jpeg, packed_jpeg_s3, capsys):
    remote, local = inspect.inspect_dataset(packed_jpeg_s3), inspect.inspect_dataset(packed_jpeg)
    assert remote["ok"] and remote["dir"] == packed_jpeg_s3
    assert {k: v for k, v in remote.items() if k != "dir"} == {k: v for k, v in local.items() if k != "dir"}
    assert tsn("inspect", packed_jpeg_s3, "--verify", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verify"]["ok"] and out["verify"]["num_samples_checked"] == local["num_samples"]


def test_inspect_verify_reports_a_corrupt_and_a_missing_object(s3_env, s3_server, packed_jpeg, capsys):
    manifest = shards.load_manifest(packed_jpeg)
    first, second = manifest["splits"]["train"]["shards"][:2]
    uri = s3.upload_dir(s3_server, packed_jpeg, "damaged", skip={second["path"]})
    raw = bytearray((packed_jpeg / first["path"]).read_bytes())
    raw[2000:2600] = bytes(600)  # inside the first sample's members: same size, bad content
    s3.client(s3_server).put_object(Bucket=s3_server["bucket"], Key=f"damaged/{first['path']}", Body=bytes(raw))
    assert tsn("inspect", uri, "--verify", "--json") == 1
    out = json.loads(capsys.readouterr().out)
    assert f"{second['path']}: shard missing" in out["problems"]
    bad = out["verify"]["bad_samples"]
    assert any(b["shard"] == first["path"] for b in bad)
    assert any(b["shard"] == second["path"] and "no such object" in b["reason"] for b in bad)


# --- training, streaming and evaluation from S3 --------------------------------------------------

@pytest.fixture(scope="module")
def local_and_s3_runs(s3_server, packed_jpeg, packed_jpeg_s3, tmp_path_factory):
    """The same 2-epoch `tsn train --local` run on the local and on the S3 copy of the data."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.environment(s3_server).items():
            mp.setenv(k, v)
        for name, data in (("local", packed_jpeg), ("s3", packed_jpeg_s3)):
            run = tmp_path_factory.mktemp(f"run-{name}")
            assert tsn("train", "--local", "--run-dir", run, *sets(data, "train.epochs=2")) == 0
            runs[name] = run
    return runs


def test_train_local_from_s3_matches_local_disk(local_and_s3_runs):
    local, remote = (json.loads((local_and_s3_runs[k] / "results.json").read_text()) for k in ("local", "s3"))
    assert remote["steps"] == local["steps"] > 0
    for key in ("top1", "top5", "mean_class_accuracy"):
        assert remote[key] == pytest.approx(local[key], abs=1e-6), key
    for a, b in zip(local["history"], remote["history"]):  # the same batches, so the same losses
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)


def test_eval_from_s3_matches_local(s3_env, local_and_s3_runs, packed_jpeg, packed_jpeg_s3, tmp_path):
    ckpt = json.loads((local_and_s3_runs["local"] / "checkpoints.json").read_text())["checkpoints"][-1]["path"]
    scores = {}
    for name, data in (("local", packed_jpeg), ("s3", packed_jpeg_s3)):
        out = tmp_path / f"{name}.npz"
        assert tsn("eval", "--checkpoint", ckpt, "--data", data, "--segments", 3, "--out", out) == 0
        scores[name] = np.load(out)
    assert np.allclose(scores["s3"]["scores"], scores["local"]["scores"], atol=1e-5)
    assert (scores["s3"]["label"] == scores["local"]["label"]).all()


def test_stream_from_s3(s3_env, packed_jpeg_s3):
    from app.data import stream

    cfg = load_config(None, [f"data.shards={packed_jpeg_s3}", *TINY])
    stats = stream(cfg, epochs=1, progress=False)
    assert stats["dataset"] == packed_jpeg_s3
    assert stats["epochs"][0]["clips"] == 12 and stats["val"]["clips"] == 6


def test_stream_uses_the_node_cache_as_training_does(s3_env, packed_jpeg_s3, tmp_path):
    """`tsn stream` honours ``data.cache_dir`` (issue 24: it streamed an s3:// dataset
    again on every run): the second run takes nothing from the bucket."""
    from app.data import stream

    cfg = load_config(None, [f"data.shards={packed_jpeg_s3}", f"data.cache_dir={tmp_path / 'cache'}", *TINY])
    first, second = (stream(cfg, epochs=1, progress=False) for _ in range(2))
    total = sum(os.path.getsize(p) for p in (tmp_path / "cache").rglob("*.tar"))
    assert first["epochs"][0]["object_storage_bytes"] + first["val"]["object_storage_bytes"] >= total > 0
    assert second["epochs"][0]["object_storage_bytes"] == second["val"]["object_storage_bytes"] == 0
    assert second["epochs"][0]["clips"] == 12 and second["val"]["clips"] == 6


# --- clear errors before any work ----------------------------------------------------------------

def test_a_bucket_that_does_not_exist_is_named_as_such(s3_env, capsys):
    """Issue 24's fault pass: a missing bucket was reported as "not a packed dataset ... run
    `tsn pack` first"."""
    assert tsn("stream", *sets("s3://no-such-bucket/x"), "--no-progress") == 2
    err = capsys.readouterr().err
    assert "s3://no-such-bucket/x: the bucket 'no-such-bucket' does not exist" in err and "tsn pack" not in err
    assert tsn("stream", *sets(f"s3://{s3_env['bucket']}/no-such-prefix"), "--no-progress") == 2
    assert "not a packed dataset (no manifest.json)" in capsys.readouterr().err  # the bucket is there


def test_missing_shard_fails_before_training_naming_it(s3_env, s3_server, packed_jpeg, tmp_path, capsys):
    manifest = shards.load_manifest(packed_jpeg)
    gone = manifest["splits"]["val"]["shards"][-1]["path"]
    uri = s3.upload_dir(s3_server, packed_jpeg, "missing-shard", skip={gone})
    run = tmp_path / "run"
    assert tsn("train", "--local", "--run-dir", run, *sets(uri, "train.epochs=1")) != 0
    err = capsys.readouterr().err
    assert f"{uri}/{gone}" in err and "missing" in err
    assert not run.exists()  # nothing written


def test_wrong_credentials_fail_before_training_naming_the_object(s3_env, packed_jpeg_s3, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    run = tmp_path / "run"
    assert tsn("train", "--local", "--run-dir", run, *sets(packed_jpeg_s3, "train.epochs=1")) != 0
    err = capsys.readouterr().err
    assert f"{packed_jpeg_s3}/manifest.json" in err and "ACCESS_DENIED" in err and "AWS_ACCESS_KEY_ID" in err
    assert not run.exists()
    assert tsn("inspect", packed_jpeg_s3) == 2
    assert "ACCESS_DENIED" in capsys.readouterr().err


def test_an_endpoint_that_does_not_answer_is_named_as_such_not_as_credentials(s3_env, packed_jpeg_s3, tmp_path,
                                                                              capsys, monkeypatch):
    """Issue 24's fault pass: a server that is down was reported with the credentials hint."""
    from procs import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert tsn("inspect", packed_jpeg_s3) == 2
    err = capsys.readouterr().err
    assert f"the server at AWS_ENDPOINT_URL={dead} does not answer: check that it is up" in err, err
    assert "AWS_ACCESS_KEY_ID" not in err and len(err.strip().splitlines()) == 1


# One epoch from the server, then (after a line on stdin) the next; prints the outcome. In a
# process of its own: DALI's reader keeps one S3 client per process, made from the environment
# at its first use, so this test's own server cannot be swapped in after other tests read.
NEXT_EPOCH_SCRIPT = """
import sys, time
from app.config import load_config
from app.pipeline import pipeline_spec
from dataloading.pipeline.loader import TSNLoader
uri, sets = sys.argv[1], sys.argv[2:]
loader = TSNLoader(uri, "train", pipeline_spec(load_config(None, [f"data.shards={uri}", *sets]), "train"))
print("epoch 0 clips", sum(b.frames.shape[0] for b in loader), flush=True)
sys.stdin.readline()
t0 = time.time()
try:
    for _ in loader:
        pass
    print("epoch 1 read", flush=True)
except OSError as e:  # storage.StorageError: the source's reads retried, then failed naming the object
    print(f"failed after {time.time() - t0:.1f} s: {e}", flush=True)
"""


def test_server_gone_mid_run_fails_after_bounded_retries_naming_the_object(packed_jpeg, tmp_path):
    """A server that stops answering between epochs: the source retries each read (its own
    attempts on top of the client's ``AWS_MAX_ATTEMPTS``), then the loader fails with a
    StorageError naming the object (a Ray job then restarts from its last checkpoint, tested
    below)."""
    import subprocess
    import sys

    from procs import ROOT

    server, proc = s3.start_server(tmp_path / "moto.log")  # its own server: this one gets stopped
    try:
        uri = s3.upload_dir(server, packed_jpeg, "gone")
        env = {**os.environ, **s3.environment(server), "AWS_MAX_ATTEMPTS": "2"}
        child = subprocess.Popen([sys.executable, "-c", NEXT_EPOCH_SCRIPT, uri, *TINY], cwd=ROOT, env=env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        first = child.stdout.readline()
        assert first.strip() == "epoch 0 clips 12", first  # epoch 0 streamed from the server
    finally:
        s3.stop_server(proc)
    out, _ = child.communicate("next\n", timeout=120)
    assert re.search(r"(?s)^failed after [\d.]+ s: s3://tsn-test/gone/train/train-\d+\.tar: cannot read.*Could not connect", out), out
    assert float(out.split()[2]) < 60


# --- the Ray job: shards and checkpoints in S3, a worker killed -------------------------------------

@pytest.mark.slow
def test_ray_job_s3_shards_and_checkpoints_survives_killed_worker(s3_env, s3_server, packed_jpeg_s3, tmp_path):
    """One 2-worker run: shards read from S3, Ray Train's checkpoints stored in S3; rank 1 is
    SIGKILLed after two checkpoints and the group resumes from the latest S3 checkpoint."""
    port, name = free_port_pair(), "s3-killed"
    storage_uri = f"s3://{s3_server['bucket']}/runs"
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    args = ["train", "--run-dir", run_dir, "--set", f"data.shards={packed_jpeg_s3}",
            "--set", f"run.storage_path={storage_uri}", "--set", f"run.name={name}", "--set", f"metrics.port={port}",
            "--set", "model.backbone=resnet18", "--set", "augment.input_size=48", "--set", "augment.resize_short=48",
            "--set", "model.test_segments=5", "--set", "train.batch_size_per_worker=2", "--set", "train.epochs=4",
            "--set", "checkpoint.every_n_steps=2", "--set", "checkpoint.keep_last=1",
            "--set", "loader.num_threads=1", "--set", "cluster.num_workers=2", "--set", "cluster.max_failures=1",
            "--set", "optim.lr=0.01"]
    proc = start([str(a) for a in args], log)
    index, info = run_dir / "checkpoints.json", run_dir / "workers" / "rank1.json"
    victim, deadline = None, time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        try:
            recorded = json.loads(index.read_text())["checkpoints"] if index.is_file() else []
        except json.JSONDecodeError:  # being replaced
            recorded = []
        if len(recorded) >= 2 and info.is_file():
            time.sleep(3.0)  # let Ray's controller register the reports (it polls every 2 s)
            victim = json.loads(info.read_text())["pid"]
            os.kill(victim, signal.SIGKILL)
            break
        time.sleep(0.2)
    assert victim is not None, f"no checkpoint recorded before the run ended:\n{log.read_text()[-3000:]}"
    output = wait(proc, log)
    assert "[tsn] resuming from" in output
    assert json.loads(info.read_text())["pid"] != victim
    results = json.loads((run_dir / "results.json").read_text())
    assert results["num_val_videos"] == 6 and results["epochs"] == 4
    assert f"[tsn] checkpoints   : {storage_uri}/{name}" in output
    # Ray's checkpoints are objects in the bucket; the index's kept ones hold their file, the
    # ones retention released (keep_last=1 + best) do not.
    listing = json.loads((run_dir / "checkpoints.json").read_text())
    keys = s3.keys_under(s3_server, f"runs/{name}/")
    kept = {c["path"] for c in listing["checkpoints"]}
    assert kept and all(f"{p.split('/', 1)[1]}/checkpoint.pt" in keys for p in kept), (kept, sorted(keys))
    stored = {k.rsplit("/", 1)[0] for k in keys if k.endswith("/checkpoint.pt")}
    dirs = {k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_")}
    assert len(dirs) > len(stored) >= len(kept), (sorted(keys), listing)  # released checkpoints lost their file


def test_bench_loader_storage_rows_against_local_disk(s3_env, packed_jpeg, packed_jpeg_s3):
    """The storage rows unshaped: whole-shard streaming costs object storage the split's bytes
    once (cold) and nothing warm; sparse reads take far less than whole packs; the local row
    reads the disk (pages evicted first) and counts the sampled frames' bytes."""
    from tools.bench_loader import format_table, run_bench

    result = run_bench(packed_jpeg, batch_size=4, repeats=1, log=lambda m: None, remote=packed_jpeg_s3,
                       skip_peers=True)
    st = result["storage"]
    (r,) = st["shapes"].values()
    split = shards.load_manifest(packed_jpeg)["splits"]["train"]
    assert r["bytes_per_clip"] == pytest.approx(sum(s["num_bytes"] for s in split["shards"]) / split["num_samples"])
    assert r["clips_per_epoch"] == split["num_samples"] and r["shards"] == len(split["shards"])
    lo, c, h, sp = r["local"], r["cached"], r["half_cache"], r["sparse"]
    assert lo["clips_per_s"] > 0 and 0 < lo["sampled_bytes_per_clip"] < r["bytes_per_clip"]
    # every shard downloaded whole exactly once in the cold epoch, none in the warm one
    assert c["object_storage_bytes_per_clip"] == pytest.approx(r["bytes_per_clip"])
    assert c["warm_object_storage_bytes"] == 0 and c["first_batch_s"] > 0
    # one HEAD + one GET per shard (parts of 64 MiB: a tiny shard is one part)
    assert c["requests_per_clip"] == pytest.approx(2 * r["shards"] / r["clips_per_epoch"])
    assert len(h["refetched_over_split"]) == 2 and all(0 < x < 1 for x in h["refetched_over_split"])
    assert 0 < sp["object_storage_bytes_per_clip"] < r["bytes_per_clip"] and sp["requests_per_clip"] > 1
    assert r["baselines"]["whole_object_bytes_per_s"] > 0 and r["baselines"]["ranged_gets_per_s"] > 0
    table = format_table(result)
    assert "requests/clip" in table and "half cache" in table and packed_jpeg_s3 in table


def test_bench_loader_s3_dataset_through_the_shaping_proxy(s3_env, packed_jpeg, packed_jpeg_s3, capsys):
    """`tsn bench-loader s3://... --local DIR --shape 20,200`: the rows run through the
    shaping proxy, whose own counters give the requests (HEADs included): each ranged read
    pays the added latency, the sparse reader keeps many in flight."""
    from cli.main import main

    assert main(["bench-loader", packed_jpeg_s3, "--local", str(packed_jpeg), "--batch-size", "4",
                 "--shape", "20,200"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[:out.rindex("}") + 1])
    assert result["storage"]["uri"] == packed_jpeg_s3 and result["configs"] == {}
    r = result["storage"]["shapes"]["20ms_200MBps"]
    assert r["latency_ms"] == 20 and r["baselines"]["bandwidth_bound_clips_per_s"] == pytest.approx(
        200e6 / r["bytes_per_clip"])
    # the proxy sees every request: a HEAD and a GET of each shard (a copy's table comes from
    # its tar headers, no index GET), plus a fixed handful for the manifest and the listings
    requests = round(r["cached"]["requests_per_clip"] * r["clips_per_epoch"])
    assert 2 * r["shards"] <= requests <= 2 * r["shards"] + 12, requests
    assert r["sparse"]["first_batch_s"] > 0.04  # at least a HEAD and a GET, 20 ms each
    # 32 small GETs in flight at 20 ms each: far above one at a time (50/s)
    assert r["baselines"]["ranged_gets_per_s"] > 100
    assert "[20ms_200MBps]" in out and "faster first epoch" in out
    assert os.environ["AWS_ENDPOINT_URL"] == s3_env["endpoint"]  # restored after the proxy
    print(out[out.rindex("}") + 1:])


@pytest.mark.slow
def test_ray_run_record_lives_in_the_bucket_and_a_new_pod_continues_it(s3_env, s3_server, packed_jpeg_s3, tmp_path):
    """Issue 24: with run.storage_path in object storage the run directory is a pod's scratch
    disk; a restart on a new pod lost the checkpoint index (retention forgot the older
    checkpoints) and the history. The record is mirrored under the run's storage: the same
    command with an empty run directory (a new pod) continues the history and the index."""
    name, storage_uri = "s3-new-pod", f"s3://{s3_server['bucket']}/runs"

    def job(run_dir, epochs):
        args = ["train", "--run-dir", run_dir, *sets(packed_jpeg_s3, f"run.storage_path={storage_uri}",
                                                     f"run.name={name}", "metrics.port=0", f"train.epochs={epochs}",
                                                     "train.batch_size_per_worker=2", "checkpoint.keep_last=1",
                                                     "checkpoint.keep_best=false", "loader.num_threads=1",
                                                     "cluster.num_workers=1", "cluster.max_failures=0")]
        log = tmp_path / f"{run_dir.name}.log"
        return wait(start([str(a) for a in args], log), log, timeout_s=300)

    job(tmp_path / "pod-1", 2)
    mirrored = s3.keys_under(s3_server, f"runs/{name}/run/")
    assert {f"runs/{name}/run/{f}" for f in ("config.yaml", "history.jsonl", "checkpoints.json", "results.json",
                                              "scores.npz")} <= mirrored, sorted(mirrored)
    output = job(tmp_path / "pod-2", 3)  # a new pod: nothing of pod-1's run directory
    new = tmp_path / "pod-2"
    assert "[tsn] resuming from" in output
    history = [json.loads(line)["epoch"] for line in (new / "history.jsonl").read_text().splitlines()]
    assert history == [0, 1, 2]  # continued, not restarted at the resumed epoch
    index = json.loads((new / "checkpoints.json").read_text())["checkpoints"]
    assert [e["epoch"] for e in index] == [2]  # keep_last=1 across both pods
    stored = {k.split("/")[2] for k in s3.keys_under(s3_server, f"runs/{name}/") if k.endswith("/checkpoint.pt")}
    assert stored == {index[0]["file"]}, stored  # pod-1's checkpoints released by pod-2's retention
    assert json.loads((new / "results.json").read_text())["epochs"] == 3
