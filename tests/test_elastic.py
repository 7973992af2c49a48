"""Multi-node and elastic training on a real Ray cluster of several nodes on this machine.

One Ray cluster per session (`ray.cluster_utils.Cluster`, Ray's own multi-node test harness:
each node its own raylet with its own logical resources): a head without CPUs (the driver's
Ray Train controller needs none) and two worker nodes of 1 logical CPU each, so a 2-worker
group must put one worker on each. `tsn train --address` (the real entry point) runs on it.

* multi-node: the two ranks ran on different Ray nodes, both endpoints were written to the
  file-SD directory and answered during training, and the result equals a single-node run's
  (same world size: same data order, so equal up to gloo's reduction order).
* elastic (``cluster.num_workers: [1, 2]``): one node's raylet and workers are SIGKILLed after a
  checkpoint; the group restarts on the survivor from the last checkpoint, a new node joins and
  the group grows back at the next resize check, and the run finishes.
* without Ray processes (fast): the config forms of ``cluster.num_workers``, the ScalingConfig
  they make, the worker-group record and the restart counters, `tsn submit`'s pass-through.

Nodes are ended by PID (their raylet) or by the harness's own shutdown, never `ray stop`
(other Ray clusters may run on this machine).
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from procs import free_port, free_port_pair
from procs import start_tsn as start
from procs import wait_tsn as wait

SD_DIR = "/tmp/ray/tsn_prom_sd"  # cluster.metrics.DEFAULT_SD_DIR


def job_args(packed, storage, name, port, *, workers="2", epochs=3, backbone="resnet18", extra=()):
    # resnet18 at 48 px: ~0.2-0.5 s per step on these cores, long enough to kill a node between
    # checkpoints, short enough for the suite; the tiny default backbone where timing does not matter.
    return ["train", "--set", f"data.shards={packed}", "--set", f"run.storage_path={storage}",
            "--set", f"run.name={name}", "--set", f"metrics.port={port}", "--set", f"model.backbone={backbone}",
            "--set", "augment.input_size=48", "--set", "augment.resize_short=48", "--set", "model.test_segments=3",
            "--set", "train.batch_size_per_worker=2", "--set", f"train.epochs={epochs}",
            "--set", "checkpoint.every_n_steps=2", "--set", "loader.num_threads=1",
            "--set", f"cluster.num_workers={workers}", "--set", "optim.lr=0.01", *extra]


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


@pytest.fixture(scope="module")  # ended with this module: its ports and memory are not held by the rest of the suite
def ray_cluster():
    """A head (0 CPUs) and two worker nodes (1 logical CPU each) for the whole session;
    shut down by the harness (its own processes only)."""
    from ray.cluster_utils import Cluster

    # Free ports of our own: another cluster on this machine may hold Ray's defaults.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": free_port(), "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()})
    nodes = [cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port()) for _ in range(2)]
    try:
        yield {"cluster": cluster, "nodes": nodes}
    finally:
        cluster.shutdown()


def read_infos(run_dir: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in (run_dir / "workers").glob("rank*.json")}


def group_records(run_dir: Path) -> list[dict]:
    from app.run_store import RunStore
    from cluster.elastic import group_records

    return group_records(RunStore(run_dir))


@pytest.fixture(scope="module")
def multi_node_run(ray_cluster, packed_jpeg, tmp_path_factory):
    """A 2-worker run on the 2-node cluster; while it trains, the discovery entries of both
    ranks are read and their endpoints scraped."""
    storage = tmp_path_factory.mktemp("multi-node")
    name = f"multi-{os.getpid()}"
    log = storage / "job.log"
    proc = start([*job_args(packed_jpeg, storage, name, free_port_pair(), backbone="tiny"),
                  "--address", ray_cluster["cluster"].address], log)
    scraped: dict[str, dict] = {}  # rank -> {"entry": SD entry, "body": /metrics text}
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and len(scraped) < 2:
        for path in Path(SD_DIR).glob(f"tsn-{name}-rank*.json"):
            try:
                entry = json.loads(path.read_text())[0]
                body = urllib.request.urlopen(f"http://{entry['targets'][0]}/metrics", timeout=2).read().decode()
            except (OSError, ValueError, IndexError, KeyError):
                continue
            if "tsn_train_steps_total{" in body:
                scraped[entry["labels"]["rank"]] = {"entry": entry, "body": body}
        time.sleep(0.5)
    output = wait(proc, log, timeout_s=300)
    return {"run_dir": storage / name, "output": output, "scraped": scraped, "storage": storage}


@pytest.fixture(scope="module")
def single_node_run(multi_node_run, packed_jpeg):
    """The same job on a new single-node local cluster (no --address)."""
    storage = multi_node_run["storage"]
    log = storage / "single.log"
    wait(start(job_args(packed_jpeg, storage, "single", free_port_pair(), backbone="tiny"), log), log, timeout_s=300)
    return {"run_dir": storage / "single"}


@pytest.mark.slow
def test_workers_ran_on_different_nodes(ray_cluster, multi_node_run):
    infos = read_infos(multi_node_run["run_dir"])
    assert sorted(infos) == [0, 1]
    worker_nodes = {n.node_id for n in ray_cluster["nodes"]}
    assert {infos[0]["node_id"], infos[1]["node_id"]} == worker_nodes  # one rank on each worker node
    assert all(i["world_size"] == 2 for i in infos.values())
    [record] = group_records(multi_node_run["run_dir"])
    assert record["world_size"] == 2 and not record["restart"] and sorted(record["node_ids"]) == sorted(worker_nodes)


@pytest.mark.slow
def test_each_nodes_metrics_endpoint_was_discovered(multi_node_run):
    scraped = multi_node_run["scraped"]
    assert sorted(scraped) == ["0", "1"], "a rank's file-SD entry or endpoint was missing during training"
    infos = read_infos(multi_node_run["run_dir"])
    for rank, s in scraped.items():
        assert s["entry"]["labels"]["job"] == "tsn" and s["entry"]["labels"]["run"] == multi_node_run["run_dir"].name
        [target] = s["entry"]["targets"]  # host: metrics.bind_address's (cluster.metrics.scrape_host)
        assert target.rsplit(":", 1)[1] == str(infos[int(rank)]["metrics_port"])
        assert f'rank="{rank}"' in s["body"]
        assert any(line.startswith("tsn_world_size{") and line.endswith(" 2.0") for line in s["body"].splitlines())
    # Both workers sit on one host here (local rank 0 each): the second endpoint moved to a free port.
    assert len({s["entry"]["targets"][0] for s in scraped.values()}) == 2


@pytest.mark.slow
def test_multi_node_equals_single_node(multi_node_run, single_node_run):
    a = json.loads((single_node_run["run_dir"] / "results.json").read_text())
    b = json.loads((multi_node_run["run_dir"] / "results.json").read_text())
    assert a["steps"] == b["steps"] and a["num_val_videos"] == b["num_val_videos"]
    for key in ("top1", "top5", "mean_class_accuracy"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key

    def per_epoch(run):
        return {h["epoch"]: h for h in map(json.loads, (run / "history.jsonl").read_text().splitlines())}

    ha, hb = per_epoch(single_node_run["run_dir"]), per_epoch(multi_node_run["run_dir"])
    assert sorted(ha) == sorted(hb)
    for epoch in ha:  # DDP all-reduce order differs between the runs: float tolerance
        for key in ("train_loss", "val_loss"):
            assert hb[epoch][key] == pytest.approx(ha[epoch][key], rel=1e-4, abs=1e-5), (epoch, key)


def _wait_for(predicate, timeout_s: float, proc, what: str, poll_s: float = 0.2):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"the job ended before {what}"
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _last_step(run_dir: Path) -> dict | None:
    from app.run_store import RunStore
    from cluster.elastic import last_logged_step

    return last_logged_step(RunStore(run_dir)) if (run_dir / "steps").is_dir() else None


def _rank0_metrics(run: str, series: str = "tsn_worker_group_restarts_total", value: float = 2) -> dict | None:
    """Rank 0's worker-group series (name -> value) once ``series`` reads ``value``, else None."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        entry = json.loads((Path(SD_DIR) / f"tsn-{run}-rank0.json").read_text())[0]
        body = urllib.request.urlopen(f"http://{entry['targets'][0]}/metrics", timeout=2).read().decode()
    except (OSError, ValueError, IndexError, KeyError):
        return None
    values = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples
              if s.name.startswith(("tsn_world_size", "tsn_max_workers", "tsn_worker_group_"))}
    return values if values.get(series) == value else None


