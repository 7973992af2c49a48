"""The cluster pack (`tsn pack --address`), without Ray: the per-task work and the driver's
bookkeeping. `cluster.pack` only submits `pack_chunk` as Ray tasks and feeds the results back.

Division of work (the driver decides everything that makes the result equal to the local pack):

* the driver validates and locks exactly as `packer.pack_dataset` does, takes each split's
  videos in the local pack's seeded order (`packer.split_order`) and cuts the videos not done
  yet into chunks of consecutive videos (`plan_chunks`);
* one task per chunk (`pack_chunk`) decodes and encodes its videos one after another (the same
  `encode.pack_one`, through a one-process `procpool`, so a video that crashes its decoder is a
  rejection as in the local pack) and writes them as whole shards with `writer.ShardWriter`:
  into the shared output directory (``.partial`` then renamed), or for an ``s3://`` output into
  a local temporary directory, uploading each finished shard (tar, then index) itself;
* the task returns its shard records and rejections; only then does the driver journal them
  (`ChunkJournal.commit`): a shard counts once it is in the driver's journal, so a task killed
  halfway (Ray retries it from scratch, overwriting the same names) or a driver killed before
  journaling leaves nothing that is counted.

Sample numbering: a sample's index (its key, ``info`` and metadata) is the video's position in
its split's packing order. Without rejections that is exactly the local pack's numbering (which
counts packed videos); a rejected video leaves its number unused here, since a task cannot know
how many videos earlier chunks reject. Indices stay unique per split, which is all readers use.
A shard is named after its first sample's index (``train-000037.tar``), so names never collide
across chunks, retries or resumed runs. Labels, splits, order and every other metadata field are
the local pack's; shard boundaries differ (a chunk's last shard is usually not full).

Resuming (`load_cluster_state`, the local pack's rule without the "prefix" part, since tasks
finish in any order): every journaled shard whose tar (or object, for ``s3://``) has the
journaled size is kept and its videos are skipped; everything else in a split directory
(``*.partial``, shards never journaled) is deleted. The options file records the numbering
(`CLUSTER_OPTIONS`), so a local pack never resumes into a cluster pack's directory or back.

Why Ray tasks and not Ray Data: a unit of work here is "write these videos as whole shards,
with their indexes, and report the journal records", a side-effecting job whose output is a file
plus one small record, retried whole on failure. That is a task. Ray Data's transforms produce
blocks of rows for a downstream consumer (or its own file writers, with their own naming and no
DALI index or journal), and its retries and fusion would split or re-run work at row granularity.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dataloading import procpool
from dataloading.format import shards
from dataloading.pack import encode
from dataloading.pack.journal import Journal, SplitState, read_journal, rejected_record, settle_journal
from dataloading.pack.options import JOURNAL_FILE, REJECTED_FILE, PackError, PackOptions
from dataloading.pack.remote import RemoteOut
from dataloading.pack.writer import ShardWriter
from dataloading.sources.items import VideoItem
from dataloading.store import storage

# Recorded in the cluster pack's ``_options.json``: its sample numbering differs from the local
# pack's (see the module docstring), so neither resumes into the other's output.
CLUSTER_OPTIONS = {"sample_numbering": "split_position"}
# A chunk of at most this many videos: small enough to spread a split over the cluster and to
# lose little work to a killed task, large enough to fill several shards of a big collection.
MAX_VIDEOS_PER_TASK = 256
# Aim for this many chunks per CPU of the cluster (balance when video lengths vary).
CHUNKS_PER_CPU = 4


@dataclass(frozen=True)
class ChunkTask:
    """One task: the videos of one split, each with its position in the split's packing order
    (= its sample index), written as whole shards under ``out`` (a local directory every node
    sees, or an ``s3://`` prefix)."""

    split: str
    videos: tuple[tuple[int, VideoItem], ...]
    opts: PackOptions
    shard_size_bytes: int
    out: str


def videos_per_task(num_videos: int, cluster_cpus: int) -> int:
    """Default chunk size: ~`CHUNKS_PER_CPU` chunks per CPU, at most `MAX_VIDEOS_PER_TASK`."""
    return max(1, min(MAX_VIDEOS_PER_TASK, math.ceil(num_videos / max(1, CHUNKS_PER_CPU * cluster_cpus))))


def plan_chunks(ordered: list[VideoItem], done: set[str], split: str, opts: PackOptions, shard_size_bytes: int,
                out: str, per_task: int) -> list[ChunkTask]:
    """The split's not-yet-done videos (``ordered``: the packing order) in chunks of at most
    ``per_task`` videos, each video with its position in ``ordered``."""
    if per_task < 1:
        raise PackError(f"videos per task must be >= 1, got {per_task}")
    todo = [(pos, it) for pos, it in enumerate(ordered) if it.path not in done]
    return [ChunkTask(split, tuple(todo[i:i + per_task]), opts, shard_size_bytes, out)
            for i in range(0, len(todo), per_task)]


def pack_chunk(task: ChunkTask) -> dict:
    """Decode, encode and write one chunk as whole shards (runs in a Ray task; pure of Ray).

    Returns ``{"split", "shards": [journal record per shard], "rejected": [[path, reason]],
    "packed", "frames", "uploaded": {relative path: bytes}}``; the records are journaled by the driver
    (`ChunkJournal.commit`). Writing the same chunk again (a retry) rewrites the same names.
    Raises `storage.StorageError` when an upload fails after its retries."""
    remote = storage.is_uri(task.out)
    work_dir = Path(tempfile.mkdtemp(prefix="tsn-pack-chunk-")) if remote else Path(task.out)
    (work_dir / task.split).mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    uploaded: dict[str, int] = {}  # relative path -> bytes of the objects this task uploaded

    def shard_done(record: dict) -> None:
        # The next shard is named after the sample that did not fit (its index is set below).
        writer.next_shard = writer.next_index
        records.append(record)
        if remote:
            for key in ("path", "index_path"):
                uploaded[record[key]] = storage.upload_file(work_dir / record[key], storage.join(task.out, record[key]))
                (work_dir / record[key]).unlink()

    # Shard and sample numbers are set per sample below (positions in the split's order).
    writer = ShardWriter(work_dir, task.split, task.shard_size_bytes, _Records(), next_shard=0, next_index=0,
                         on_shard_done=shard_done)
    out = {"split": task.split, "shards": records, "rejected": [], "packed": 0, "frames": 0}
    results = procpool.ordered_results(encode.pack_one, [(it.path, task.opts) for _, it in task.videos], 1,
                                       preload=[encode.__name__], on_crash=encode.worker_died)
    opened = False
    try:
        for (pos, it), result in zip(task.videos, results):
            if "rejected" in result:
                out["rejected"].append([it.path, result["rejected"]])
                continue
            if not opened:  # the first shard is named after the first packed sample
                writer.next_shard, opened = pos, True
            writer.next_index = pos
            members, sample_stats = encode.sample_members(it, result, pos, task.opts)
            sample_stats["source_bytes"] = _source_bytes(it.path)
            writer.add(members, sample_stats)
            out["packed"] += 1
            out["frames"] += result["num_frames"]
        writer.finish_shard()
    except BaseException:
        writer.abort()
        raise
    finally:
        results.close()
        if remote:
            shutil.rmtree(work_dir, ignore_errors=True)
    out["uploaded"] = uploaded
    return out


class _Records:
    """The writer's journal inside a task: nothing is written; the driver journals the records
    `pack_chunk` returns (`ChunkJournal.commit`)."""

    def append(self, record: dict, sync: bool) -> None:
        pass


def _source_bytes(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def load_cluster_state(out_dir: Path, split: str, remote: RemoteOut | None = None) -> SplitState:
    """What a cluster pack's split journal says is done (module docstring, "Resuming"): every
    journaled shard whose tar has the journaled size -- in ``out_dir`` or, for an ``s3://``
    output (``remote``; ``out_dir`` is then its staging directory), as an object beside its
    index -- in order of first sample; and the rejections. Everything else is deleted: files in
    the local split directory, and objects under ``<prefix>/<split>/`` no kept shard names."""
    split_dir = out_dir / split
    journal_path = split_dir / JOURNAL_FILE
    records, dirty = read_journal(journal_path)
    kept: list[dict] = []
    rejected: dict[str, str] = {}
    stamps: dict[str, dict] = {}  # the rejected files' `journal.source_stamp`s (a changed file is retried)
    seen: set[str] = set()
    for rec in records:
        if rec["type"] == "rejected":
            rejected[rec["path"]] = rec["reason"]  # a later record (a retry) replaces an earlier one
            stamps[rec["path"]] = rec.get("source")
            continue
        if remote is None:
            tar_path = out_dir / rec["path"]
            valid = tar_path.is_file() and tar_path.stat().st_size == rec["num_bytes"]
        else:
            valid = (remote.uploaded_size(rec["path"]) == rec["num_bytes"]
                     and remote.uploaded_size(rec["index_path"]) is not None)
        valid = valid and rec["path"].startswith(f"{split}/") and not seen & set(rec["sources"])
        if not valid:
            dirty = True  # its videos are packed again
            continue
        if remote is None and not (out_dir / rec["index_path"]).is_file():
            shards.write_dali_index(out_dir / rec["path"], out_dir / rec["index_path"])
        seen |= set(rec["sources"])
        kept.append(rec)
    kept.sort(key=lambda r: r["first_sample_index"])
    settle_journal(journal_path, split_dir, kept, rejected, stamps, rewrite=dirty)
    if remote is not None:
        keep = {Path(r[k]).name for r in kept for k in ("path", "index_path")}
        for rel in remote.objects_under(split):
            if Path(rel).name not in keep | {JOURNAL_FILE}:  # the mirrored journal stays
                remote.delete_object(rel)  # uploaded by a task, never journaled
    return SplitState(kept, rejected, {p: st for p, st in stamps.items() if st})


class ChunkJournal:
    """The driver's side of finished chunks: each split's journal and ``rejected.jsonl``."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self._journals: dict[str, Journal] = {}
        self._rejected_log = open(out_dir / REJECTED_FILE, "a")

    def commit(self, result: dict) -> None:
        """Journal a finished chunk (`pack_chunk`'s result): its rejections, then its shards
        (fsync'ed); from here on they are done for a re-run."""
        split = result["split"]
        journal = self._journals.get(split)
        if journal is None:
            (self.out_dir / split).mkdir(exist_ok=True)
            journal = self._journals[split] = Journal(self.out_dir / split / JOURNAL_FILE)
        for path, reason in result["rejected"]:
            journal.append(rejected_record(path, reason), sync=False)
            self._rejected_log.write(json.dumps({"path": path, "reason": reason, "split": split}) + "\n")
        self._rejected_log.flush()
        for record in result["shards"]:
            journal.append(record, sync=True)

    def close(self) -> None:
        for journal in self._journals.values():
            journal.close()
        self._rejected_log.close()


def done_sources(states: dict[str, SplitState]) -> dict[str, str]:
    """{source: split} of the videos a re-run skips: packed, or rejected and unchanged since (a
    rejected file that changed is tried again, as in the local pack)."""
    return {src: split for split, state in states.items()
            for src in state.packed_sources | (state.rejected.keys() - state.changed_rejected())}


def check_splits_unchanged(items: list[VideoItem], states: dict[str, SplitState], where) -> None:
    """A video must stay in the split it was packed into (as in the local pack)."""
    done = done_sources(states)
    for it in items:
        if done.get(it.path, it.split) != it.split:
            raise PackError(
                f"{it.path}: is in split {it.split!r} now but was packed into {done[it.path]!r} in "
                f"{where}; the inputs changed -- pick a new --out, or pass --overwrite to start over")

