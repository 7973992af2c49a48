"""`tsn pack`: decode source videos once and pack them into WebDataset tar shards.

Output directory (sample format: `dataloading.shards`)::

    OUT/_options.json                  packing options (+ classes); guards resuming
    OUT/<split>/<split>-000000.tar     POSIX (ustar) shards; appear only when complete
    OUT/<split>/<split>-000000.idx     DALI webdataset index of each shard
    OUT/<split>/_journal.jsonl         resume journal: one line per finished shard / rejected video
    OUT/rejected.jsonl                 {"path", "reason", "split"} per rejected video
    OUT/manifest.json                  written last (see `pack_dataset`)
    OUT/_lock                          flock()ed while a packer runs

Pipeline per split: the split's videos in a seeded random order (samples are shuffled across
shards) -> worker processes decode, resize and encode each video (results consumed in input
order, so the output does not depend on the number of workers or on timing) -> samples are
appended to the current shard, which rolls over before it would exceed the size bound.

Resuming: the journal records each shard only after it was renamed to its final name and
indexed, together with the source paths it holds. A re-run with the same options keeps those
shards, skips their videos and the rejected ones, deletes leftovers of an interrupted run
(``*.partial``, unjournaled shards) and continues the shard and sample numbering. Because the
order and the roll-over rule are deterministic, an interrupted run that is resumed produces the
same shards as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import sys
import tarfile
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock (packing one directory twice at once is then on the user)
    fcntl = None

from dataloading import flow, shards
from dataloading.inputs import SPLITS, VideoItem, read_inputs
from dataloading.video_io import VideoEncoder, VideoError, encode_gray_jpeg, encode_jpeg, read_video_frames

FORMAT_VERSION = 1
OPTIONS_FILE = "_options.json"
JOURNAL_FILE = "_journal.jsonl"
REJECTED_FILE = "rejected.jsonl"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = "_lock"
PARTIAL_SUFFIX = ".partial"
# Options missing from an `_options.json` written before they existed, with the value they had.
LEGACY_OPTIONS = {"modalities": [shards.MODALITY_RGB], "flow_algorithm": None, "flow_bound": None}

DEFAULT_SHARD_SIZE_BYTES = 256 * 2**20
TAR_BLOCK_BYTES = tarfile.BLOCKSIZE  # 512: header and data granularity
TAR_RECORD_BYTES = tarfile.RECORDSIZE  # 10240: Python's tarfile pads the archive to this
TAR_END_BYTES = 2 * TAR_BLOCK_BYTES  # two zero blocks end an archive


class PackError(ValueError):
    """A user-facing packing failure (bad options, options mismatch, nothing usable)."""


@dataclass(frozen=True)
class PackOptions:
    """The options that determine shard contents; a resumed run must use the same ones."""

    codec: str
    short_side: int | None
    jpeg_quality: int
    gop: int
    fps: float | None
    min_frames: int
    seed: int
    # Motion modalities (`dataloading.flow`), stored beside the RGB frames; the flow options
    # are None when no flow modality is packed (they do not affect an RGB-only pack).
    modalities: tuple[str, ...] = (shards.MODALITY_RGB,)
    flow_algorithm: str | None = None
    flow_bound: float | None = None

    @property
    def layout(self) -> str:
        return shards.CODEC_LAYOUT[self.codec]

    @property
    def flow_modalities(self) -> tuple[str, ...]:
        return tuple(m for m in self.modalities if m in shards.FLOW_MODALITIES)

    def validate(self) -> None:
        if self.codec not in shards.CODEC_LAYOUT:
            raise PackError(f"unknown codec {self.codec!r}; expected one of {', '.join(shards.CODEC_LAYOUT)}")
        if self.short_side is not None and self.short_side < 2:
            raise PackError(
                f"short_side must be >= 2 (or None to keep the source size), got {self.short_side}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise PackError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.gop < 1:
            raise PackError(f"gop must be >= 1, got {self.gop}")
        if self.fps is not None and not self.fps > 0:
            raise PackError(f"fps must be > 0 (or None to keep the source rate), got {self.fps}")
        if self.min_frames < 1:
            raise PackError(f"min_frames must be >= 1, got {self.min_frames}")
        unknown = [m for m in self.modalities if m not in shards.PACKABLE_MODALITIES]
        if unknown or not self.modalities:
            raise PackError(f"unknown modalities {unknown}; expected a list of {', '.join(shards.PACKABLE_MODALITIES)}")
        if len(set(self.modalities)) != len(self.modalities):
            raise PackError(f"modalities listed twice: {list(self.modalities)}")
        if shards.MODALITY_RGB not in self.modalities:
            # info/offsets and the sampling contract are defined on the RGB frames
            raise PackError(f"modalities must include rgb (flow frames are indexed by the RGB frames), "
                            f"got {list(self.modalities)}")
        if self.flow_modalities:
            if self.flow_algorithm not in flow.ALGORITHMS:
                raise PackError(f"unknown flow algorithm {self.flow_algorithm!r}; expected one of "
                                f"{', '.join(flow.ALGORITHMS)}")
            try:
                flow.check_algorithm(self.flow_algorithm)
            except flow.FlowError as e:
                raise PackError(str(e)) from None
            if self.flow_bound is None or not self.flow_bound > 0:
                raise PackError(f"flow bound must be > 0 pixels, got {self.flow_bound}")
            if self.min_frames < 2:
                raise PackError(f"flow needs videos of >= 2 frames: min_frames must be >= 2, got {self.min_frames}")


# ---------------------------------------------------------------------------------------------
# worker side: one video -> the payload members of one sample


def _pack_one(task: tuple[str, PackOptions]) -> dict:
    """Decode + encode one video. Never raises: failures come back as ``{"rejected": reason}``.

    Runs in a worker process; the result (payload bytes included) is pickled back to the
    parent, which assigns keys and sample indices (they depend on earlier rejections).
    """
    path, opts = task
    try:
        return _encode_sample(path, opts)
    except VideoError as e:
        return {"rejected": e.reason}
    except flow.FlowError as e:
        return {"rejected": f"flow extraction failed: {e}"}
    except Exception as e:  # a bug or an unexpected library error must not stop the run
        return {"rejected": f"unexpected error: {type(e).__name__}: {e}"}


class _FlowPacker:
    """Flow planes of one video as grayscale JPEGs, computed while its frames stream by."""

    def __init__(self, opts: PackOptions):
        self.opts = opts
        self.extractor = flow.FlowExtractor(opts.flow_algorithm, opts.flow_bound, opts.flow_modalities)
        self.jpegs: dict[str, list[bytes]] = {m: [] for m in opts.flow_modalities}

    def push(self, frame) -> None:
        item = self.extractor.push(frame)
        if item is not None:
            for m, (x, y) in item.items():
                self.jpegs[m] += [encode_gray_jpeg(x, self.opts.jpeg_quality), encode_gray_jpeg(y, self.opts.jpeg_quality)]

    def payload(self, num_frames: int) -> tuple[list[tuple[str, bytes]], dict]:
        """(tar members, per-modality JSON metadata) of a video of ``num_frames`` RGB frames."""
        members, meta = [], {}
        stats = self.extractor.stats
        if stats.num_flow_frames != num_frames - 1:
            raise flow.FlowError(f"{stats.num_flow_frames} flow frames for {num_frames} RGB frames")
        for m, jpegs in self.jpegs.items():
            blob, offsets = shards.encode_frame_pack(jpegs)
            frames_ext, offsets_ext = shards.flow_members(m)
            members += [(frames_ext, blob), (offsets_ext, offsets)]
            meta[m] = {"algorithm": self.opts.flow_algorithm, "bound": self.opts.flow_bound,
                       "num_frames": stats.num_flow_frames, "order": shards.FLOW_ORDER,
                       "jpeg_quality": self.opts.jpeg_quality}
            if m == "warped_flow":  # pairs warped with the identity (no trustworthy homography), and why
                meta[m]["homography_fallbacks"] = stats.homography_fallbacks
                meta[m]["homography_fallback_reasons"] = dict(stats.fallback_reasons)
        return members, meta


def _encode_sample(path: str, opts: PackOptions) -> dict:
    info_out: list = []
    frames = read_video_frames(path, opts.short_side, opts.fps, info_out)
    flow_packer = _FlowPacker(opts) if opts.flow_modalities else None
    if opts.layout == shards.LAYOUT_JPEG:
        jpegs = []
        for f in frames:
            jpegs.append(encode_jpeg(f, opts.jpeg_quality))
            if flow_packer is not None:
                flow_packer.push(f)
        info = info_out[0]
        if len(jpegs) < opts.min_frames:
            return {"rejected": f"only {len(jpegs)} decoded frames, need >= {opts.min_frames}"}
        blob, offsets = shards.encode_frame_pack(jpegs)
        payload = [("frames", blob), ("offsets", offsets)]
        num_frames, height, width = len(jpegs), info.height, info.width
    else:
        encoder = None
        for frame in frames:
            if encoder is None:
                encoder = VideoEncoder(opts.codec, info_out[0].fps, opts.gop)
            # 4:2:0 video needs even sizes; only a kept (short_side=None) odd source size gets
            # here, and losing its last row/column is harmless.
            h, w = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2
            encoder.add(frame[:h, :w])
            if flow_packer is not None:
                flow_packer.push(frame[:h, :w])  # flow of the stored (even-sized) frames
        info = info_out[0]
        if info.num_frames < opts.min_frames:
            return {"rejected": f"only {info.num_frames} decoded frames, need >= {opts.min_frames}"}
        data, num_frames = encoder.finish()
        if num_frames < opts.min_frames:
            return {
                "rejected": f"re-encoded {opts.codec} video decodes to only {num_frames} frames, "
                f"need >= {opts.min_frames}"
            }
        payload = [("video", data)]
        height, width = encoder.height, encoder.width
    flow_meta = {}
    if flow_packer is not None:
        flow_members, flow_meta = flow_packer.payload(num_frames)
        payload += flow_members
    return {
        "payload": payload,
        "flow_meta": flow_meta,
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "fps": info.fps,
        "source_fps": info.source_fps,
        "source_width": info.source_width,
        "source_height": info.source_height,
        "source_num_frames_header": info.header_num_frames,
        "source_num_decoded_frames": info.num_decoded_frames,
        "source_codec": info.codec_name,
    }


def _worker_init() -> None:
    import cv2

    # Parallelism comes from the worker processes; cv2's own thread pool would oversubscribe.
    cv2.setNumThreads(1)


def _mp_context():
    # forkserver, not fork: a caller that already ran OpenCV (its thread pool: flow, resize) or
    # PyAV threads would hand a forked worker locks held by threads that do not exist there,
    # and the worker deadlocks in its first cv2 call (seen: pack after flow in one process).
    # The server is a clean process that imported this module once; workers fork from it in
    # milliseconds. Fall back to the platform default where forkserver does not exist.
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _new_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_worker_init)


def _run_isolated(task) -> dict:
    """Run one task in its own process, to find out whether it is the one killing workers."""
    with _new_pool(1) as pool:
        try:
            return pool.submit(_pack_one, task).result()
        except BrokenProcessPool:
            return {"rejected": "the decoding process died (crashed, or was killed for using too much memory)"}


def _results_in_order(tasks: Sequence, workers: int) -> Iterator[dict]:
    """``_pack_one(task)`` for every task, in task order, computed by ``workers`` processes.

    A process pool is used rather than ``multiprocessing.Pool.imap`` because Pool waits
    forever when a worker dies (e.g. a decoder segfault); here a dead worker breaks the pool,
    the in-flight tasks are re-run one per process so only the culprit is rejected, and
    packing continues with a fresh pool. At most ``2 * workers`` results are in flight, which
    bounds memory. Even ``workers=1`` decodes in a child process, so a crashing decoder never
    takes the packer down.
    """
    if not tasks:
        return
    workers = min(workers, len(tasks))
    window = 2 * workers
    todo = deque(tasks)
    pending: deque = deque()  # (task, future), in task order
    pool = _new_pool(workers)
    try:
        while todo or pending:
            broken = False
            while todo and len(pending) < window and not broken:
                try:
                    pending.append((todo[0], pool.submit(_pack_one, todo[0])))
                    todo.popleft()
                except BrokenProcessPool:  # a worker died since the last result was collected
                    broken = True
            if not broken:
                try:
                    result = pending[0][1].result()
                except BrokenProcessPool:
                    broken = True
            if broken:
                # Only submitted tasks can have killed a worker: keep those that finished,
                # re-run the others one per process so that only the culprit is rejected.
                in_flight = list(pending)
                pending.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                for task, future in in_flight:
                    finished = future.done() and not future.cancelled() and future.exception() is None
                    yield future.result() if finished else _run_isolated(task)
                pool = _new_pool(workers)
                continue
            pending.popleft()
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# shard writing


def _tar_member_bytes(size: int) -> int:
    """Bytes a member of ``size`` data bytes takes in a tar: header block + padded data."""
    return TAR_BLOCK_BYTES + -(-size // TAR_BLOCK_BYTES) * TAR_BLOCK_BYTES


def _tar_file_bytes(content_bytes: int) -> int:
    """Final size of a tar (as Python's tarfile writes it) whose members take ``content_bytes``."""
    return -(-(content_bytes + TAR_END_BYTES) // TAR_RECORD_BYTES) * TAR_RECORD_BYTES


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported (e.g. some network file systems); rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}"


class _Journal:
    """Append-only ``<split>/_journal.jsonl``; each line is flushed (and fsynced for shards)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a")

    def append(self, record: dict, sync: bool) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if sync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class _ShardWriter:
    """Writes samples of one split into size-bounded shards, numbering shards and samples."""

    def __init__(
        self, out_dir: Path, split: str, shard_size_bytes: int, journal: _Journal, next_shard: int, next_index: int
    ):
        self.out_dir, self.split = out_dir, split
        self.shard_size_bytes = shard_size_bytes
        self.journal = journal
        self.next_shard = next_shard
        self.next_index = next_index
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._content_bytes = 0
        self._samples: list[dict] = []  # per-sample stats of the open shard

    def add(self, members: list[tuple[str, bytes]], stats: dict) -> None:
        """Append one sample (``members`` = (extension, data) in tar order) with its stats."""
        sample_bytes = sum(_tar_member_bytes(len(data)) for _, data in members)
        projected_bytes = _tar_file_bytes(self._content_bytes + sample_bytes)
        if self._tar is not None and projected_bytes > self.shard_size_bytes:
            self.finish_shard()
        if self._tar is None:
            self._open_shard()
        key = stats["key"]
        for ext, data in members:
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size = len(data)
            ti.mtime = 0  # fixed metadata: shards are byte-identical across runs
            ti.mode = 0o644
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            self._tar.addfile(ti, io.BytesIO(data))
        self._content_bytes += sample_bytes
        self._samples.append(stats)
        self.next_index += 1

    def _paths(self) -> tuple[Path, Path]:
        name = shard_name(self.split, self.next_shard)
        d = self.out_dir / self.split
        return d / f"{name}.tar", d / f"{name}.idx"

    def _open_shard(self) -> None:
        tar_path, _ = self._paths()
        self._file = open(str(tar_path) + PARTIAL_SUFFIX, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._content_bytes = 0
        self._samples = []

    def finish_shard(self) -> None:
        """Complete the open shard: close, fsync, rename into place, index, journal."""
        if self._tar is None:
            return
        tar_path, idx_path = self._paths()
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        partial = Path(str(tar_path) + PARTIAL_SUFFIX)
        os.replace(partial, tar_path)  # the shard appears under its final name only when complete
        _fsync_dir(tar_path.parent)
        shards.write_dali_index(tar_path, idx_path)
        samples = self._samples
        record = {
            "type": "shard",
            "path": f"{self.split}/{tar_path.name}",
            "index_path": f"{self.split}/{idx_path.name}",
            "num_samples": len(samples),
            "num_bytes": tar_path.stat().st_size,
            "first_sample_index": samples[0]["sample_index"],
            "num_frames": sum(s["num_frames"] for s in samples),
            "duration_seconds": sum(s["duration_seconds"] for s in samples),
            "class_counts": dict(Counter(s["class_name"] for s in samples)),
            "sources": [s["source"] for s in samples],
        }
        self.journal.append(record, sync=True)
        self._tar = self._file = None
        self.next_shard += 1

    def abort(self) -> None:
        """Drop the open shard (interrupted run); its .partial file is removed too."""
        if self._file is not None:
            self._file.close()
            tar_path, _ = self._paths()
            Path(str(tar_path) + PARTIAL_SUFFIX).unlink(missing_ok=True)
        self._tar = self._file = None


# ---------------------------------------------------------------------------------------------
# resume state


@dataclass
class _SplitState:
    shards: list[dict]  # journal records of finished shards, in shard order
    rejected: dict[str, str]  # source path -> reason

    @property
    def packed_sources(self) -> set[str]:
        return {src for s in self.shards for src in s["sources"]}

    @property
    def num_samples(self) -> int:
        return sum(s["num_samples"] for s in self.shards)


def _read_journal(path: Path) -> tuple[list[dict], bool]:
    """Journal records; the flag is True when a torn line (crash mid-write) was dropped."""
    records, torn = [], False
    if not path.is_file():
        return records, torn
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            torn = True
            continue
        if isinstance(rec, dict) and rec.get("type") in ("shard", "rejected"):
            records.append(rec)
        else:
            torn = True
    return records, torn


def _load_split_state(out_dir: Path, split: str) -> _SplitState:
    """Read a split's journal, keep the longest valid prefix of finished shards, and delete
    everything else an interrupted run may have left (partial or unjournaled shards)."""
    split_dir = out_dir / split
    journal_path = split_dir / JOURNAL_FILE
    records, dirty = _read_journal(journal_path)
    kept: list[dict] = []
    rejected: dict[str, str] = {}
    next_index = 0
    valid = True
    for rec in records:
        if rec["type"] == "rejected":
            rejected[rec["path"]] = rec["reason"]
            continue
        expected = f"{split}/{shard_name(split, len(kept))}.tar"
        tar_path = out_dir / rec["path"]
        valid = (
            valid
            and rec["path"] == expected
            and rec.get("first_sample_index") == next_index
            and tar_path.is_file()
            and tar_path.stat().st_size == rec["num_bytes"]
        )
        if not valid:
            dirty = True  # this shard and every later one are re-packed
            continue
        if not (out_dir / rec["index_path"]).is_file():
            shards.write_dali_index(tar_path, out_dir / rec["index_path"])
        kept.append(rec)
        next_index += rec["num_samples"]
    if dirty:
        lines = [json.dumps(r) for r in kept]
        lines += [json.dumps({"type": "rejected", "path": p, "reason": r}) for p, r in rejected.items()]
        _write_atomic(journal_path, "".join(line + "\n" for line in lines))
    keep_files = {JOURNAL_FILE} | {Path(r[k]).name for r in kept for k in ("path", "index_path")}
    if split_dir.is_dir():
        for entry in split_dir.iterdir():
            if entry.name not in keep_files and entry.is_file():
                entry.unlink()  # *.partial, *.tmp, shards that never made it into the journal
    return _SplitState(kept, rejected)


def _prepare_out_dir(out_dir: Path, options: dict, overwrite: bool):
    """Create ``out_dir`` or validate it for resuming, and lock it against a second packer.

    ``overwrite`` wipes a previous pack first. Returns the open lock file, to be closed
    (releasing the lock) when packing ends.
    """
    options_path = out_dir / OPTIONS_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise PackError(f"{out_dir}: exists and is not a directory")
    ours = {OPTIONS_FILE, MANIFEST_FILE, LOCK_FILE}
    entries = {e.name for e in out_dir.iterdir()} if out_dir.is_dir() else set()
    if entries and not entries & ours:
        # never resume into, or wipe, a directory this tool did not create
        raise PackError(
            f"{out_dir}: exists, is not empty and is not a `tsn pack` output (no {OPTIONS_FILE}); pick a new --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(out_dir)
    try:
        if overwrite:
            for entry in out_dir.iterdir():
                if entry.name == LOCK_FILE:
                    continue
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        elif options_path.is_file():
            try:
                previous = json.loads(options_path.read_text())
            except json.JSONDecodeError:
                previous = {}
            if isinstance(previous, dict):  # packs made before motion modalities: rgb only
                previous = {**LEGACY_OPTIONS, **previous}
            if previous != options:
                diffs = [
                    f"{k}: {previous.get(k)!r} -> {options.get(k)!r}"
                    for k in options.keys() | previous.keys()
                    if previous.get(k) != options.get(k) and k != "classes"
                ]
                if previous.get("classes") != options.get("classes"):
                    diffs.append("classes differ")
                raise PackError(
                    f"{out_dir}: already holds a pack made with different options "
                    f"({'; '.join(sorted(diffs))}); pick a new --out, or pass --overwrite to delete it and start over"
                )
        if not options_path.is_file():
            _write_atomic(options_path, json.dumps(options, indent=1) + "\n")
    except BaseException:
        lock.close()
        raise
    return lock


def _lock(out_dir: Path):
    """An exclusive advisory lock on ``out_dir/_lock``: two packers writing the same shards
    would corrupt each other's output."""
    f = open(out_dir / LOCK_FILE, "a")
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise PackError(f"{out_dir}: another `tsn pack` is writing to this directory right now") from None
    return f


# ---------------------------------------------------------------------------------------------
# packing


def split_order(items: list[VideoItem], split: str, seed: int) -> list[VideoItem]:
    """The split's items in the seeded packing order (the order of samples in the shards)."""
    chosen = [it for it in items if it.split == split]
    random.Random(f"{seed}/{split}").shuffle(chosen)  # str seeds hash deterministically
    return chosen


def pack_dataset(
    items: Sequence[VideoItem],
    classes: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    codec: str = "jpeg",
    short_side: int | None = 256,
    jpeg_quality: int = 90,
    gop: int = 8,
    fps: float | None = None,
    shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES,
    min_frames: int = 16,
    workers: int | None = None,
    seed: int = 0,
    modalities: Sequence[str] = (shards.MODALITY_RGB,),
    flow_algorithm: str = "tvl1",
    flow_bound: float = flow.DEFAULT_BOUND,
    progress: bool = True,
    overwrite: bool = False,
    run_stats: dict | None = None,
) -> dict:
    """Pack ``items`` into shards under ``out_dir``; returns the manifest (also written to
    ``out_dir/manifest.json``).

    * ``codec``: ``jpeg`` (frame-pack layout; ``jpeg_quality`` applies) or ``h264`` / ``vp9`` /
      ``mjpeg`` (video layout; keyframe every ``gop`` frames).
    * ``short_side``: stored frames are resized so the short side is this (even sizes);
      ``None`` keeps the source size. ``fps``: resample to this rate (``None``: every frame).
    * ``shard_size_bytes``: no shard file exceeds this, except a single sample larger than the
      bound, which gets a shard of its own.
    * ``min_frames``: videos with fewer decoded frames are rejected, like undecodable ones;
      rejections go to ``out_dir/rejected.jsonl`` and never stop the run.
    * ``workers``: decoding processes (default ``os.cpu_count()``); output does not depend on it.
    * ``seed``: the order of samples within each split (shuffled across shards).
    * ``modalities``: ``rgb`` plus any of ``flow`` / ``warped_flow``: flow planes computed with
      ``flow_algorithm`` (`dataloading.flow.ALGORITHMS`) on the stored (resized) frames,
      clipped to +-``flow_bound`` pixels, stored as grayscale JPEGs (`dataloading.shards`). A
      video whose flow fails is rejected like an undecodable one.
    * Resuming / ``overwrite``: see the module docstring. Different options than the existing
      pack in ``out_dir`` raise `PackError` unless ``overwrite`` (which first deletes the
      contents of ``out_dir``; a non-empty directory that is not a pack is never touched).
      ``out_dir/_lock`` is locked while packing, so a second packer on it fails at once.
    * ``run_stats``: if given, filled with this run's counts and timing (for the CLI).

    Raises `PackError` (a ``ValueError``) for invalid options, an options mismatch, a video that
    moved to another split since the resumed run, and when no sample could be packed.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    fps = None if fps is None else float(fps)
    modalities = tuple(modalities)
    has_flow = any(m in shards.FLOW_MODALITIES for m in modalities)
    opts = PackOptions(codec, short_side, int(jpeg_quality), int(gop), fps, int(min_frames), int(seed), modalities,
                       flow_algorithm if has_flow else None, float(flow_bound) if has_flow else None)
    opts.validate()
    if shard_size_bytes < 1:
        raise PackError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise PackError(f"workers must be >= 1, got {workers}")
    classes = list(classes)
    items = list(items)
    if not items:
        raise PackError("no input videos to pack")
    for it in items:
        if it.split not in SPLITS:
            raise PackError(f"{it.path}: split {it.split!r} is not one of {', '.join(SPLITS)}")
        if not (0 <= it.label < len(classes) and classes[it.label] == it.class_name):
            raise PackError(
                f"{it.path}: label {it.label} / class {it.class_name!r} does not match the class list"
            )

    options = {"format_version": FORMAT_VERSION, **asdict(opts), "modalities": list(opts.modalities),
               "classes": classes}
    with _prepare_out_dir(out_dir, options, overwrite):  # holds the directory lock
        manifest, stats = _pack_locked(items, classes, out_dir, opts, shard_size_bytes, workers, progress)
    if run_stats is not None:
        run_stats.update(stats, elapsed_seconds=time.perf_counter() - t_start, workers=workers)
    if manifest["num_samples"] == 0:
        raise PackError(
            f"nothing usable packed: all {manifest['num_rejected']} input videos were rejected "
            f"(reasons in {out_dir / REJECTED_FILE})"
        )
    return manifest


def _pack_locked(
    items: list[VideoItem],
    classes: list[str],
    out_dir: Path,
    opts: PackOptions,
    shard_size_bytes: int,
    workers: int,
    progress: bool,
) -> tuple[dict, dict]:
    """The body of `pack_dataset` once ``out_dir`` is prepared and locked: (manifest, run counts).
    The manifest is written only when it lists at least one sample."""
    states = {split: _load_split_state(out_dir, split) for split in SPLITS if (out_dir / split).is_dir()}
    # A video must stay in the split it was packed into: moving it (e.g. another val_fraction)
    # would leak it between train and val.
    done: dict[str, str] = {}
    for split, state in states.items():
        for src in state.packed_sources | state.rejected.keys():
            done[src] = split
    for it in items:
        if done.get(it.path, it.split) != it.split:
            raise PackError(
                f"{it.path}: is in split {it.split!r} now but was packed into {done[it.path]!r} in "
                f"{out_dir}; the inputs changed -- pick a new --out, or pass --overwrite to start over"
            )

    plan = []  # (split, items to process now)
    for split in SPLITS:
        ordered = split_order(items, split, opts.seed)
        if ordered:
            plan.append((split, [it for it in ordered if it.path not in done]))
    total = sum(1 for it in items if it.split in dict(plan))
    skipped = total - sum(len(todo) for _, todo in plan)
    stats = {"packed": 0, "rejected": 0, "skipped": skipped, "frames": 0}

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=skipped, unit="video", file=sys.stderr, dynamic_ncols=True)
        bar.set_postfix(rejected=0)
    rejected_log = open(out_dir / REJECTED_FILE, "a")
    try:
        for split, todo in plan:
            if bar is not None:
                bar.set_description(f"pack {split}")
            (out_dir / split).mkdir(exist_ok=True)
            state = states.get(split) or _SplitState([], {})
            journal = _Journal(out_dir / split / JOURNAL_FILE)
            writer = _ShardWriter(
                out_dir, split, shard_size_bytes, journal, next_shard=len(state.shards), next_index=state.num_samples
            )
            results = _results_in_order([(it.path, opts) for it in todo], workers)
            try:
                for it, result in zip(todo, results):
                    if "rejected" in result:
                        stats["rejected"] += 1
                        reason = result["rejected"]
                        journal.append({"type": "rejected", "path": it.path, "reason": reason}, sync=False)
                        rejected_log.write(json.dumps({"path": it.path, "reason": reason, "split": split}) + "\n")
                        rejected_log.flush()
                    else:
                        members, sample_stats = _sample_members(it, result, writer.next_index, opts)
                        writer.add(members, sample_stats)
                        stats["packed"] += 1
                        stats["frames"] += result["num_frames"]
                    if bar is not None:
                        bar.set_postfix(rejected=stats["rejected"], refresh=False)
                        bar.update(1)
                writer.finish_shard()
            except BaseException:
                writer.abort()
                raise
            finally:
                results.close()  # stops the worker pool now, also on errors / Ctrl-C
                journal.close()
    finally:
        rejected_log.close()
        if bar is not None:
            bar.close()

    states = {split: _load_split_state(out_dir, split) for split in SPLITS if (out_dir / split).is_dir()}
    # rejected.jsonl was appended to while packing; rewrite it from the journals so it is
    # complete and duplicate-free even after interrupted runs.
    rejected_lines = [
        json.dumps({"path": path, "reason": reason, "split": split}) + "\n"
        for split, state in states.items()
        for path, reason in state.rejected.items()
    ]
    _write_atomic(out_dir / REJECTED_FILE, "".join(rejected_lines))
    manifest = _build_manifest(opts, classes, states, len(rejected_lines), {split for split, _ in plan})
    if manifest["num_samples"]:
        _write_atomic(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return manifest, stats


def _sample_members(
    item: VideoItem, result: dict, sample_index: int, opts: PackOptions
) -> tuple[list[tuple[str, bytes]], dict]:
    """The tar members (info, json, cls, payload) of one sample and its stats for the journal."""
    key = f"{sample_index:08d}"
    n, fps = result["num_frames"], result["fps"]
    meta = {
        "key": key,
        "sample_index": sample_index,
        "num_frames": n,
        "fps": fps,
        "duration_seconds": n / fps,
        "width": result["width"],
        "height": result["height"],
        "label": item.label,
        "class_name": item.class_name,
        "source": item.path,
        "source_num_frames_header": result["source_num_frames_header"],
        "source_num_decoded_frames": result["source_num_decoded_frames"],
        "source_fps": result["source_fps"],
        "source_width": result["source_width"],
        "source_height": result["source_height"],
        "source_codec": result["source_codec"],
        "layout": opts.layout,
        "codec": opts.codec,
        "modalities": list(opts.modalities),
        **result.get("flow_meta", {}),
    }
    if opts.layout == shards.LAYOUT_JPEG:
        meta["jpeg_quality"] = opts.jpeg_quality
    else:
        meta["gop"] = 1 if opts.codec == "mjpeg" else opts.gop  # mjpeg: every frame is a keyframe
    members = [
        ("info", shards.encode_info(n, item.label, result["height"], result["width"], sample_index)),
        ("json", json.dumps(meta).encode()),
        ("cls", str(item.label).encode()),
        *result["payload"],
    ]
    stats = {k: meta[k] for k in ("key", "sample_index", "num_frames", "duration_seconds", "class_name", "source")}
    return members, stats


def _build_manifest(
    opts: PackOptions, classes: list[str], states: dict[str, _SplitState], num_rejected: int, planned: set[str]
) -> dict:
    """The manifest (see `pack_dataset`) from the journals' finished shards. A split appears
    when it was in this run's inputs or has finished shards."""
    splits = {}
    all_shards = []
    for split in SPLITS:
        state = states.get(split)
        if state is None or (split not in planned and not state.shards):
            continue
        class_counts = Counter()
        for rec in state.shards:
            class_counts.update(rec["class_counts"])
        shard_list = [{k: r[k] for k in ("path", "index_path", "num_samples", "num_bytes")} for r in state.shards]
        splits[split] = {
            "num_samples": state.num_samples,
            "num_frames": sum(r["num_frames"] for r in state.shards),
            "num_bytes": sum(r["num_bytes"] for r in state.shards),
            "duration_seconds": sum(r["duration_seconds"] for r in state.shards),
            "class_counts": {name: class_counts.get(name, 0) for name in classes},
            "shards": shard_list,
        }
        all_shards += [{**s, "split": split} for s in shard_list]
    num_samples = sum(s["num_samples"] for s in splits.values())
    num_bytes = sum(s["num_bytes"] for s in splits.values())
    duration_s = sum(s["duration_seconds"] for s in splits.values())
    return {
        "format_version": FORMAT_VERSION,
        "layout": opts.layout,
        "codec": opts.codec,
        "short_side": opts.short_side,
        "jpeg_quality": opts.jpeg_quality,
        "gop": opts.gop,
        "fps": opts.fps,
        "min_frames": opts.min_frames,
        "seed": opts.seed,
        "modalities": list(opts.modalities),
        # how the flow entries were made (null for an RGB-only pack); see dataloading.shards
        "flow": {"algorithm": opts.flow_algorithm, "bound": opts.flow_bound, "order": shards.FLOW_ORDER,
                 "frames_per_video": "num_frames - 1"} if opts.flow_modalities else None,
        "classes": classes,
        "num_classes": len(classes),
        "num_samples": num_samples,
        "num_rejected": num_rejected,
        "splits": splits,
        "shards": all_shards,
        "bytes_per_video": num_bytes / num_samples if num_samples else 0.0,
        "bytes_per_hour_of_video": num_bytes / (duration_s / 3600.0) if duration_s > 0 else 0.0,
        "created_unix": time.time(),
    }


# ---------------------------------------------------------------------------------------------
# CLI

_SIZE_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _SIZE_UNITS[_p] = _SIZE_UNITS[_p + "b"] = 1000**_i  # decimal, like disk vendors and `ls --si`
    _SIZE_UNITS[_p + "ib"] = 1024**_i
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$")


def parse_size(text: str) -> int:
    """``"256MB"`` -> 256_000_000 bytes. Units (case-insensitive): none or ``B`` = bytes;
    ``k``/``KB`` = 10^3, ``M``/``MB`` = 10^6, ``G``/``GB`` = 10^9, ``T``/``TB`` = 10^12;
    ``KiB``/``MiB``/``GiB``/``TiB`` = powers of 2^10. Fractions allowed (``1.5GB``).
    The result must be a positive whole number of bytes."""
    m = _SIZE_RE.match(str(text).lower())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional unit, e.g. 256MB, 1GiB, 500k, 1048576"
        )
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if value < 1:
        raise ValueError(f"invalid size {text!r}: must be at least 1 byte")
    return int(round(value))


