"""`tsn pack --address`: the pack spread over a real Ray cluster (one `ray start --head` per
session, 2 CPUs) gives the local pack's samples, labels, splits and metadata; a driver killed
mid-pack resumes; an ``s3://`` output (moto server) is uploaded by the tasks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from procs import free_port
from procs import start_tsn as start
from procs import wait_tsn as wait

from dataloading.format import shards
from dataloading.pack import PackError, pack_dataset, split_order
from dataloading.pack.options import JOURNAL_FILE
from dataloading.sources.inputs import read_inputs
from dataloading.sources.items import SPLITS
from dataloading.store import storage

pytestmark = pytest.mark.slow

# The test cluster and its drivers agree on no token authentication (Ray >= 2.5x turns it on for
# a cluster started where ~/.ray/auth_token exists, and a driver joining by address then needs
# RAY_AUTH_MODE=token too); nothing but loopback can reach it.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
PACK_KW = {"short_side": 48, "min_frames": 8, "shard_size_bytes": 60_000, "progress": False}
# Per-sample metadata that names the sample rather than describing it (see dataloading.pack.tasks).
NUMBERING_KEYS = ("key", "sample_index")


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of 2 CPUs in its own process (`ray start --head --block`; stopped by SIGTERM,
    which takes its processes down), its own temp dir; the address drivers connect to."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="tsnray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             # not Ray's default 52365: a cluster of another test may hold it
                             f"--dashboard-agent-listen-port={free_port()}",
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **RAY_ENV})
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while "Ray runtime started" not in (Path(temp_dir) / "head.log").read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed:\n{(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"address": address, "pid": proc.pid}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def on_cluster(ray_head, monkeypatch):
    """`cluster.pack.pack_on_cluster` bound to the session's cluster; this process disconnects
    after the test (the cluster keeps running)."""
    import ray

    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)

    from cluster.pack import pack_on_cluster

    def run(*args, **kw):
        return pack_on_cluster(*args, address=ray_head["address"], **kw)

    yield run
    ray.shutdown()


@pytest.fixture(scope="module")
def labels_csv(synth_dir, tmp_path_factory):
    """The session's synthetic videos plus one undecodable file (a rejection), absolute paths."""
    d = tmp_path_factory.mktemp("cluster-inputs")
    (d / "broken.mp4").write_bytes(os.urandom(4000))
    lines = (synth_dir / "labels.csv").read_text().splitlines()
    rows = [f"{synth_dir / path},{label}" for path, label in (line.split(",")[:2] for line in lines[1:])]
    rows.insert(3, f"{d / 'broken.mp4'},{lines[1].split(',')[1]}")
    (d / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    (d / "classes.txt").write_text((synth_dir / "classes.txt").read_text())
    return d / "labels.csv"


def inputs(labels_csv):
    return read_inputs(csv_path=labels_csv, val_fraction=0.34, seed=0)


@pytest.fixture(scope="module")
def local_pack(labels_csv, tmp_path_factory):
    items, classes = inputs(labels_csv)
    out = tmp_path_factory.mktemp("local-pack")
    pack_dataset(items, classes, out, workers=2, **PACK_KW)
    return out


def read_pack(root) -> dict:
    """{split: {source: sample}} of a pack (local or s3://), sample = the info fields, the
    parsed JSON metadata and every other member's bytes; plus the manifest and rejections."""
    root = str(root)
    manifest = json.loads(storage.read_text(storage.join(root, "manifest.json")))
    out: dict = {"manifest": manifest, "splits": {}}
    for split, s in manifest["splits"].items():
        samples: dict = {}
        for shard in s["shards"]:
            members: dict = {}
            with storage.open_tar(storage.join(root, shard["path"])) as tar:
                for m in tar:
                    key, ext = shards.split_member_name(m.name)
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
            for key, mem in members.items():
                meta = json.loads(mem.pop("json"))
                info = shards.decode_info(mem.pop("info"))
                assert meta["key"] == key and info["sample_index"] == meta["sample_index"]
                samples[meta["source"]] = {"info": {k: info[k] for k in shards.INFO_FIELDS}, "meta": meta,
                                           "members": mem}
        out["splits"][split] = samples
    rejected = storage.read_text(storage.join(root, "rejected.jsonl")).splitlines()
    out["rejected"] = sorted((r["path"], r["split"]) for r in map(json.loads, rejected))
    return out


def assert_same_pack(cluster_root, local_root, labels_csv) -> None:
    """Same samples, labels, splits, metadata and bytes; the cluster's sample index is the
    video's position in its split's packing order (the local pack's when nothing is rejected)."""
    got, want = read_pack(cluster_root), read_pack(local_root)
    assert got["rejected"] == want["rejected"] and len(want["rejected"]) == 1
    assert set(got["splits"]) == set(want["splits"])
    items, _ = inputs(labels_csv)
    for split, samples in want["splits"].items():
        assert set(got["splits"][split]) == set(samples)
        position = {it.path: i for i, it in enumerate(split_order(items, split, 0))}
        for source, w in samples.items():
            g = got["splits"][split][source]
            assert g["members"] == w["members"]  # cls, frames, offsets: byte for byte
            strip = lambda d: {k: v for k, v in d.items() if k not in NUMBERING_KEYS}  # noqa: E731
            assert strip(g["meta"]) == strip(w["meta"])
            assert {k: v for k, v in g["info"].items() if k != "sample_index"} == \
                   {k: v for k, v in w["info"].items() if k != "sample_index"}
            assert g["meta"]["sample_index"] == position[source]
    gm, wm = got["manifest"], want["manifest"]
    for key in ("num_samples", "num_rejected", "classes", "layout", "codec", "modalities"):
        assert gm[key] == wm[key], key
    for split in wm["splits"]:
        for key in ("num_samples", "num_frames", "class_counts", "source_bytes"):
            assert gm["splits"][split][key] == wm["splits"][split][key], (split, key)


def test_cluster_pack_equals_local_pack(on_cluster, labels_csv, local_pack, tmp_path):
    from dataloading.pack.inspect import inspect_dataset, verify_dataset

    items, classes = inputs(labels_csv)
    stats: dict = {}
    out = tmp_path / "cluster"
    manifest = on_cluster(items, classes, out, videos_per_task=4, run_stats=stats, **PACK_KW)
    assert stats["packed"] == manifest["num_samples"] == len(items) - 1 and stats["rejected"] == 1
    assert stats["workers"] == 2 and stats["tasks"] >= 4
    assert_same_pack(out, local_pack, labels_csv)
    assert not list(out.rglob("*.partial"))
    summary = inspect_dataset(out)
    assert summary["ok"], summary
    assert verify_dataset(out)["ok"]
    # Re-running finds everything done; a local pack never resumes into the cluster's numbering.
    again: dict = {}
    on_cluster(items, classes, out, run_stats=again, **PACK_KW)
    assert again["skipped"] == len(items) and again["packed"] == 0
    with pytest.raises(PackError, match="sample_numbering"):
        pack_dataset(items, classes, out, workers=1, **PACK_KW)


def test_killed_driver_resumes_to_the_same_pack(ray_head, labels_csv, local_pack, tmp_path):
    out = tmp_path / "cluster"
    args = ["pack", "--input", str(labels_csv), "--out", str(out), "--short-side", "48", "--min-frames", "8",
            "--shard-size", "60000", "--val-fraction", "0.34", "--no-progress", "--address", ray_head["address"],
            "--videos-per-task", "1"]
    proc = start(args, tmp_path / "first.log", env={**os.environ, **RAY_ENV})
    journals = [out / split / JOURNAL_FILE for split in SPLITS]
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            records = [line for j in journals if j.is_file() for line in j.read_text().splitlines()
                       if '"type": "shard"' in line]
            if len(records) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the pack ended before it could be killed:\n{(tmp_path / 'first.log').read_text()}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists()
    journaled = sum(line.count('"type": "shard"') for j in journals if j.is_file() for line in [j.read_text()])
    assert 2 <= journaled < 18
    output = wait(start(args, tmp_path / "second.log", env={**os.environ, **RAY_ENV}), tmp_path / "second.log")
    done = int(output.split(" already done")[0].rsplit(" ", 1)[-1])
    assert done >= journaled, output
    assert_same_pack(out, local_pack, labels_csv)
    assert not list(out.rglob("*.partial"))


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _task_worker(head_pid: int) -> int | None:
    """A worker process of the session's cluster running `pack_chunk` (Ray titles it so)."""
    for pid in _descendants(head_pid):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::pack_chunk"):
                return pid
        except OSError:
            continue
    return None


def test_killed_task_is_retried_and_counted_once(on_cluster, ray_head, labels_csv, local_pack, tmp_path):
    """SIGKILL a Ray worker in the middle of a chunk: Ray re-runs the chunk, its half-written
    shard is never counted, and the pack equals the local one."""
    import threading

    items, classes = inputs(labels_csv)
    out = tmp_path / "cluster"
    killed: list[int] = []

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            pid = _task_worker(ray_head["pid"])
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    stats: dict = {}
    on_cluster(items, classes, out, videos_per_task=3, run_stats=stats, **PACK_KW)
    thread.join()
    assert killed, "no worker was caught running a chunk"
    assert stats["packed"] == len(items) - 1 and stats["rejected"] == 1
    assert_same_pack(out, local_pack, labels_csv)
    assert not list(out.rglob("*.partial"))


def test_cluster_pack_to_s3(on_cluster, s3_env, labels_csv, local_pack, tmp_path):
    import s3

    from dataloading.pack.inspect import inspect_dataset

    items, classes = inputs(labels_csv)
    uri = f"s3://{s3_env['bucket']}/cluster-pack"
    stats: dict = {}
    on_cluster(items, classes, uri, videos_per_task=5, run_stats=stats, staging_dir=tmp_path / "staging", **PACK_KW)
    assert_same_pack(uri, local_pack, labels_csv)
    assert inspect_dataset(uri)["ok"]
    keys = s3.keys_under(s3_env, "cluster-pack/")
    manifest = json.loads(storage.read_text(f"{uri}/manifest.json"))
    for shard in manifest["shards"]:
        assert f"cluster-pack/{shard['path']}" in keys and f"cluster-pack/{shard['index_path']}" in keys
    # Only what the manifest names (+ options, manifest, rejections, the split journals) is in
    # the bucket; staging keeps no shard.
    splits = sorted({shard["path"].split("/")[0] for shard in manifest["shards"]})
    assert {f"cluster-pack/{split}/_journal.jsonl" for split in splits} <= keys
    assert len(keys) == 2 * len(manifest["shards"]) + 3 + len(splits), sorted(keys)
    assert not list((tmp_path / "staging").rglob("*.tar"))
    assert stats["uploaded_objects"] == 2 * len(manifest["shards"]) + 2  # + rejections, manifest
    # A retry on a new pod (an empty staging directory, issue 24): the journals come from the
    # bucket and nothing is packed or uploaded again but the result files.
    again: dict = {}
    on_cluster(items, classes, uri, videos_per_task=5, run_stats=again, staging_dir=tmp_path / "new-pod", **PACK_KW)
    assert again["packed"] == 0 and again["skipped"] == len(items) and again["uploaded_objects"] == 2, again
    assert_same_pack(uri, local_pack, labels_csv)


def test_address_of_no_cluster_is_a_clear_error(tmp_path, labels_csv):
    log = tmp_path / "log"
    proc = start(["pack", "--input", str(labels_csv), "--out", str(tmp_path / "o"), "--no-progress",
                  "--address", f"127.0.0.1:{free_port()}"], log, env={**os.environ, **RAY_ENV})
    assert proc.wait(timeout=120) == 2, log.read_text()
    assert "cannot connect to the Ray cluster" in log.read_text()


def test_bench_pack_reports_videos_per_s_against_the_single_process_pack(labels_csv, tmp_path):
    """`tsn bench-pack` on the tiny inputs: one row per packer, ratios against the baseline (its
    own local Ray clusters of 1 and 2 CPUs, in a subprocess)."""
    out = tmp_path / "bench.json"
    log = tmp_path / "bench.log"
    output = wait(start(["bench-pack", "--input", str(labels_csv), "--short-side", "48", "--min-frames", "8",
                         "--ray-workers", "1", "2", "--json", str(out), "--work-dir", str(tmp_path / "work")], log,
                        env={**os.environ, **RAY_ENV}), log)
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["rows"]] == ["single_process", "ray_1", "ray_2"]
    assert [r["workers"] for r in result["rows"]] == [1, 1, 2]
    n = result["videos"]
    assert n == len(inputs(labels_csv)[0])
    for r in result["rows"]:
        assert r["videos"] == n and r["packed"] == n - 1 and r["rejected"] == 1
        assert r["seconds"] > 0 and r["videos_per_s"] == pytest.approx(n / r["seconds"])
        assert r["ratio"] == pytest.approx(r["videos_per_s"] / result["rows"][0]["videos_per_s"])
    assert result["rows"][0]["ratio"] == 1.0
    assert "ray_2" in output and "ratio" in output
    assert not list((tmp_path / "work").iterdir())  # every row's pack is removed
