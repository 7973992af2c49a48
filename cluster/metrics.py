"""Per-worker Prometheus metrics for TSN training (Ray Train exports none of these itself).

Every worker serves its own registry on ``base_port + local_rank`` (workers sharing a node
never collide) with labels ``run``, ``rank``, ``node``, and writes a Prometheus file
service-discovery entry (one JSON file per worker, in a directory beside Ray's own discovery
file) so a Prometheus started with `file_sd_configs` on ``<dir>/*.json`` finds every worker.
A port in use (another run on the node, any other program) does not stop training: the
endpoint moves to a free port, says which in a warning, and the discovery entry names the
port actually served (`serve`).

Exposure: the endpoint has no authentication and shows the run name, node, rank, loss, lr,
throughput, evaluation accuracy and checkpoint times (no data, weights or credentials). It
listens on ``metrics.bind_address``; null: all interfaces inside a Kubernetes pod (Prometheus
scrapes the pod IP), loopback elsewhere (`default_bind_address`).

Labels: the worker is the one source of its identity. Only it knows its rank (Ray Train assigns
ranks, no pod label or discovery meta data holds them), so the series carry ``run``, ``rank``,
``node`` themselves. The discovery entry repeats them as target labels (they name the target on
Prometheus's targets page and label its ``up`` series); the scrape job that reads the entries
sets ``honor_labels: true`` (k8s/monitoring/prometheus-local.yml), so the series keep their own
labels instead of gaining ``exported_run`` / ``exported_rank`` / ``exported_node`` copies. On
Kubernetes the PodMonitor adds only labels the series do not carry (``ray_io_cluster``, pod,
namespace). ``node`` is the Kubernetes node name when the pod passes it in ``TSN_NODE_NAME``
(the downward API's ``spec.nodeName``, k8s/base/raycluster.yaml), else the node's address.

Rates are not computed here: throughput, step time and data wait are counters (``_total``) and
a histogram, and the dashboard and alerts take ``rate()`` of them over their own window, so no
value depends on which step happened to be last at scrape time. ``*_created`` series are not
exported (`prometheus_client.disable_created_metrics`): they would double the series count and
nothing reads them.

Names follow Prometheus conventions: ``tsn_`` prefix, base units (seconds, bytes, ratios),
``_total`` for counters.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from pathlib import Path

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               start_http_server)

from dataloading.store.files import atomic_write_json

log = logging.getLogger(__name__)

DEFAULT_SD_DIR = "/tmp/ray/tsn_prom_sd"  # Ray writes /tmp/ray/prom_metrics_service_discovery.json
LABELS = ("run", "rank", "node")
NODE_NAME_ENV = "TSN_NODE_NAME"  # the Kubernetes node name, from the downward API (spec.nodeName)
# Step durations on CPU smoke runs are ~0.1-10 s, on GPUs ~0.05-2 s.
STEP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    """The metrics of one training worker; ``observe_*`` methods take the training loop's
    metric dicts (`app.hooks` contract) and update the series."""

    def __init__(self, run: str, rank: int, node: str, *, port: int | None, registry=None,
                 sd_dir: str | None = DEFAULT_SD_DIR, host: str | None = None, bind: str | None = None):
        """``node``: this node's address; the ``node`` label is `node_label` (the Kubernetes
        node name when set). ``bind``: the address the endpoint listens on (None:
        `default_bind_address`). ``host``: the address Prometheus scrapes (default: 127.0.0.1
        when bound to loopback, `node_address` when bound to all interfaces, else ``bind``).
        ``port`` taken: the endpoint serves on a free port instead (``self.port``, logged, in the
        discovery entry); no port at all: a warning, training goes on without the endpoint."""
        disable_created_metrics()  # process-wide; read at collection time (module docstring)
        self.registry = registry or CollectorRegistry()
        self.labels = {"run": run, "rank": str(rank), "node": node_label(node)}
        r = self.registry

        def gauge(name, doc):
            return Gauge(name, doc, LABELS, registry=r).labels(**self.labels)

        def counter(name, doc):
            return Counter(name, doc, LABELS, registry=r).labels(**self.labels)

        self.loss = gauge("tsn_train_loss", "Training loss of the last step (cross-entropy on consensus scores)")
        self.lr = gauge("tsn_learning_rate", "Base learning rate of the last step")
        self.step_hist = Histogram("tsn_step_duration_seconds", "Training step wall time", LABELS,
                                   buckets=STEP_BUCKETS_S, registry=r).labels(**self.labels)
        self.data_wait_total = counter("tsn_data_wait_seconds_total", "Time spent waiting for batches")
        self.step_total_s = counter("tsn_step_seconds_total", "Time spent in training steps, data wait included")
        self.videos_total = counter("tsn_train_videos_total", "Training videos consumed")
        self.frames_total = counter("tsn_train_frames_total", "Training frames decoded")
        self.steps_total = counter("tsn_train_steps_total", "Training steps done")
        self.skipped_total = counter("tsn_skipped_samples_total", "Corrupt samples skipped by the data pipeline")
        # Per input stage (dataloading.pipeline.stage_times: read, plan, read_wait, decode, finish) and
        # the loop's host-to-device copy: seconds per batch = rate(stage) / rate(steps).
        self._stage_total = Counter("tsn_input_stage_seconds_total",
                                    "Seconds in each stage of the input pipeline (read and plan: summed over the "
                                    "read threads)", (*LABELS, "stage"), registry=r)
        self._stage_seen: dict[str, float] = {}
        self.h2d_total = counter("tsn_host_to_device_seconds_total", "Time issuing batches' copies to the device")
        self.epoch = gauge("tsn_epoch", "Current epoch (0-based)")
        self.step = gauge("tsn_global_step", "Global training step")
        self.epoch_progress = gauge("tsn_epoch_progress_ratio", "Fraction of the current epoch done")
        self.ckpt_time = gauge("tsn_last_checkpoint_timestamp_seconds", "Unix time of the last checkpoint")
        self.ckpt_size = gauge("tsn_last_checkpoint_size_bytes", "Size of the last checkpoint")
        self.ckpt_write_s = gauge("tsn_last_checkpoint_write_seconds",
                                  "Time to write and store the last checkpoint (in the background)")
        self.ckpt_stall_s = gauge("tsn_last_checkpoint_stall_seconds",
                                  "Time the training loop waited on the last checkpoint")
        self.ckpt_stall_total = counter("tsn_checkpoint_stall_seconds_total",
                                        "Time the training loop waited on checkpoints")
        self.top1 = gauge("tsn_eval_top1_ratio", "Validation top-1 accuracy")
        self.top5 = gauge("tsn_eval_top5_ratio", "Validation top-5 accuracy")
        self.mca = gauge("tsn_eval_mean_class_accuracy_ratio", "Validation mean class accuracy")
        self.up = gauge("tsn_worker_up", "1 while the worker trains")
        self.gpu_mem = gauge("tsn_gpu_memory_used_bytes", "GPU memory allocated by this worker (CUDA only)")
        self.gpu_util = gauge("tsn_gpu_utilization_ratio", "GPU utilisation (CUDA only)")
        # Worker groups (cluster/elastic.py): every rank reports its group's size; the restart
        # counters count on rank 0 only (others stay 0: read them with max by (run)), starting
        # at the run's totals so far, so they rise across restarts.
        self.world_size = gauge("tsn_world_size", "Workers in the current worker group")
        self.max_workers = gauge("tsn_max_workers", "Largest worker group of the run (cluster.num_workers or its max)")
        self._group_counters = {
            "restarts": counter("tsn_worker_group_restarts_total",
                                "Worker-group restarts (after a failure or a resize)"),
            "stops": counter("tsn_worker_group_stops_total",
                             "Worker-group restarts after a stop on request (SIGTERM, a preemption notice), "
                             "which checkpointed first"),
            "resizes": counter("tsn_worker_group_resizes_total", "Worker-group restarts with another world size"),
            "restart_s": counter("tsn_worker_group_restart_seconds_total",
                                 "Training time lost to restarts: last step before to first step after"),
            "steps_redone": counter("tsn_worker_group_redone_steps_total",
                                    "Steps trained again after restarts (since the checkpoint resumed from)")}
        self._group_seen = dict.fromkeys(self._group_counters, 0.0)
        self._skipped_seen = 0
        self.port: int | None = None
        self.host: str | None = None
        self.sd_file: Path | None = None
        self._server = None
        if port:
            bind = bind or default_bind_address()
            self._server, self.port = serve(port, bind, r)
            if self.port is not None:
                self.host = host or scrape_host(bind)
                if sd_dir:
                    self.sd_file = write_sd_entry(sd_dir, self.host, self.port, self.labels)
        self.up.set(1)

    @property
    def url(self) -> str | None:
        """Where this worker's endpoint answers (None without one)."""
        return f"http://{self.host}:{self.port}/metrics" if self.port else None

    def observe_step(self, m: dict) -> None:
        step_s = max(float(m.get("step_s", 0.0)), 0.0)
        wait_s = float(m.get("data_wait_s", 0.0))
        videos, frames = int(m.get("videos", 0)), int(m.get("frames", 0))
        self.loss.set(float(m["loss"]))
        if "lr" in m:
            self.lr.set(float(m["lr"]))
        self.step_hist.observe(step_s)
        self.data_wait_total.inc(wait_s)
        self.step_total_s.inc(step_s)
        self.videos_total.inc(videos)
        self.frames_total.inc(frames)
        self.steps_total.inc()
        self.epoch.set(int(m.get("epoch", 0)))
        self.step.set(int(m.get("step", 0)))
        if m.get("steps_per_epoch"):
            self.epoch_progress.set(min(int(m.get("step_in_epoch", 0)) / int(m["steps_per_epoch"]), 1.0))
        self.h2d_total.inc(max(float(m.get("h2d_s", 0.0)), 0.0))
        for stage, seconds in (m.get("input_stages") or {}).items():  # cumulative from the loader
            new = float(seconds) - self._stage_seen.get(stage, 0.0)
            if new > 0:
                self._stage_total.labels(**self.labels, stage=stage).inc(new)
                self._stage_seen[stage] = float(seconds)
        if "skipped_samples" in m:  # cumulative count from the loader
            new = int(m["skipped_samples"]) - self._skipped_seen
            if new > 0:
                self.skipped_total.inc(new)
                self._skipped_seen += new
        self._observe_gpu()

    def observe_group(self, world_size: int, max_workers: int) -> None:
        self.world_size.set(world_size)
        self.max_workers.set(max_workers)

    def observe_group_totals(self, totals: dict) -> None:
        """Rank 0: the run's restart totals so far (`cluster.elastic.totals`: restarts, stops,
        resizes, restart_s, steps_redone); the counters rise to them (they never go down)."""
        for key, counter_ in self._group_counters.items():
            new = float(totals.get(key, 0)) - self._group_seen[key]
            if new > 0:
                counter_.inc(new)
                self._group_seen[key] += new

    def observe_eval(self, m: dict) -> None:
        for key, g in (("top1", self.top1), ("top5", self.top5), ("mean_class_accuracy", self.mca)):
            if key in m:
                g.set(float(m[key]))

    def observe_checkpoint(self, size_bytes: int, write_s: float, when: float | None = None) -> None:
        self.ckpt_time.set(when if when is not None else time.time())
        self.ckpt_size.set(size_bytes)
        self.ckpt_write_s.set(write_s)

    def observe_checkpoint_stall(self, seconds: float) -> None:
        self.ckpt_stall_s.set(seconds)
        self.ckpt_stall_total.inc(seconds)

    def _observe_gpu(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                self.gpu_mem.set(torch.cuda.memory_allocated())
                try:
                    self.gpu_util.set(torch.cuda.utilization() / 100.0)
                except Exception:  # needs pynvml; memory is still reported
                    pass
        except ImportError:
            pass

    def close(self) -> None:
        self.up.set(0)
        if self.sd_file is not None:
            self.sd_file.unlink(missing_ok=True)
            self.sd_file = None
        if self._server is not None:  # frees the port for the next worker in this process
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def default_bind_address() -> str:
    """``metrics.bind_address: null``: all interfaces inside a Kubernetes pod (Prometheus
    scrapes the pod's IP; the pod network is the boundary), loopback elsewhere (the endpoint
    has no authentication and names the run, node and loss)."""
    return "0.0.0.0" if os.environ.get("KUBERNETES_SERVICE_HOST") else "127.0.0.1"


def scrape_host(bind: str) -> str:
    """The address Prometheus reaches an endpoint bound to ``bind`` at."""
    if bind in ("0.0.0.0", "::", ""):
        return node_address()
    return "127.0.0.1" if bind.startswith("127.") or bind == "::1" else bind


def serve(port: int, bind: str, registry) -> tuple[object | None, int | None]:
    """Start the endpoint on ``bind:port``; when that port is in use (another run, another
    engineer's test, a leftover process), on a free port the kernel picks, with a warning naming
    both. Returns (server, the port served) or (None, None) with a warning when nothing could be
    bound: a metrics endpoint never ends training."""
    try:
        server, _ = start_http_server(port, addr=bind, registry=registry)
        return server, port
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            log.warning("metrics endpoint not started: cannot listen on %s:%d (%s); training goes on "
                        "without it (metrics.bind_address / metrics.port)", bind, port, e.strerror or e)
            return None, None
    try:
        server, _ = start_http_server(0, addr=bind, registry=registry)
    except OSError as e:
        log.warning("metrics endpoint not started: port %d is in use and no free port on %s (%s)", port, bind,
                    e.strerror or e)
        return None, None
    actual = server.server_port
    log.warning("metrics port %d is in use on %s: serving on port %d instead (registered in the file-SD entry)",
                port, bind, actual)
    return server, actual


def node_label(address: str) -> str:
    """The ``node`` label: ``$TSN_NODE_NAME`` (the Kubernetes node name) when set, else ``address``."""
    return os.environ.get(NODE_NAME_ENV) or address


def node_address() -> str:
    """This node's address as other hosts (Prometheus) reach it."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())


def write_sd_entry(sd_dir: str, host: str, port: int, labels: dict) -> Path:
    """One Prometheus file_sd target group for this worker, written atomically."""
    d = Path(sd_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"tsn-{labels['run']}-rank{labels['rank']}.json"
    # Prometheus re-reads the directory on its own schedule: it must never see a torn file.
    return atomic_write_json(path, [{"targets": [f"{host}:{port}"], "labels": {"job": "tsn", **labels}}],
                             indent=None, durable=False)


def worker_port(base_port: int, local_rank: int) -> int | None:
    """``base_port + local_rank``; None when metrics are disabled (base 0)."""
    return base_port + local_rank if base_port else None