@pytest.mark.slow
def test_node_loss_shrinks_and_node_join_grows_the_group(ray_cluster, packed_jpeg, tmp_path_factory):
    """num_workers [1, 2]: SIGKILL one node's raylet and its worker mid-epoch after a checkpoint;
    the group restarts on the survivor from that checkpoint; a new node joins and the group
    grows back to 2 at the next resize check (every 5 s here); the run finishes.

    Ray Train's worker-group start timeout is cut from 60 s to 15 s (an environment variable
    the driver hands to Ray Train's controller): right after the loss the controller still
    counts the dead node (Ray declares it dead ~30 s later) and tries 2 workers first; the
    timeout bounds that attempt before it retries with what is left."""

    cluster = ray_cluster["cluster"]
    storage = tmp_path_factory.mktemp("elastic")
    name, epochs = f"elastic-{os.getpid()}", 10
    run_dir = storage / name
    log = storage / "job.log"
    proc = start([*job_args(packed_jpeg, storage, name, free_port_pair(), workers="[1, 2]", epochs=epochs,
                            extra=("--set", "cluster.elastic_resize_monitor_interval_s=5",
                                   "--set", "cluster.max_failures=3")),
                  "--address", cluster.address], log,
                 env={**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"})
    try:
        # A checkpoint exists and rank 0 is in the middle of an epoch, past that checkpoint.
        def mid_epoch_after_checkpoint():
            index = run_dir / "checkpoints.json"
            last = _last_step(run_dir)
            if not index.is_file() or last is None or len(read_infos(run_dir)) < 2:
                return None
            ckpts = json.loads(index.read_text())["checkpoints"]
            if ckpts and 0 < last["step_in_epoch"] < last["steps_per_epoch"] and last["step"] > ckpts[-1]["step"]:
                return ckpts[-1]
            return None

        checkpoint = _wait_for(mid_epoch_after_checkpoint, 240, proc, "a mid-epoch step after a checkpoint", 0.05)
        infos = read_infos(run_dir)
        victim_node = next(n for n in ray_cluster["nodes"] if n.node_id == infos[1]["node_id"])
        killed_at = time.time()
        os.kill(raylet_pid(victim_node), signal.SIGKILL)  # the node's raylet: Ray declares it dead
        try:
            os.kill(infos[1]["pid"], signal.SIGKILL)  # and its training worker, as a lost machine
        except ProcessLookupError:
            pass
        cluster.worker_nodes.discard(victim_node)  # gone: the harness's shutdown must not wait for it
        ray_cluster["nodes"].remove(victim_node)

        shrunk = _wait_for(lambda: next((r for r in group_records(run_dir) if r["world_size"] == 1), None),
                           180, proc, "the group restarted on 1 worker", 0.2)
        joined = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port())  # a replacement node joins
        ray_cluster["nodes"].append(joined)
        grown = _wait_for(lambda: next((r for r in group_records(run_dir)[2:] if r["world_size"] == 2), None),
                          180, proc, "the group grown back to 2 workers", 0.2)
        # The grown group's rank 0 exports the run's totals: 2 restarts, both resizes.
        exported = _wait_for(lambda: _rank0_metrics(name), 60, proc, "rank 0's restart counters", 0.5)
        output = wait(proc, log, timeout_s=300)
    finally:
        if proc.poll() is None:
            proc.kill()

    records = group_records(run_dir)
    assert [r["world_size"] for r in records] == [2, 1, 2]
    assert [r["restart"] for r in records] == [False, True, True]
    assert [r["resized"] for r in records] == [False, True, True]
    # The survivor resumed from the last checkpoint before the kill (or a later one it committed).
    assert shrunk["resumed_step"] >= checkpoint["step"] and shrunk["first_step"] == shrunk["resumed_step"] + 1
    assert shrunk["node_ids"] == [infos[0]["node_id"]]  # the survivor
    assert joined.node_id in grown["node_ids"]  # the grown group uses the new node
    assert grown["resumed_step"] >= shrunk["resumed_step"]
    assert all(r["steps_redone"] >= 0 and r["restart_s"] > 0 for r in records[1:])
    assert exported["tsn_world_size"] == 2 and exported["tsn_max_workers"] == 2
    assert exported["tsn_worker_group_resizes_total"] == 2
    assert exported["tsn_worker_group_restart_seconds_total"] == pytest.approx(
        records[1]["restart_s"] + records[2]["restart_s"], abs=0.01)
    assert exported["tsn_worker_group_redone_steps_total"] == records[1]["steps_redone"] + records[2]["steps_redone"]
    # The run finished every epoch and the final test.
    results = json.loads((run_dir / "results.json").read_text())
    assert results.get("finished") and results["num_val_videos"] > 0
    history = {h["epoch"] for h in map(json.loads, (run_dir / "history.jsonl").read_text().splitlines())}
    assert history == set(range(epochs))
    assert "worker group restarted with 1 of 2 workers" in output
    assert "worker group restarted with 2 of 2 workers" in output
    # The numbers of the closing note (printed with -s; also in the run's event log).
    print(f"\n[elastic] kill -> first step on 1 worker: {shrunk['start_time'] - killed_at:.1f} s "
          f"(last step before -> first after: {shrunk['restart_s']:.1f} s), steps redone: shrink "
          f"{shrunk['steps_redone']}, grow {grown['steps_redone']}; grow restart {grown['restart_s']:.1f} s; "
          f"join -> first step on 2 workers: {grown['start_time'] - shrunk['start_time']:.1f} s after the shrink")


def _stop_events(run_dir: Path) -> list[dict]:
    from app.run_store import RunStore, read_jsonl

    return [r for r in read_jsonl(RunStore(run_dir).events_path) if r.get("event") == "stopped"]


@pytest.mark.slow
def test_sigterm_and_a_preemption_notice_checkpoint_at_the_step_and_redo_nothing(ray_cluster, packed_jpeg,
                                                                                  tmp_path_factory):
    """num_workers [1, 2] on the two worker nodes. (1) SIGTERM to rank 1's worker process
    mid-epoch (what Kubernetes sends a pod): every rank checkpoints at the step, the group
    restarts at once from it (2 workers: the node is still there). (2) A preemption notice for
    the node of the new group's rank 1 (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`,
    what the manifests' preStop hook runs): the same, and the group restarts on the other node
    alone (a drained node takes no new workers). No step is trained twice, every sample of
    every epoch once, and the records and rank 0's metrics show both stops."""
    import subprocess
    import sys

    cluster = ray_cluster["cluster"]
    storage = tmp_path_factory.mktemp("preempt")
    name, epochs = f"preempt-{os.getpid()}", 8
    run_dir = storage / name
    log = storage / "job.log"
    proc = start([*job_args(packed_jpeg, storage, name, free_port_pair(), workers="[1, 2]", epochs=epochs,
                            extra=("--set", "cluster.elastic_resize_monitor_interval_s=600",
                                   "--set", "cluster.max_failures=0")),  # a failure would end the job
                  "--address", cluster.address], log,
                 # Ray Train's elastic policy still counts the drained node's CPUs: its first
                 # restart waits out this timeout before it starts 1 worker (60 s by default)
                 env={**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"})
    drained = None
    try:
        def mid_epoch(group: int):
            records, last = group_records(run_dir), _last_step(run_dir)
            if len(records) < group or last is None or len(read_infos(run_dir)) < 2:
                return None
            if last["step"] >= records[group - 1]["first_step"] + 1 and 0 < last["step_in_epoch"] < last["steps_per_epoch"]:
                return last
            return None

        _wait_for(lambda: mid_epoch(1), 240, proc, "a mid-epoch step", 0.05)
        infos = read_infos(run_dir)
        sigterm_at = time.time()
        os.kill(infos[1]["pid"], signal.SIGTERM)
        second = _wait_for(lambda: next(iter(group_records(run_dir)[1:]), None), 120, proc,
                           "the group restarted after the SIGTERM", 0.2)
        _wait_for(lambda: mid_epoch(2) if len(read_infos(run_dir)) == 2 and all(
            w["start_time"] >= sigterm_at for w in read_infos(run_dir).values()) else None,
            120, proc, "a mid-epoch step of the second group", 0.05)
        victim = read_infos(run_dir)[1]["node_id"]
        drained = next(n for n in ray_cluster["nodes"] if n.node_id == victim)
        notice_at = time.time()
        subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address,
                        "--node-id", victim, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                        "--reason-message", "spot reclaim (test)", "--deadline-remaining-seconds", "60"],
                       check=True, capture_output=True, timeout=60)
        third = _wait_for(lambda: next(iter(group_records(run_dir)[2:]), None), 180, proc,
                          "the group restarted after the notice", 0.2)
        exported = _wait_for(lambda: _rank0_metrics(name, "tsn_worker_group_stops_total", 2), 60, proc,
                             "rank 0's stop counter", 0.5)
        output = wait(proc, log, timeout_s=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        if drained is not None:  # a drained node takes no work: a fresh one for the rest of the module
            cluster.remove_node(drained)
            ray_cluster["nodes"].remove(drained)
            ray_cluster["nodes"].append(cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port()))

    records = group_records(run_dir)
    assert [r["world_size"] for r in records] == [2, 2, 1], records
    stops = _stop_events(run_dir)
    assert [s["reason"] for s in stops][:1] == ["SIGTERM (rank 1)"] and len(stops) == 2, stops
    # Ray's watcher marks every rank; the first step after either mark stops them all
    assert stops[1]["reason"].startswith("preemption notice for node ") and set(stops[1]["ranks"]) <= {0, 1}
    assert [r["stop"] for r in records] == [None, stops[0]["reason"], stops[1]["reason"]]
    assert [r["steps_redone"] for r in records[1:]] == [0, 0]  # checkpointed at the step it stopped in
    assert [r["resumed_step"] for r in records[1:]] == [s["step"] for s in stops]
    assert third["node_ids"] == [n for n in second["node_ids"] if n != victim]
    assert exported["tsn_worker_group_stops_total"] == 2
    # Every step once, and every sample of every epoch once (over ranks and world sizes).
    step_records = [json.loads(line) for p in sorted((run_dir / "steps").glob("rank*.jsonl"))
                    for line in p.read_text().splitlines()]
    results = json.loads((run_dir / "results.json").read_text())
    assert sorted({(r["step"]) for r in step_records}) == list(range(1, results["steps"] + 1))
    for epoch in range(epochs):
        seen = sorted(i for r in step_records if r["epoch"] == epoch for i in r["sample_index"])
        assert seen == list(range(12)), (epoch, seen)
    assert "stopping: SIGTERM (rank 1)" in output
    print(f"\n[preemption] SIGTERM -> checkpoint stored {stops[0]['stop_s']:.1f} s after the request, first step "
          f"of the new group {second['start_time'] - sigterm_at:.1f} s after the SIGTERM (last step before -> first "
          f"after: {second['restart_s']:.1f} s), steps redone {second['steps_redone']}; notice -> checkpoint "
          f"{stops[1]['stop_s']:.1f} s after the watcher's mark, first step on 1 worker "
          f"{third['start_time'] - notice_at:.1f} s after the drain ({third['restart_s']:.1f} s), "
          f"steps redone {third['steps_redone']}")


# --------------------------------------------------------------------------- fast: no Ray processes


@pytest.mark.parametrize("value, expected", [("3", 3), ("[1, 4]", (1, 4)), ("[2, 2]", (2, 2))])
def test_num_workers_forms(value, expected):
    from app.config import config_from_dict, config_to_dict

    c = config_from_dict({}, [f"cluster.num_workers={value}"])
    assert c.cluster.num_workers == expected
    lo, hi = (expected, expected) if isinstance(expected, int) else expected
    assert (c.cluster.min_workers, c.cluster.max_workers, c.cluster.elastic) == (lo, hi, isinstance(expected, tuple))
    assert config_from_dict(config_to_dict(c)) == c  # the run's config.yaml / checkpoint round trip


@pytest.mark.parametrize("value, message", [
    ("0", "cluster.num_workers: must be >= 1 (or [min, max]), got 0"),
    ("[0, 2]", "cluster.num_workers: [min, max]: min must be >= 1, got [0, 2]"),
    ("[3, 2]", "cluster.num_workers: [min, max]: min must be <= max, got [3, 2]"),
    ("[1, 2, 3]", "cluster.num_workers: must be an integer >= 1 or a list of two integers [min, max], got [1, 2, 3]"),
    ("[1.5, 2]", "cluster.num_workers: must be an integer >= 1 or a list of two integers [min, max], got [1.5, 2]"),
    ("true", "cluster.num_workers: must be an integer >= 1 or a list of two integers [min, max], got True"),
    ("two", "cluster.num_workers: must be an integer >= 1 or a list of two integers [min, max], got 'two'"),
])
def test_num_workers_errors_name_the_key_and_the_rule(value, message):
    from app.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as e:
        config_from_dict({}, [f"cluster.num_workers={value}"])
    assert str(e.value) == message


def test_resize_interval_must_be_positive(tmp_path):
    from app.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("cluster:\n  elastic_resize_monitor_interval_s: 0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: cluster.elastic_resize_monitor_interval_s: must be > 0, got 0"):
        load_config(path)


def test_scaling_config_fixed_and_elastic():
    """Ray's own ScalingConfig accepts what `scaling_kwargs` makes of both forms."""
    import ray.train

    from app.config import config_from_dict
    from cluster.elastic import scaling_kwargs

    fixed = ray.train.ScalingConfig(**scaling_kwargs(config_from_dict({}, ["cluster.num_workers=3"]).cluster))
    assert not fixed.elasticity_enabled and fixed.num_workers == 3
    c = config_from_dict({}, ["cluster.num_workers=[2, 4]", "cluster.elastic_resize_monitor_interval_s=30",
                              "cluster.cpus_per_worker=2"]).cluster
    elastic = ray.train.ScalingConfig(**scaling_kwargs(c))
    assert elastic.elasticity_enabled and (elastic.min_workers, elastic.max_workers) == (2, 4)
    assert elastic.elastic_resize_monitor_interval_s == 30 and elastic.resources_per_worker == {"CPU": 2.0}


def _log_steps(store, rank, steps, t0, epoch=0):
    with store.open_step_log(rank) as log:
        for step in steps:
            log.write({"epoch": epoch, "step": step, "loss": 1.0})
    # StepLog stamps the wall time itself; rewrite it so the test controls the clock
    path = store.step_log_path(rank)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for i, rec in enumerate(lines[-len(steps):]):
        rec["time"] = t0 + i
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_group_records_restarts_resizes_and_time_lost(tmp_path):
    from app.run_store import RunStore
    from cluster.elastic import GroupTracker, group_records, totals

    store = RunStore(tmp_path / "run")
    first = GroupTracker(store, driver="d1", world_size=2, max_workers=2)
    assert first.totals_before() == {"restarts": 0, "stops": 0, "resizes": 0, "restart_s": 0.0, "steps_redone": 0}
    r1 = first.first_step(1, when=1000.0)
    assert (r1["restart"], r1["resized"], r1["restart_s"], r1["steps_redone"]) == (False, False, None, None)
    assert first.first_step(2) is None  # once per group
    _log_steps(store, 0, [1, 2, 3, 4, 5], t0=1000.0)  # last step 5 at t=1004
    _log_steps(store, 1, [1, 2, 3, 4], t0=1000.0)
    # The node of rank 1 is lost; the group restarts on 1 worker from the checkpoint at step 4.
    second = GroupTracker(store, driver="d1", world_size=1, max_workers=2)
    second.resumed_step = 4
    r2 = second.first_step(5, when=1040.5)
    assert (r2["restart"], r2["resized"], r2["restart_s"], r2["steps_redone"]) == (True, True, 36.5, 1)
    # The same size again after a crash: a restart, not a resize.
    _log_steps(store, 0, [5, 6], t0=1041.0)
    third = GroupTracker(store, driver="d1", world_size=1, max_workers=2)
    third.resumed_step = 6
    r3 = third.first_step(7, when=1050.0)
    assert (r3["restart"], r3["resized"], r3["restart_s"], r3["steps_redone"]) == (True, False, 8.0, 0)
    assert (r1["stop"], r2["stop"], r3["stop"]) == (None, None, None)
    # The group stops on request (SIGTERM) after checkpointing step 7, and restarts from it.
    _log_steps(store, 0, [7], t0=1051.0)
    store.append_event({"event": "stopped", "reason": "SIGTERM (rank 0)", "step": 7, "time": 1051.5})
    stopped = GroupTracker(store, driver="d1", world_size=1, max_workers=2)
    stopped.resumed_step = 7
    r4 = stopped.first_step(8, when=1054.0)
    assert (r4["restart"], r4["stop"], r4["steps_redone"], r4["restart_s"]) == (True, "SIGTERM (rank 0)", 0, 3.0)
    # The stop is the previous group's only: the next restart (a crash) is not one.
    after = GroupTracker(store, driver="d1", world_size=1, max_workers=2)
    after.resumed_step = 7
    assert after.first_step(8, when=1060.0)["stop"] is None
    # A re-run of the command (a new driver) is not a restart of the group.
    fourth = GroupTracker(store, driver="d2", world_size=1, max_workers=2)
    fourth.resumed_step = 8
    assert fourth.first_step(9, when=5000.0)["restart"] is False
    assert [r["world_size"] for r in group_records(store)] == [2, 1, 1, 1, 1, 1]
    assert totals(group_records(store)) == {"restarts": 4, "stops": 1, "resizes": 1, "restart_s": 56.5,
                                            "steps_redone": 1}


def test_restart_counters_rise_to_the_totals_and_never_fall():
    from prometheus_client import CollectorRegistry

    from cluster.metrics import WorkerMetrics

    reg = CollectorRegistry()
    m = WorkerMetrics("r", 0, "n", port=None, registry=reg, sd_dir=None)
    m.observe_group(1, 4)
    m.observe_group_totals({"restarts": 2, "resizes": 1, "restart_s": 44.5, "steps_redone": 3})
    m.observe_group_totals({"restarts": 1, "resizes": 1, "restart_s": 10.0, "steps_redone": 3})  # stale: ignored
    m.observe_group_totals({"restarts": 3, "stops": 1, "resizes": 2, "restart_s": 50.0, "steps_redone": 3})

    def value(name):
        return reg.get_sample_value(name, {"run": "r", "rank": "0", "node": "n"})

    assert (value("tsn_world_size"), value("tsn_max_workers")) == (1, 4)
    assert value("tsn_worker_group_restarts_total") == 3 and value("tsn_worker_group_resizes_total") == 2
    assert value("tsn_worker_group_restart_seconds_total") == 50.0
    assert value("tsn_worker_group_redone_steps_total") == 3 and value("tsn_worker_group_stops_total") == 1
    m.close()


def test_submit_passes_num_workers_through(tmp_path):
    """`tsn submit --set cluster.num_workers=[2, 4]` reaches the job's `tsn train` unchanged, and
    a bad range fails before anything is contacted."""
    import shlex

    from app.config import ConfigError, config_from_dict
    from cli.main import build_parser
    from cluster.submit import entrypoint, submit

    command = entrypoint(None, ["cluster.num_workers=[2, 4]"], None)
    argv = shlex.split(command)
    assert argv[:2] == ["tsn", "train"]
    args = build_parser().parse_args(argv[1:])
    assert config_from_dict({}, args.overrides).cluster.num_workers == (2, 4)
    with pytest.raises(ConfigError, match=r"cluster.num_workers: \[min, max\]: min must be <= max"):
        submit("http://127.0.0.1:1", None, ["cluster.num_workers=[4, 2]"], working_dir=str(tmp_path))
