"""TSN batches as torch tensors from a packed dataset, one rank's share: the training loop's
data source.

``for batch in TSNLoader(...)`` yields `Batch` with ``frames`` laid out as
``(B, K, L, C, H, W)`` (train/val) or ``(B, V, K, L, C, H, W)`` (test, V = 10 views),
float32, normalised; for the ``rgb_diff`` modality L is the number of *differences*
(L + 1 frames are read per snippet, consecutive differences taken after normalisation, as the
authors' code does). For ``flow`` / ``warped_flow`` (datasets packed with ``tsn pack
--modalities rgb,flow,...``), L is the number of flow frames and C = 2 (x, y): the model's
``x0, y0, x1, y1, ...`` channel order; values are ``(q - 128) / (255 * mean(std))`` of the
stored 8-bit flow ``q`` (`PipelineSpec.norm_mean_255`), and a flipped sample has its x flow
negated (``q -> 255 - q``). Every rank yields the same number of batches per epoch.

Training (``spec.mode == 'train'``): exact data accounting. The epoch's sample order is the
(seed, epoch) order of `dataloading.planning.order`, independent of the world size; the work left in
the epoch is a list of position intervals (a fresh epoch: all N). Each rank reads its
contiguous chunk of it (`order.split`), in order, through the sample source
(`dataloading.pipeline.source`: each sample's sampled frames only); the draws of a sample are keyed by its position
(`dali_planner.PositionDraws`). Every rank runs ``ceil(max chunk / B)`` steps; the padding
rule: a rank whose chunk runs out fills its last batch(es) with copies of one of its samples
(or of the epoch's first sample when its chunk is empty) that are marked ``Batch.real ==
False``, carry no weight in the loss (`tsn.engine.train_step`) and are not counted as used.
`state` = (epoch, steps taken, intervals left) after the batches the consumer took; a loader
started from it with ANY world size finishes the epoch with every sample used exactly once.
Quarantined samples (below) keep their positions but become padding entries: skipped, counted.

A sample whose bytes turn out corrupt at read time is quarantined (`quarantine`): the source
finds it by its pack-time checksums as it reads it (a pack without checksums: the graph fails
and the loader decodes the last batches' payloads in Python, then rebuilds the pipeline at the
same epoch and batch); training puts a padding entry in its slot, val/test leave it out; it
is counted (``skipped``) and named in a warning; nothing else is lost.

Where the bytes come from (`source.ShardAccess`): local shards by pread; ``s3://`` shards from
the node cache's copies (``cache``: `streamer.ShardStreamer` fetches this rank's shards whole,
in the order it reads them, a few ahead, evicting by next use), or, without a cache or for a
shard that does not fit, by ranged GETs of just the sampled frames (``read_threads`` in
flight).

The graph is `dali_pipeline.build_pipeline`; on CPU its per-sample uint8 crops are finished
(resized, mirrored, normalised) by `finish.finish_frames` here, as they arrive.

Off the training thread: with ``prefetch_batches`` > 0 (training's loaders) a `prefetch.Prefetcher`
thread pulls DALI's outputs and finishes batch i + 1 while the consumer trains on batch i, at
most ``prefetch_batches`` batches ahead; given ``epochs`` it also builds the next epoch's
pipeline (and finishes its first batches) while the current epoch ends. The batches and their
order are the same as with ``prefetch_batches=0`` (everything on the calling thread): the
thread runs the same code on the same pipeline, only earlier. `position` counts the batches
the consumer has *taken*, not those prepared ahead, so a checkpoint resumes exactly.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataloading.format import shards
from dataloading.format.quarantine import Quarantine, undecodable
from dataloading.format.shard_index import ShardIndex
from dataloading.pipeline.dali_pipeline import META_NAMES, build_pipeline, frame_output_names, output_names
from dataloading.pipeline.dali_planner import DrawSource, PositionDraws, batches_per_epoch, wants_test_views
from dataloading.pipeline.finish import finish_frames, keep_freed_memory, sample_frames, to_snippets
from dataloading.pipeline.prefetch import DONE, Prefetcher
from dataloading.pipeline.source import (SampleSource, ShardAccess, Slot, index_members, listed_batches,
                                         sharded_batches)
from dataloading.pipeline.stage_times import StageTimes
from dataloading.planning import order
from dataloading.planning.spec import PipelineSpec
from dataloading.store import storage
from dataloading.store.byteranges import ObjectFiles
from dataloading.store.cache import ShardCache, _object_infos
from dataloading.store.streamer import PriorityPool, ShardStreamer

log = logging.getLogger(__name__)

_EPOCH_END = object()  # the producer's item after an epoch's last batch

# Sample reads in flight per loader (`source.SampleSource`'s pool): local files answer in
# microseconds (two threads overlap one read with the next sample's planning); object storage
# takes a round trip of tens of ms per request, so ranged GETs of the sampled frames need many
# in flight (at 26 ms per request, 32 in flight allow ~250 clips/s at 5 requests per clip).
LOCAL_READ_THREADS = 2
REMOTE_READ_THREADS = 32


@dataclass
class Batch:
    frames: torch.Tensor  # (B, K, L, C, H, W) or (B, V, K, L, C, H, W)
    label: torch.Tensor  # (B,) int64
    sample_index: torch.Tensor  # (B,) int64, unique per sample within a split
    frame_indices: torch.Tensor  # (B, K * frames_per_snippet) int64
    crop: torch.Tensor  # (B, 5) int64: x, y, w, h, flip (in stored-frame pixels)
    frame_size: torch.Tensor  # (B, 2) int64: stored frame height, width
    # Training only (None otherwise: every entry real): (B,) bool, False for padding entries
    # (the loader's padding rule: zero weight in the loss, not counted as used), and (B,) int64
    # each entry's position in the epoch's order (`dataloading.planning.order`), -1 for padding.
    real: torch.Tensor | None = None
    position: torch.Tensor | None = None


def pipeline_outputs(outputs, spec: PipelineSpec, layout: str, decode_only: bool = False) -> dict:
    """One iteration of a pipeline (``pipe.run()``'s outputs) by name, copied into torch:
    ``frames`` = per sample its (F, h, w, C) uint8 frames (resize backend 'torch', or
    ``decode_only``) or the dense batch tensor (backend 'dali'); the `META_NAMES` outputs
    as batch tensors. For tests and tools; `TSNLoader` streams without these copies."""
    frame_names = frame_output_names(spec, layout, decode_only)
    named = dict(zip(output_names(spec, layout, decode_only), outputs))
    batch = {n: torch.from_numpy(np.array(named[n].as_tensor())) for n in META_NAMES}
    if decode_only or spec.resolved_resize_backend == "torch":
        per = {n: per_sample(named[n], zero_copy=False) for n in frame_names}
        batch["frames"] = [f if isinstance(f, torch.Tensor) else torch.stack(f) for f in sample_frames(per, frame_names)]
    else:
        batch["frames"] = torch.from_numpy(np.array(named["frames"].as_tensor()))
    return batch


def per_sample(tensor_list, zero_copy: bool) -> list[torch.Tensor]:
    """A DALI CPU TensorList of ragged samples -> one torch tensor per sample; ``zero_copy``
    shares DALI's buffers (safe with DALI's dynamic executor, whose buffers live as long as a
    reference to them does)."""
    if zero_copy:
        return [torch.from_dlpack(tensor_list[i]) for i in range(len(tensor_list))]
    return [torch.from_numpy(np.array(tensor_list[i])) for i in range(len(tensor_list))]


def batch_bytes(spec: PipelineSpec) -> int:
    """Bytes of one `Batch`'s frames (float32; an upper bound for rgb_diff, whose L + 1 frames
    per snippet become L differences)."""
    s = spec.crop.input_size
    return 4 * spec.batch_size * spec.num_views * spec.num_segments * spec.frames_per_snippet * spec.channels * s * s


def prefetch_depth(spec: PipelineSpec, budget_bytes: int, *, least: int = 2, most: int = 64) -> int:
    """How many batches of ``spec`` to prepare ahead within ``budget_bytes`` of memory, clamped
    to [least, most]."""
    return max(least, min(most, budget_bytes // batch_bytes(spec)))


class TSNLoader:
    """One rank's batches of one split. ``len(loader)`` = batches per epoch (equal on all ranks).

    ``prefetch_batches``: batches prepared ahead in a background thread (0, the default: on the
    consumer's thread, as they are asked for; training's loaders take what fits a memory
    budget, `prefetch_depth` in `app.build`). Each costs a batch of memory (test-mode batches
    of 10 views are large: hence opt-in). ``epochs``: the epochs this loader will be iterated for
    (training's ``train.epochs``): the thread then starts epoch e + 1 (builds its pipeline,
    prepares its first batches) as soon as epoch e's last batch is prepared, for every e + 1 <
    ``epochs`` (at most one epoch ahead: the queue holds at most an epoch); None: an epoch
    starts when it is iterated. `close` stops the thread. ``cache``: a node-local `ShardCache`
    for ``s3://`` datasets (``data.cache_dir``): every epoch's pipeline build hands DALI local
    copies, fetched at the first build; `object_storage_bytes` counts what each epoch cost.

    Training resumes at ``start_epoch`` with ``start_batch`` steps of it done (by whatever world
    sizes) and ``remaining`` position intervals left (`state`'s); ``remaining`` None: the
    epoch's start (``start_batch`` 0) or a resume at this world size after ``start_batch``
    steps from the epoch's start. ``len(loader)`` of the resumed epoch = ``start_batch`` + the
    steps this world size needs for ``remaining``; `full_epoch_steps` is a fresh epoch's.
    """

    def __init__(self, dataset_dir: str | Path, split: str, spec: PipelineSpec, *, rank: int = 0,
                 world_size: int = 1, device_id: int | None = None, start_epoch: int = 0,
                 start_batch: int = 0, prefetch_batches: int = 0, epochs: int | None = None,
                 cache: ShardCache | None = None, remaining=None, read_threads: int | None = None,
                 streaming: dict | None = None, stage_timing: bool = True):
        if prefetch_batches < 0:
            raise ValueError(f"prefetch_batches must be >= 0, got {prefetch_batches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if read_threads is not None and read_threads < 0:
            raise ValueError(f"read_threads must be >= 0, got {read_threads}")
        self._prefetcher: Prefetcher | None = None  # first: __del__ may run on a failed __init__
        self.stage_times = StageTimes(enabled=stage_timing)  # seconds per input stage (dataloading.pipeline.stage_times)
        self._pool: PriorityPool | None = None
        self._source: SampleSource | None = None
        self._access: ShardAccess | None = None
        manifest = shards.load_manifest(dataset_dir)
        keep_freed_memory()
        self.layout = manifest["layout"]
        shards.require_modality(dataset_dir, manifest, spec.stored_modality)
        if self.layout == shards.LAYOUT_VIDEO and spec.device == "cpu" and not spec.is_flow \
                and manifest["codec"] not in shards.CPU_DECODABLE_VIDEO_CODECS:
            raise ValueError(f"{dataset_dir}: codec {manifest['codec']!r} decodes only on GPU (DALI 'mixed' "
                             f"backend); repack with --codec jpeg, vp9 or mjpeg for CPU training")
        tar_paths, index_paths, self.num_samples = shards.split_shards(dataset_dir, split, manifest)
        split_shards = manifest["splits"][split]["shards"]
        self._samples_per_shard = [int(s["num_samples"]) for s in split_shards]
        self.spec, self.rank, self.world_size, self.device_id = spec, rank, world_size, device_id
        self._tar_paths = list(tar_paths)
        remote = any(storage.is_uri(t) for t in tar_paths)
        # ``cache``: the split's s3:// shards read from node-local copies (`ShardCache`), each
        # fetched whole when first read; object_storage_bytes = {epoch: bytes it cost object storage}.
        self._cache = cache if remote else None
        # The cached copy of a shard (or None: it does not fit, read it in place), for its table
        # (the copy's tar headers, else an index GET) and its frames; weak: the reading threads
        # hold it and must not keep a dropped loader alive.
        copy = _weak_method(self._copy) if self._cache is not None else None
        self._index = ShardIndex(index_paths, index_members(spec, self.layout), self._samples_per_shard,
                                 local_copy=copy, sample_ranges=shards.sample_ranges(split_shards))
        self._quarantine = Quarantine()
        # Reads in flight: a local file answers in microseconds, object storage in tens of ms
        # (ranged GETs of the sampled frames need many in flight to reach its bandwidth).
        self.read_threads = read_threads if read_threads is not None else (REMOTE_READ_THREADS if remote else
                                                                             LOCAL_READ_THREADS)
        self._access = ShardAccess(tar_paths, [int(s["num_bytes"]) for s in split_shards], copies=copy)
        self._streamer = None
        if self._cache is not None:
            # its own reader: whole-shard GETs are counted apart from the in-place ranged reads
            whole = ObjectFiles(dict(zip(tar_paths, self._access.sizes)), max_gap_bytes=0)
            infos = _object_infos(tar_paths)  # sizes checked against the manifest by split_shards
            self._streamer = ShardStreamer(self._cache, infos, whole, holder=id(self),
                                           on_done=self._access.local.forget, **(streaming or {}))
            _log_cache_plan(self._cache, split, self._access.sizes, world_size, rank)
        self._last_iteration: dict[int, int] = {}
        self._sampled_bytes_closed = 0  # payload bytes of the closed epochs' sources
        self._bytes_mark, self._bytes_epoch = self._object_storage_total(), start_epoch
        self._object_storage_bytes: dict[int, int] = {}
        self._ordered = spec.mode == "train"  # exact accounting (module docstring); else sharded by rank
        if self._ordered:
            if self.num_samples < 1:
                raise ValueError(f"{dataset_dir}: split {split!r} has no samples to train on")
            self._start_plan = self._resume_plan(start_epoch, start_batch, remaining)
            self._plans: dict[int, _EpochPlan] = {}
        elif remaining is not None:
            raise ValueError(f"remaining: only a training loader resumes mid-epoch (mode {spec.mode!r})")
        self._split, self._prefetch_batches, self._epochs = split, prefetch_batches, epochs
        # The consumer's position (batches taken) and the producer's (batches prepared): equal
        # whenever no batch is queued ahead.
        self.epoch, self.batch = start_epoch, start_batch
        self._p_epoch, self._p_batch = start_epoch, start_batch
        self._pass_epoch = start_epoch  # the epoch the running prefetcher was started in
        self._start(start_epoch, start_batch)  # on this thread: a broken graph fails here

    def _start(self, epoch: int, skip_batches: int) -> None:
        """(Re)build the pipeline at ``epoch``, past the batches already delivered."""
        self._build(epoch, skip_batches)

    def _resume_plan(self, epoch: int, batch: int, remaining) -> tuple[int, list, int]:
        """(epoch, intervals left, steps done) where training starts, checked."""
        if epoch < 0 or batch < 0:
            raise ValueError(f"start position ({epoch}, {batch}) must be >= 0")
        full = order.full(self.num_samples)
        if remaining is None:  # a fresh epoch, or a resume at this world size
            left = order.remaining_after(full, self.world_size, self.spec.batch_size, batch)
        else:
            left = order.check_intervals(remaining, self.num_samples, what="loader remaining")
        return epoch, left, batch

    def _plan(self, epoch: int) -> "_EpochPlan":
        """Epoch ``epoch``'s pass: what is left of it where this loader starts it, this rank's chunk."""
        plan = self._plans.get(epoch)
        if plan is None:
            start_epoch, left, offset = self._start_plan
            if epoch != start_epoch:
                left, offset = order.full(self.num_samples), 0
            chunk = order.split(left, self.world_size)[self.rank]
            epoch_order = order.epoch_order(self._samples_per_shard, self.spec.seed, epoch,
                                            self.spec.order_shard_block)
            plan = _EpochPlan(epoch, left, offset, order.steps(left, self.world_size, self.spec.batch_size),
                              epoch_order, chunk)
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}  # the consumer's, the producer's
            self._plans[epoch] = plan
        return plan

    @property
    def full_epoch_steps(self) -> int:
        """Steps of a whole epoch at this world size (training); `len` for other modes."""
        if not self._ordered:
            return len(self)
        return order.steps(order.full(self.num_samples), self.world_size, self.spec.batch_size)

    @property
    def state(self) -> dict:
        """Where training stands after the batches the consumer took (training loaders):
        ``{"epoch", "batch"`` (steps of the epoch done), ``"remaining"`` ([start, end] position
        intervals left of the epoch), ``"num_samples"``}: pass epoch, batch and remaining back
        as start_epoch / start_batch / remaining, with any world size."""
        if not self._ordered:
            raise ValueError(f"state: a {self.spec.mode} loader has no resumable data order")
        plan = self._plan(self.epoch)
        left = order.remaining_after(plan.base, self.world_size, self.spec.batch_size, self.batch - plan.offset)
        return {"epoch": self.epoch, "batch": self.batch, "remaining": [[a, b] for a, b in left],
                "num_samples": self.num_samples}

    def _build(self, epoch: int, batch: int) -> None:
        """A fresh pipeline for ``epoch`` (its data order depends only on seed, epoch and rank;
        training: on the epoch's order and this rank's chunk), past the ``batch`` batches
        already delivered."""
        self._close_pipeline()
        self._account_bytes(epoch)
        if self._ordered:
            self._build_listed(epoch, batch)
            return
        bpe = batches_per_epoch(self.num_samples, self.world_size, self.spec.batch_size)
        sharded = sharded_batches(self._samples_per_shard, self.rank, self.world_size, self.spec.batch_size,
                                  start_epoch=epoch)
        draws = DrawSource(self.spec, self.rank, bpe, epoch, batch)
        # A val/test sample found corrupt is left out of its batch; an emptied batch gets one
        # padding entry, a copy of the split's first readable sample (trimmed in `_to_batch`).
        first = [Slot(s, 0, -1) for s, n in enumerate(self._samples_per_shard) if n][:8]
        self._stream_sharded(epoch, batch, bpe)
        self._make_pipeline(lambda i: sharded(i + batch), draws.draws, substitutes=first, drop_corrupt=True)
        self._num_batches = bpe
        self._it_epoch = epoch

    def _build_listed(self, epoch: int, batch: int) -> None:
        """Training: a pipeline reading this rank's chunk of ``epoch`` from step ``batch`` on,
        padded to whole batches (the padding rule: module docstring)."""
        plan = self._plan(epoch)
        B, skip = self.spec.batch_size, batch - plan.offset
        if not 0 <= skip <= plan.steps:
            raise ValueError(f"start batch {batch} outside epoch {epoch}'s steps [{plan.offset}, "
                             f"{plan.offset + plan.steps}]")
        wanted = order.positions(plan.chunk)[skip * B:]
        slots = np.full((plan.steps - skip) * B, -1, np.int64)
        slots[:len(wanted)] = wanted
        self._it_first_batch = batch
        if not len(slots):  # nothing left of this epoch for anyone
            self._it, self._it_epoch = None, epoch
            return
        epoch_order = plan.epoch_order
        # Padding entries (and quarantined samples, found by the source as it reads them)
        # repeat one sample with zero weight: the chunk's first sample, else the epoch's first
        # that reads.
        candidates = [int(p) for p in slots[slots >= 0][:1]] + list(range(min(len(epoch_order), 64)))
        substitutes = [Slot(int(epoch_order.shard[p]), int(epoch_order.sample[p]), -1) for p in candidates]
        placeholder = substitutes[0]
        entries = [Slot(int(epoch_order.shard[p]), int(epoch_order.sample[p]), int(p)) if p >= 0 else placeholder
                   for p in slots]
        draws = PositionDraws(self.spec, epoch, slots)
        first_it, last_it = {}, {}
        for j, slot in enumerate(entries):
            first_it.setdefault(slot.shard, j // B)
            last_it[slot.shard] = j // B
        following = None
        if self._streamer is not None:  # the next epoch's shards at this world size, in read order
            nxt = order.epoch_order(self._samples_per_shard, self.spec.seed, epoch + 1,
                                    self.spec.order_shard_block)
            chunk = order.positions(order.split(order.full(self.num_samples), self.world_size)[self.rank])
            following = list(dict.fromkeys(nxt.shard[chunk].tolist()))
        self._stream_epoch(epoch, list(first_it), plan.steps - skip, following, first_it, last_it)
        self._make_pipeline(listed_batches(entries, B), draws.draws, substitutes=substitutes, drop_corrupt=False)
        self._it_epoch = epoch

    def _make_pipeline(self, batches, draws, *, substitutes, drop_corrupt: bool) -> None:
        if self._pool is None and self.read_threads:
            # daemon threads: a process failing on a dead server never waits at exit for reads retrying it
            self._pool = PriorityPool(self.read_threads, thread_name_prefix=f"tsn-read-{self._split}")
        ahead = max(1, -(-self.read_threads // self.spec.batch_size)) + 1
        pool = self._pool.at(0) if self._pool is not None else None  # reads in submission order
        self._source = SampleSource(self.spec, self.layout, self._access, self._index, batches, draws,
                                    quarantine=self._quarantine, substitutes=substitutes, drop_corrupt=drop_corrupt,
                                    pool=pool, batches_ahead=ahead, test_views=wants_test_views(self.spec),
                                    on_batch=_weak_method(self._batch_done), stage_times=self.stage_times)
        self.pipe = build_pipeline(self._source, self.layout, self.spec, device_id=self.device_id)
        self.pipe.build()
        self._names = list(output_names(self.spec, self.layout))
        self._frame_names = frame_output_names(self.spec, self.layout)
        self._ragged = set(self._frame_names) if self.spec.resolved_resize_backend == "torch" else set()
        self._it = self.pipe

    def _close_pipeline(self) -> None:
        if self._source is not None:
            self._source.close()
            self._sampled_bytes_closed += self._source.jpeg_bytes
        self._it = self.pipe = self._source = None  # release the previous epoch's pipeline first
        self._it_epoch = None

    def _next_outputs(self) -> dict:
        """One iteration of the pipeline by name, as torch tensors sharing DALI's memory (the
        dynamic executor keeps a buffer as long as a reference to it lives); the frame outputs
        of the torch backend as per-sample lists (each sample its own size). StopIteration at
        the epoch's end."""
        times = self.stage_times
        if times.enabled:
            # decode: the graph's time without the wait for its reads (counted as read_wait)
            t0, waited = time.perf_counter(), times.snapshot()["read_wait"]
            outputs = self.pipe.run()
            times.add("decode", max(time.perf_counter() - t0 - (times.snapshot()["read_wait"] - waited), 0.0))
        else:
            outputs = self.pipe.run()
        zero_copy = self.pipe.exec_dynamic
        batch = {}
        for name, out in zip(self._names, outputs):
            if name in self._ragged:
                batch[name] = per_sample(out, zero_copy)
            elif zero_copy:
                batch[name] = torch.from_dlpack(out.as_tensor())
            else:
                batch[name] = torch.from_numpy(np.array(out.as_tensor()))
        return batch

    def _copy(self, shard: int) -> str | None:
        """The node cache's local copy of ``shard``, fetched ahead by the streamer, or None when
        it does not fit: then the source reads the sampled frames from object storage."""
        return self._streamer.copy(self._tar_paths[shard])

    def _stream_epoch(self, epoch: int, sequence: list[int], steps: int, following: list[int] | None,
                      first_iteration: dict[int, int], last_iteration: dict[int, int]) -> None:
        """Tell the streamer this epoch's shards in read order and when each is next read
        (this epoch: epoch + first iteration / steps; ``following``: the next epoch's shards at
        this world size, in order); the source tells it when each is done."""
        self._last_iteration = last_iteration
        if self._streamer is None:
            return
        uris = [self._tar_paths[s] for s in sequence]
        uses = {self._tar_paths[s]: [epoch + first_iteration[s] / max(steps, 1)] for s in sequence}
        for k, s in enumerate(following or []):
            uses.setdefault(self._tar_paths[s], []).append(epoch + 1 + k / max(len(following), 1))
        self._streamer.start_epoch(uris, uses)

    def _stream_sharded(self, epoch: int, skip: int, bpe: int) -> None:
        """`_stream_epoch` for a val/test part: its samples in shard order from batch ``skip``."""
        from dataloading.pipeline.dali_planner import reader_part

        n, W, B = self.num_samples, self.world_size, self.spec.batch_size
        part = reader_part(self.rank, epoch, W)
        lo, hi = n * part // W + skip * B, n * (part + 1) // W
        first_sample = np.cumsum([0, *self._samples_per_shard])
        first_it, last_it = {}, {}
        for s in range(len(self._samples_per_shard)):
            a, b = max(lo, int(first_sample[s])), min(hi, int(first_sample[s + 1]))
            if a < b:
                first_it[s], last_it[s] = (a - lo) // B, (b - 1 - lo) // B
        self._stream_epoch(epoch, list(first_it), bpe - skip, None, first_it, last_it)

    def _batch_done(self, iteration: int) -> None:
        """The source handed batch ``iteration`` to the graph: the shards read for the last
        time this epoch by it are unpinned."""
        if self._streamer is None:
            return
        for s in [s for s, last in self._last_iteration.items() if last <= iteration]:
            del self._last_iteration[s]
            self._streamer.done(self._tar_paths[s])

    def _object_storage_total(self) -> int:
        """Bytes this loader has taken from object storage so far: ranged reads plus whole-shard
        downloads into the cache."""
        a, st = self._access, self._streamer
        return (a.objects.counters.bytes if a is not None else 0) + (st.downloaded_bytes if st is not None else 0)

    def _account_bytes(self, epoch: int) -> None:
        """Close the byte count of the epoch built before: ``object_storage_bytes[e]`` is what
        object storage served while epoch e's pipeline read (its reads end before the next
        epoch's build)."""
        now = self._object_storage_total()
        self._object_storage_bytes[self._bytes_epoch] = self._object_storage_bytes.get(self._bytes_epoch, 0) + \
            now - self._bytes_mark
        self._bytes_mark, self._bytes_epoch = now, epoch

    @property
    def object_storage_bytes(self) -> dict[int, int]:
        """{epoch: bytes object storage served for it} (the epoch being read included)."""
        out = dict(self._object_storage_bytes)
        out[self._bytes_epoch] = out.get(self._bytes_epoch, 0) + self._object_storage_total() - self._bytes_mark
        return out

    @property
    def object_storage_requests(self) -> int:
        """Requests this loader has sent to object storage so far (GETs and the HEAD that opens
        each object), ranged reads and whole-shard downloads together."""
        total = 0
        for objects in (self._access.objects if self._access is not None else None,
                        self._streamer.objects if self._streamer is not None else None):
            if objects is not None:
                c = objects.counters
                total += c.requests + c.opens
        return total

    @property
    def sampled_bytes(self) -> int:
        """Payload bytes handed to the graph so far (the sampled frames' JPEGs, or the
        members read whole): what the reads of this loader had to deliver at least."""
        return self._sampled_bytes_closed + (self._source.jpeg_bytes if self._source is not None else 0)

    def __len__(self) -> int:
        """Batches of the consumer's epoch (the same on every rank); training: steps done
        before this loader's pass plus the pass's steps."""
        if self._ordered:
            plan = self._plan(self.epoch)
            return plan.offset + plan.steps
        return self._num_batches

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batches of it taken by the consumer): pass as start_epoch/start_batch to
        resume here. Batches prepared ahead by the prefetching thread do not count."""
        return self.epoch, self.batch

    def __iter__(self):
        """The rest of the current epoch; the next pass is the next epoch."""
        while True:
            try:
                item = self._next_item()
            except BaseException:
                self._reset_producer()  # the pipeline's state is unknown: rebuild at `position` next time
                raise
            if item is _EPOCH_END:
                self.epoch, self.batch = self.epoch + 1, 0
                return
            self.batch += 1
            yield item

    def _next_item(self):
        """The consumer's next item (a `Batch` or _EPOCH_END): prepared ahead by the thread, or
        now on this thread when ``prefetch_batches`` is 0."""
        if not self._prefetch_batches:
            return self._produce()
        for _ in range(2):
            if self._prefetcher is None or self._prefetcher.finished:
                self._start_prefetcher()
            item = self._prefetcher.get()
            if item is not DONE:
                return item
            # The thread stopped at the start of an epoch it was not allowed to run into
            # (``epochs``): start one for this epoch.
        raise RuntimeError("prefetching thread ended without producing")  # pragma: no cover

    def _start_prefetcher(self) -> None:
        if (self._p_epoch, self._p_batch) != (self.epoch, self.batch):  # not expected; stay exact anyway
            self._p_epoch, self._p_batch, self._it_epoch = self.epoch, self.batch, None
        self._pass_epoch = self.epoch
        # At most an epoch (and its end) queued: the thread is never more than one epoch ahead.
        depth = min(self._prefetch_batches, max(len(self), self.full_epoch_steps) + 1)
        self._prefetcher = Prefetcher(self._step, depth, name=f"tsn-prefetch-{self._split}-rank{self.rank}")

    def _step(self):
        """The prefetching thread's step: `_produce`, except that it stops (`DONE`) at the start
        of an epoch beyond the pass it was started for unless ``epochs`` allows it."""
        if self._p_batch == 0 and self._p_epoch != self._pass_epoch \
                and (self._epochs is None or self._p_epoch >= self._epochs):
            return DONE
        return self._produce()

    def _produce(self):
        """The next batch at the producer's position (building the epoch's pipeline first when
        needed), or _EPOCH_END after the epoch's last batch. Runs on the prefetching thread,
        or on the consumer's when ``prefetch_batches`` is 0; the only code that touches DALI
        after __init__."""
        while True:
            if self._it_epoch != self._p_epoch:
                self._start(self._p_epoch, self._p_batch)
            try:
                if self._it is None:  # a training pass with no steps left
                    raise StopIteration
                out = self._next_outputs()
            except StopIteration:
                self._p_epoch, self._p_batch = self._p_epoch + 1, 0
                return _EPOCH_END
            except RuntimeError as e:
                error = self._source.error if self._source is not None else None
                if error is not None and error is not e:
                    raise error from e  # the source's own error (naming the object), not DALI's wrapper
                if not self._skip_undecodable(e):
                    raise
                self._start(self._p_epoch, self._p_batch)
                continue
            self._p_batch += 1
            return self._to_batch(out, self._p_batch - 1)

    def _to_batch(self, out: dict, batch: int) -> Batch:
        """One iteration of the pipeline, the epoch's batch ``batch`` -> `Batch` (the torch
        finishing step on CPU). Training keeps padding entries (``real`` False); val/test drop
        them (a padding entry there only stands in for an empty batch)."""
        position = out["position"].reshape(-1).long()
        if not self._ordered and bool((position < 0).any()):
            keep = (position >= 0).nonzero().reshape(-1).tolist()
            out = {name: ([value[k] for k in keep] if isinstance(value, list) else value[keep])
                   for name, value in out.items()}
            position = position[keep]
        if self.spec.resolved_resize_backend == "torch":
            with self.stage_times.timed("finish"):
                frames = finish_frames(sample_frames(out, self._frame_names), out["crop"], self.spec) \
                    if len(position) else torch.zeros((0, *self._frame_shape()))
        else:
            frames = out["frames"]
        real = pos = None
        if self._ordered:
            real, pos = position >= 0, position
        return Batch(frames=to_snippets(frames, self.spec), label=out["label"].reshape(-1).long(),
                     sample_index=out["sample_index"].reshape(-1).long(),
                     frame_indices=out["frame_indices"].long(), crop=out["crop"].long(),
                     frame_size=out["frame_size"].long(), real=real, position=pos)

    def _frame_shape(self) -> tuple[int, ...]:
        """(V?, F, C, S, S) of one sample's finished frames (an empty val/test batch)."""
        s, f = self.spec.crop.input_size, self.spec.num_segments * self.spec.frames_per_snippet
        views = (self.spec.num_views,) if self.spec.mode == "test" else ()
        return (*views, f, self.spec.channels, s, s)

    def _reset_producer(self) -> None:
        """Stop the thread, drop what it prepared ahead, and make the next item be rebuilt at
        the consumer's position."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        self._p_epoch, self._p_batch = self.epoch, self.batch
        self._it_epoch = None

    def close(self, wait: bool = True) -> None:
        """Stop the prefetching thread and release the pipeline, the read threads, the
        streamer and the cache's pins; idempotent. Iterating again afterwards rebuilds the
        pipeline at `position`. ``wait=False`` (training is failing, e.g. object storage is
        gone): read threads still retrying are not waited for, the prefetching thread only
        briefly (it must not be inside torch when the interpreter ends)."""
        if not wait and self._prefetcher is not None:
            self._prefetcher.close(timeout_s=5.0)
            self._prefetcher = None
        self._reset_producer()
        if wait:
            self._close_pipeline()
        self._account_bytes(self._bytes_epoch)
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None
        if self._streamer is not None:
            self._streamer.start_epoch([], {})  # drop the pins; the streamer stays usable
        if self._cache is not None:
            self._cache.release(id(self))

    def __enter__(self) -> "TSNLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        prefetcher = getattr(self, "_prefetcher", None)
        if prefetcher is not None:
            prefetcher.close()
        streamer = getattr(self, "_streamer", None)
        if streamer is not None:
            streamer.close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def skipped(self) -> list[dict]:
        """The corrupt samples skipped so far: {shard, key, reason} each."""
        return self._quarantine.skipped

    def _skip_undecodable(self, error: Exception) -> bool:
        """After the graph failed with ``error`` (a pack without checksums: bytes the source
        could not check): decode the payloads of the batches the source handed over lately in
        Python and quarantine those that do not decode; False when none is to blame."""
        source = self._source
        if source is None:
            return False
        found = False
        for _, rows in list(source.recent):
            for slot, outputs in rows:
                reason = undecodable(list(outputs[:len(source.payload_names)]), source.cut)
                if reason and self._quarantine.add(self._tar_paths[slot.shard],
                                                   self._index.key(slot.shard, slot.sample), reason):
                    found = True
        if not found:
            log.error("DALI pipeline failed and no corrupt sample was found: %s", error)
        return found


def _weak_method(method):
    """``method`` (a bound method) called through a weak reference to its object: the reading
    threads hold these callbacks, and must not keep a dropped loader alive."""
    ref, func = weakref.ref(method.__self__), method.__func__
    return lambda *args: func(ref(), *args) if ref() is not None else None


def _log_cache_plan(cache: ShardCache, split: str, shard_bytes: list[int], world_size: int, rank: int) -> None:
    """One line at start: what the node cache will hold of this rank's data and what streams
    (a cache smaller than the data still works, but the user should know what it costs)."""
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    split_bytes, limit = sum(shard_bytes), cache.room_bytes()
    disk = "" if limit >= cache.size_limit_bytes else \
        f"; its disk has room for {gb(limit)} of data.cache_size_bytes ({gb(cache.size_limit_bytes)})"
    chunk = split_bytes / world_size  # a rank reads ~its share of the split's shards per epoch
    too_big = sum(1 for n in shard_bytes if n > limit)
    if chunk <= limit:
        what = "it fits: each shard is downloaded once per node, later epochs read local copies"
    else:
        what = (f"it does not fit: ~{1 - limit / chunk:.0%} of each epoch's shards are re-downloaded (the copies "
                f"kept are those needed soonest); raise data.cache_size_bytes to avoid that")
    if too_big:
        what += f"; {too_big} shard(s) larger than the limit are read in place by ranged GETs of the sampled frames"
    (log.info if chunk <= limit and not too_big else log.warning)(
        "shard cache %s (limit %s%s, shared by the node's ranks): rank %d of %d reads ~%s of the %s split "
        "(%s) per epoch; %s", cache.dir, gb(limit), disk, rank, world_size, gb(chunk), split, gb(split_bytes), what)


@dataclass
class _EpochPlan:
    """A training loader's pass over one epoch: ``base`` = position intervals left when the
    pass starts, ``offset`` = steps of the epoch done before it, ``steps`` = the pass's steps
    (every rank), ``epoch_order`` = the epoch's order, ``chunk`` = this rank's intervals of ``base``."""

    epoch: int
    base: list
    offset: int
    steps: int
    epoch_order: order.EpochOrder
    chunk: list