def format_size(num_bytes: float) -> str:
    """Human-readable decimal size: 1234567 -> '1.23 MB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(num_bytes) < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _short_side_arg(text: str) -> int | None:
    if text.lower() in ("0", "none", "keep"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid short side {text!r}: a pixel count, or 0/none to keep the source size"
        ) from None
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"short side must be >= 2 pixels (or 0/none to keep the source size), got {value}"
        )
    return value


def _modalities_arg(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in shards.PACKABLE_MODALITIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"invalid modalities {text!r}: a comma-separated list of {', '.join(shards.PACKABLE_MODALITIES)}")
    return names


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``tsn pack`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "pack",
        help="decode videos and pack them into WebDataset shards",
        description="Decode source videos, resize, encode (JPEG frame packs or a video codec) and write "
        "size-bounded WebDataset tar shards with DALI indexes, a manifest and a rejection log. "
        "Re-running the same command resumes an interrupted run.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="LABELS.csv",
                     help="CSV with header path,label[,split]; paths relative to the CSV")
    src.add_argument("--ucf101", metavar="SPLITDIR",
                     help="UCF101 split dir (classInd.txt, trainlist0N.txt, testlist0N.txt)")
    src.add_argument("--hmdb51", metavar="SPLITDIR", help="HMDB51 split dir (<class>_test_split<N>.txt)")
    p.add_argument("--video-root", metavar="ROOT", help="UCF101/HMDB51: directory holding <class>/<video>")
    p.add_argument("--split-id", type=int, metavar="N",
                   help="UCF101/HMDB51 official split 1-3 (default 1); the test list becomes split 'val'")
    p.add_argument("--classes", metavar="FILE",
                   help="class names, one per line (default: classes.txt beside the CSV)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--codec", default="jpeg", choices=list(shards.CODEC_LAYOUT),
                   help="jpeg = JPEG frame packs (default); h264 / vp9 / mjpeg = a re-encoded video")
    p.add_argument("--gop", type=int, default=8, metavar="N", help="video codecs: keyframe every N frames (default 8)")
    p.add_argument("--short-side", type=_short_side_arg, default=256, metavar="N",
                   help="resize the short side to N pixels (default 256; 0 keeps the source size)")
    p.add_argument("--jpeg-quality", type=int, default=90, metavar="Q", help="jpeg codec quality 1-100 (default 90)")
    p.add_argument("--fps", type=float, default=None, metavar="F",
                   help="resample to F frames/s (default: keep every frame)")
    p.add_argument("--shard-size", type=_size_arg, default=DEFAULT_SHARD_SIZE_BYTES, metavar="SIZE",
                   help="max shard size, e.g. 256MB, 1GiB, 500k (default 256MiB)")
    p.add_argument("--min-frames", type=int, default=16, metavar="N",
                   help="reject videos with fewer decoded frames (default 16)")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="CSV without a split column: stratified fraction of each class moved to 'val'")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="decoding processes (default: CPU count)")
    p.add_argument("--seed", type=int, default=0, help="sample order / val split seed (default 0)")
    p.add_argument("--modalities", type=_modalities_arg, default=(shards.MODALITY_RGB,), metavar="LIST",
                   help="comma-separated: rgb (always), flow, warped_flow (default rgb); flow entries are "
                        "grayscale JPEG frame packs of the quantised x, y planes")
    p.add_argument("--flow-algorithm", default="tvl1", choices=list(flow.ALGORITHMS),
                   help="optical flow: tvl1 (the paper's; slow on CPU), dis (fast), farneback (default tvl1)")
    p.add_argument("--flow-bound", type=float, default=flow.DEFAULT_BOUND, metavar="PX",
                   help=f"flow is clipped to +-PX pixels before 8-bit quantisation (default {flow.DEFAULT_BOUND:g})")
    p.add_argument("--overwrite", action="store_true", help="delete an existing pack in --out first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``tsn pack``: 0 when finished (even with rejected inputs), 2 on user errors, 130 on Ctrl-C."""
    try:
        if args.input is not None and args.split_id is not None:
            raise ValueError("--split-id applies to --ucf101/--hmdb51 split files")
        items, classes = read_inputs(
            csv_path=args.input,
            ucf101_dir=args.ucf101,
            hmdb51_dir=args.hmdb51,
            video_root=args.video_root,
            split_id=1 if args.split_id is None else args.split_id,
            classes_path=args.classes,
            val_fraction=args.val_fraction,
            seed=args.seed,
        )
        run_stats: dict = {}
        manifest = pack_dataset(
            items,
            classes,
            args.out,
            codec=args.codec,
            short_side=args.short_side,
            jpeg_quality=args.jpeg_quality,
            gop=args.gop,
            fps=args.fps,
            shard_size_bytes=args.shard_size,
            min_frames=args.min_frames,
            workers=args.workers,
            seed=args.seed,
            modalities=args.modalities,
            flow_algorithm=args.flow_algorithm,
            flow_bound=args.flow_bound,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            run_stats=run_stats,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command again to resume into {args.out}", file=sys.stderr)
        return 130
    print(format_totals(manifest, run_stats, args.out))
    return 0


def format_totals(manifest: dict, run_stats: dict, out_dir) -> str:
    """The end-of-run summary printed by `tsn pack`."""
    splits = manifest["splits"]
    per_split = ", ".join(f"{s} {v['num_samples']}" for s, v in splits.items())
    num_bytes = sum(v["num_bytes"] for v in splits.values())
    lines = [
        f"packed {manifest['num_samples']} videos ({per_split}) into {len(manifest['shards'])} shards, "
        f"{format_size(num_bytes)} in {out_dir} ({manifest['layout']}, codec {manifest['codec']}; modalities "
        f"{', '.join(shards.manifest_modalities(manifest))}"
        + (f", flow {manifest['flow']['algorithm']} bound {manifest['flow']['bound']:g}" if manifest.get("flow") else "")
        + ")",
        f"  {format_size(manifest['bytes_per_video'])} per video, "
        f"{format_size(manifest['bytes_per_hour_of_video'])} per hour of video",
    ]
    if manifest["num_rejected"]:
        lines.append(f"  rejected {manifest['num_rejected']} videos: see {Path(out_dir) / REJECTED_FILE}")
    for split, v in splits.items():
        if v["num_samples"] == 0:
            lines.append(f"  warning: split {split!r} has no usable videos")
    elapsed = run_stats.get("elapsed_seconds", 0.0)
    done = run_stats.get("packed", 0) + run_stats.get("rejected", 0)
    frames = run_stats.get("frames", 0)
    rate = f", {done / elapsed:.1f} videos/s, {frames / elapsed:.0f} frames/s" if elapsed > 0 else ""
    lines.append(
        f"  this run: {run_stats.get('packed', 0)} packed, {run_stats.get('rejected', 0)} rejected, "
        f"{run_stats.get('skipped', 0)} already done; "
        f"{elapsed:.1f} s with {run_stats.get('workers', '?')} workers{rate}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m dataloading.pack ...`` (same arguments as ``tsn pack``)."""
    parser = argparse.ArgumentParser(prog="tsn")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pack", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
