"""`tsn pack --address`: the pack spread over a Ray cluster's CPUs, one Ray task per chunk of
videos (`dataloading.pack.tasks`: the work, the chunk plan, the journal rule, and why tasks
rather than Ray Data). This module only connects to Ray, submits the tasks, and feeds the
finished chunks back to the driver's journal with a progress bar.

The output equals the local pack's (`dataloading.pack.pack_dataset`, which still validates,
locks and writes the manifest: this is its ``body``) in samples, labels, splits, order and
per-sample metadata; see `tasks` for the sample numbering and the shard boundaries.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cluster.connect import ClusterConnectError, join
from dataloading.pack import pack_dataset, split_order, tasks
from dataloading.pack.manifest import write_outputs
from dataloading.pack.options import PackError, PackOptions
from dataloading.pack.remote import RemoteOut
from dataloading.sources.items import SPLITS, VideoItem
from dataloading.store import storage

# A task killed with its worker (node lost, OOM) is re-run this many times before the pack fails.
TASK_RETRIES = 3


def connect(address: str, num_cpus: int | None = None, env_vars: dict | None = None) -> None:
    """Join the Ray cluster at ``address`` (``auto``, ``host:port``, ``ray://host:10001``), or
    start a local one of ``num_cpus`` CPUs for ``address="local"``; a no-op when connected."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": env_vars} if env_vars else None
    try:
        if address == "local":
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                     log_to_driver=False)
        else:
            join(address, runtime_env=runtime_env, log_to_driver=False)  # with the cluster's token
    except ClusterConnectError as e:
        raise PackError(str(e)) from None
    except ConnectionError as e:
        raise PackError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None


def disconnect() -> None:
    """Leave the Ray cluster (a local one `connect` started stops with it)."""
    import ray

    ray.shutdown()


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def pack_on_cluster(items: Sequence[VideoItem], classes: Sequence[str], out_dir, *, address: str,
                    num_cpus: int | None = None, videos_per_task: int | None = None, **pack_kwargs) -> dict:
    """`pack_dataset` with the decoding and encoding in Ray tasks on the cluster at ``address``
    (see `connect`); the same keyword arguments (``workers`` is ignored: every CPU of the
    cluster takes a task). ``videos_per_task``: chunk size (default `tasks.videos_per_task`).
    For an ``s3://`` output the driver's AWS variables are passed to the tasks (workers on other
    nodes do not share its environment); a local ``out_dir`` must be on a filesystem every
    node mounts at the same path. Returns the manifest."""
    env = {k: os.environ[k] for k in storage.AWS_ENV_VARS if k in os.environ} if storage.is_uri(out_dir) else {}
    connect(address, num_cpus, env)

    def body(items, classes, out_dir, opts, shard_size_bytes, progress, remote):
        return _run_tasks(items, classes, out_dir, opts, shard_size_bytes, progress, remote, videos_per_task)

    return pack_dataset(items, classes, out_dir, body=body, extra_options=tasks.CLUSTER_OPTIONS, **pack_kwargs)


def _run_tasks(items: list[VideoItem], classes: list[str], out_dir: Path, opts: PackOptions, shard_size_bytes: int,
               progress: bool, remote: RemoteOut | None, per_task: int | None) -> tuple[dict, dict]:
    """`pack_dataset`'s body on the cluster: (manifest, run counts)."""
    import ray

    states = {split: tasks.load_cluster_state(out_dir, split, remote) for split in SPLITS
              if (out_dir / split).is_dir()}
    tasks.check_splits_unchanged(items, states, remote.uri if remote is not None else out_dir)
    done = set(tasks.done_sources(states))
    orders = {split: split_order(items, split, opts.seed) for split in SPLITS}
    orders = {split: order for split, order in orders.items() if order}
    total = sum(len(order) for order in orders.values())
    todo = sum(1 for order in orders.values() for it in order if it.path not in done)
    cpus = cluster_cpus()
    per_task = per_task or tasks.videos_per_task(todo, cpus)
    target = remote.uri if remote is not None else str(out_dir.resolve())
    chunks = [c for split, order in orders.items()
              for c in tasks.plan_chunks(order, done, split, opts, shard_size_bytes, target, per_task)]
    stats = {"packed": 0, "rejected": 0, "skipped": total - todo, "frames": 0, "workers": cpus,
             "tasks": len(chunks), "videos_per_task": per_task}

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=total - todo, unit="video", file=sys.stderr, dynamic_ncols=True,
                   desc=f"pack on {cpus} CPUs")
        bar.set_postfix(rejected=0)
    remote_fn = ray.remote(tasks.pack_chunk).options(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)
    pending = {remote_fn.remote(c): c for c in chunks}
    journal = tasks.ChunkJournal(out_dir)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                chunk = pending.pop(ref)
                result = ray.get(ref)  # a task's exception (e.g. a failed upload) ends the pack here
                journal.commit(result)
                if remote is not None:
                    for rel, num_bytes in result["uploaded"].items():
                        remote.record_upload(rel, num_bytes)
                    remote.mirror_journal(result["split"])  # a retry on a new pod redoes nothing
                stats["packed"] += result["packed"]
                stats["rejected"] += len(result["rejected"])
                stats["frames"] += result["frames"]
                if bar is not None:
                    bar.set_postfix(rejected=stats["rejected"], refresh=False)
                    bar.update(len(chunk.videos))
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        journal.close()
        if bar is not None:
            bar.close()

    states = {split: tasks.load_cluster_state(out_dir, split, remote) for split in SPLITS
              if (out_dir / split).is_dir()}
    manifest = write_outputs(out_dir, opts, classes, states, set(orders))
    if remote is not None:
        remote.finish(manifest)  # rejected.jsonl, then the manifest: after every shard it names
    return manifest, stats
