"""Worker metrics: names, labels, values, ports per local rank, service discovery files."""

import json
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cluster.metrics import NODE_NAME_ENV, WorkerMetrics, node_label, worker_port


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def value(registry, name, **labels):
    v = registry.get_sample_value(name, labels)
    assert v is not None, f"{name} {labels} not exported"
    return v


def test_step_eval_checkpoint_values():
    reg = CollectorRegistry()
    m = WorkerMetrics("r1", 1, "n0", port=None, registry=reg, sd_dir=None)
    lab = dict(run="r1", rank="1", node="n0")
    m.observe_step(dict(epoch=2, step=40, loss=1.5, lr=0.01, videos=8, frames=24, data_wait_s=0.25, step_s=1.0,
                        step_in_epoch=10, steps_per_epoch=20, skipped_samples=2, h2d_s=0.01,
                        input_stages={"read": 0.5, "decode": 1.0}))
    m.observe_step(dict(epoch=2, step=41, loss=1.25, lr=0.01, videos=8, frames=24, data_wait_s=0.5, step_s=2.0,
                        skipped_samples=3, h2d_s=0.02, input_stages={"read": 0.75, "decode": 1.5, "finish": 0.25}))
    # The loader's cumulative stage seconds become counters (a label per stage), as given.
    assert {s: value(reg, "tsn_input_stage_seconds_total", **lab, stage=s) for s in ("read", "decode", "finish")} \
        == {"read": 0.75, "decode": 1.5, "finish": 0.25}
    assert value(reg, "tsn_host_to_device_seconds_total", **lab) == pytest.approx(0.03)
    assert value(reg, "tsn_train_loss", **lab) == 1.25
    # Rates come from counters (rate() in Prometheus), not from gauges of the last step.
    assert value(reg, "tsn_data_wait_seconds_total", **lab) == 0.75
    assert value(reg, "tsn_step_seconds_total", **lab) == 3.0
    assert value(reg, "tsn_train_videos_total", **lab) == 16
    assert value(reg, "tsn_train_frames_total", **lab) == 48
    assert value(reg, "tsn_train_steps_total", **lab) == 2
    assert value(reg, "tsn_skipped_samples_total", **lab) == 3
    assert value(reg, "tsn_global_step", **lab) == 41
    assert value(reg, "tsn_step_duration_seconds_count", **lab) == 2
    assert value(reg, "tsn_epoch_progress_ratio", **lab) == 0.5
    m.observe_eval(dict(top1=0.5, top5=0.9, mean_class_accuracy=0.45))
    assert value(reg, "tsn_eval_mean_class_accuracy_ratio", **lab) == 0.45
    m.observe_checkpoint(1234, 0.5, when=100.0)
    assert value(reg, "tsn_last_checkpoint_size_bytes", **lab) == 1234
    assert value(reg, "tsn_last_checkpoint_timestamp_seconds", **lab) == 100.0
    assert value(reg, "tsn_worker_up", **lab) == 1
    m.close()
    assert value(reg, "tsn_worker_up", **lab) == 0


def test_two_local_ranks_serve_on_distinct_ports_and_register(tmp_path):
    base = free_port()
    while True:  # base and base + 1 both free
        try:
            with socket.socket() as s:
                s.bind(("0.0.0.0", base + 1))
            break
        except OSError:
            base = free_port()
    workers = [WorkerMetrics("run-x", r, "node-a", port=worker_port(base, r), sd_dir=str(tmp_path),
                             host="127.0.0.1") for r in (0, 1)]
    for r, w in enumerate(workers):
        w.observe_step(dict(epoch=0, step=r + 1, loss=2.0, videos=1, frames=3, data_wait_s=0.0, step_s=0.5))
        body = urllib.request.urlopen(f"http://127.0.0.1:{base + r}/metrics", timeout=5).read().decode()
        assert f'tsn_global_step{{node="node-a",rank="{r}",run="run-x"}} {float(r + 1)}' in body
    entries = sorted(tmp_path.glob("*.json"))
    assert len(entries) == 2
    targets = [json.loads(p.read_text())[0] for p in entries]
    assert {t["targets"][0] for t in targets} == {f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"}
    assert all(t["labels"]["job"] == "tsn" and t["labels"]["run"] == "run-x" for t in targets)
    for w in workers:
        w.close()
    assert not list(tmp_path.glob("*.json"))


def test_no_per_step_rate_gauges_and_no_created_series():
    """Issue 16: rates are rate() of counters, and *_created series are not exported."""
    reg = CollectorRegistry()
    m = WorkerMetrics("r1", 0, "n0", port=None, registry=reg, sd_dir=None)
    m.observe_step(dict(epoch=0, step=1, loss=1.0, videos=8, frames=24, data_wait_s=0.5, step_s=2.0))
    names = {s.name for family in reg.collect() for s in family.samples}
    for gone in ("tsn_train_videos_per_second", "tsn_train_frames_per_second", "tsn_step_last_seconds",
                 "tsn_data_wait_last_seconds", "tsn_data_wait_ratio"):
        assert gone not in names
    assert not [n for n in names if n.endswith("_created")], names
    assert "tsn_step_duration_seconds_bucket" in names and "tsn_train_videos_total" in names
    body = generate_latest(reg).decode()
    assert "_created" not in body


def test_node_label_is_the_kubernetes_node_name_when_given(monkeypatch, tmp_path):
    """On Kubernetes the pod passes spec.nodeName in TSN_NODE_NAME: the node label is that name,
    while the discovery entry still targets the node's address."""
    monkeypatch.setenv(NODE_NAME_ENV, "gpu-node-7")
    reg = CollectorRegistry()
    port = free_port()
    m = WorkerMetrics("r1", 0, "10.1.2.3", port=port, registry=reg, sd_dir=str(tmp_path), host="127.0.0.1")
    assert value(reg, "tsn_worker_up", run="r1", rank="0", node="gpu-node-7") == 1
    entry = json.loads(next(tmp_path.glob("*.json")).read_text())[0]
    assert entry["targets"] == [f"127.0.0.1:{port}"] and entry["labels"]["node"] == "gpu-node-7"
    m.close()
    monkeypatch.delenv(NODE_NAME_ENV)
    assert node_label("10.1.2.3") == "10.1.2.3"


def test_port_zero_disables():
    assert worker_port(0, 3) is None
    assert worker_port(9450, 3) == 9453
