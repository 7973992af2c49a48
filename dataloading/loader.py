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
(seed, epoch) order of `dataloading.order`, independent of the world size; the work left in
the epoch is a list of position intervals (a fresh epoch: all N). Each rank reads its
contiguous chunk of it (`order.split`) through run-local index files that list those samples
in order (`dataloading.listing`); the draws of a sample are keyed by its position
(`dali_planner.PositionDraws`). Every rank runs ``ceil(max chunk / B)`` steps; the padding
rule: a rank whose chunk runs out fills its last batch(es) with copies of one of its samples
(or of the epoch's first sample when its chunk is empty) that are marked ``Batch.real ==
False``, carry no weight in the loss (`tsn.engine.train_step`) and are not counted as used.
`state` = (epoch, steps taken, intervals left) after the batches the consumer took; a loader
started from it with ANY world size finishes the epoch with every sample used exactly once.
Quarantined samples (below) keep their positions but become padding entries: skipped, counted.

A sample whose members turn out corrupt at read time is quarantined (`quarantine`): the loader
finds it by checking its shards in Python, drops it from a run-local copy of the DALI index
files (training: replaces it by a padding entry of its listing), counts it (``skipped``),
names it in a warning, and rebuilds the pipeline at the same epoch and batch; nothing else is
lost.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataloading import order, shards
from dataloading.cache import ShardCache, rank_shards
from dataloading.dali_pipeline import META_NAMES, build_pipeline, frame_output_names, output_names
from dataloading.dali_planner import reader_part
from dataloading.finish import finish_frames, keep_freed_memory, sample_frames, to_snippets
from dataloading.listing import SplitIndex
from dataloading.prefetch import DONE, Prefetcher
from dataloading.quarantine import Quarantine, UnreadableShard
from dataloading.spec import PipelineSpec

log = logging.getLogger(__name__)

_EPOCH_END = object()  # the producer's item after an epoch's last batch


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
    # each entry's position in the epoch's order (`dataloading.order`), -1 for padding.
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


_ITERATOR_CLASS = None


def _iterator_class():
    """DALIGenericIterator that hands some outputs over as per-sample tensors (see below)."""
    global _ITERATOR_CLASS
    if _ITERATOR_CLASS is not None:
        return _ITERATOR_CLASS
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    class RaggedIterator(DALIGenericIterator):
        """DALI's PyTorch iterator (its epoch length, drop / partial last batch and padding
        logic, reused as is: its private helpers, pinned nvidia-dali 2.4) for one CPU pipeline
        whose ``ragged`` outputs have a different shape per sample. Those come as a list of
        per-sample tensors sharing DALI's memory; the others as batch tensors, as
        DALIGenericIterator gives them. The stock iterator needs one shape per batch, i.e. an
        fn.pad in the graph (~20 ms of the DALI thread per batch of 8 x 8 frames) and a copy of
        the padded batch."""

        def __init__(self, *args, ragged: tuple[str, ...] = (), **kwargs):
            self._ragged = set(ragged)
            super().__init__(*args, **kwargs)

        def __next__(self):
            self._ever_consumed = True
            (outputs,) = self._get_outputs()
            zero_copy = self._pipes[0].exec_dynamic
            batch = {}
            for name, out in zip(self.output_map, outputs):
                if name in self._ragged:
                    batch[name] = per_sample(out, zero_copy)
                elif zero_copy:
                    batch[name] = torch.from_dlpack(out.as_tensor())
                else:
                    batch[name] = torch.from_numpy(np.array(out.as_tensor()))
            self._schedule_runs()
            self._advance_and_check_drop_last()
            drop, left = self._remove_padded()
            if np.any(drop):  # the epoch's last batch: cut the reader's padding samples
                batch = {name: value[: int(left[0])] for name, value in batch.items()}
            return [batch]

    _ITERATOR_CLASS = RaggedIterator
    return RaggedIterator


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
                 cache: ShardCache | None = None, remaining=None):
        if prefetch_batches < 0:
            raise ValueError(f"prefetch_batches must be >= 0, got {prefetch_batches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self._prefetcher: Prefetcher | None = None  # first: __del__ may run on a failed __init__
        self._index: SplitIndex | None = None
        manifest = shards.load_manifest(dataset_dir)
        keep_freed_memory()
        self.layout = manifest["layout"]
        shards.require_modality(dataset_dir, manifest, spec.stored_modality)
        if self.layout == shards.LAYOUT_VIDEO and spec.device == "cpu" and not spec.is_flow \
                and manifest["codec"] not in shards.CPU_DECODABLE_VIDEO_CODECS:
            raise ValueError(f"{dataset_dir}: codec {manifest['codec']!r} decodes only on GPU (DALI 'mixed' "
                             f"backend); repack with --codec jpeg, vp9 or mjpeg for CPU training")
        tar_paths, index_paths, self.num_samples = shards.split_shards(dataset_dir, split)
        self._original_index_paths = list(index_paths)
        # ``cache``: each epoch's pipeline reads the split's s3:// shards from node-local copies
        # (`ShardCache.resolve_shards`); object_storage_bytes = {epoch: bytes it cost object storage}.
        self._cache, self.object_storage_bytes = cache, {}
        self._samples_per_shard = [int(s["num_samples"]) for s in manifest["splits"][split]["shards"]]
        self._quarantine = Quarantine(tar_paths, index_paths, self.layout, spec.stored_modality)
        self.spec, self.rank, self.world_size, self.device_id = spec, rank, world_size, device_id
        self._ordered = spec.mode == "train"  # exact accounting (module docstring); else DALI's sharding
        if self._ordered:
            if self.num_samples < 1:
                raise ValueError(f"{dataset_dir}: split {split!r} has no samples to train on")
            self._index = SplitIndex(tar_paths, index_paths)
            if self._index.samples_per_shard != self._samples_per_shard:
                raise ValueError(f"{dataset_dir}: the index files of split {split!r} list "
                                 f"{self._index.samples_per_shard} samples per shard, manifest.json says "
                                 f"{self._samples_per_shard}")
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
        self._start(start_epoch, start_batch)  # on this thread: a broken dataset fails here

    def _start(self, epoch: int, skip_batches: int) -> None:
        """(Re)build the pipeline at ``epoch`` and skip batches already delivered; quarantine
        corrupt samples met on the way (building already prefetches batches)."""
        while True:
            try:
                self._build(epoch, skip_batches)
                return
            except RuntimeError as e:
                if not self._skip_corrupt(e):
                    raise

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
            plan = _EpochPlan(epoch, left, offset, order.steps(left, self.world_size, self.spec.batch_size),
                              order.epoch_order(self._samples_per_shard, self.spec.seed, epoch), chunk)
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
        """A fresh pipeline for ``epoch`` (see `build_pipeline`: its data order depends only on
        seed, epoch and rank; training: on the epoch's order and this rank's chunk), past the
        ``batch`` batches already delivered."""
        from nvidia.dali.plugin.pytorch import LastBatchPolicy

        self._it = self.pipe = None  # release the previous epoch's pipeline first
        self._it_epoch = None
        if self._ordered:
            self._build_listed(epoch, batch)
            return
        tar_paths, index_paths = self._shard_paths(epoch)
        self.pipe = build_pipeline(
            tar_paths, index_paths, self.layout, self.spec, shard_id=self.rank,
            num_shards=self.world_size, num_samples=self.num_samples, device_id=self.device_id,
            start_epoch=epoch)
        policy = LastBatchPolicy.DROP if self.spec.mode == "train" else LastBatchPolicy.PARTIAL
        names = list(output_names(self.spec, self.layout))
        self._frame_names = frame_output_names(self.spec, self.layout)
        self._it = self._iterator(names, policy)
        self._num_batches = len(self._it)
        self._it_epoch = epoch
        for _ in range(batch):
            next(self._it)

    def _build_listed(self, epoch: int, batch: int) -> None:
        """Training: a pipeline reading this rank's chunk of ``epoch`` from step ``batch`` on,
        padded to whole batches (the padding rule: module docstring)."""
        from nvidia.dali.plugin.pytorch import LastBatchPolicy

        plan = self._plan(epoch)
        B, skip = self.spec.batch_size, batch - plan.offset
        if not 0 <= skip <= plan.steps:
            raise ValueError(f"start batch {batch} outside epoch {epoch}'s steps [{plan.offset}, "
                             f"{plan.offset + plan.steps}]")
        wanted = order.positions(plan.chunk)[skip * B:]
        slots = np.full((plan.steps - skip) * B, -1, np.int64)
        slots[:len(wanted)] = wanted
        self._it_first_batch, self._it_real, self._it_positions = batch, np.zeros(0, bool), slots
        if not len(slots):  # nothing left of this epoch for anyone
            self._it, self._it_epoch = None, epoch
            return
        bad = self._quarantined()
        epoch_order = plan.epoch_order
        real = slots >= 0
        if bad:  # quarantined samples keep their slot as padding: nothing after them shifts
            real &= np.array([(int(epoch_order.shard[p]), int(epoch_order.sample[p])) not in bad for p in slots])
        placeholder = self._placeholder(epoch_order, slots[real][:1], bad)
        entries = [(int(epoch_order.shard[p]), int(epoch_order.sample[p])) if ok else placeholder
                   for p, ok in zip(slots, real)]
        tars = self._local_tars(epoch, order.shards_of(epoch_order, plan.chunk))
        tar_paths, index_paths = self._index.write(entries, tars)
        self.pipe = build_pipeline(
            tar_paths, index_paths, self.layout, self.spec, positions=np.where(real, slots, -1),
            device_id=self.device_id, start_epoch=epoch)
        names = list(output_names(self.spec, self.layout))
        self._frame_names = frame_output_names(self.spec, self.layout)
        self._it = self._iterator(names, LastBatchPolicy.DROP)  # whole batches by construction
        self._it_real, self._it_positions = real, np.where(real, slots, -1)
        self._it_epoch = epoch

    def _iterator(self, names, policy):
        """The DALI iterator over ``self.pipe``: per-sample frames on CPU, else one dense batch
        tensor (the graph resized; on the GPU in production)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if self.spec.resolved_resize_backend == "torch":  # CPU: frames handed over per sample
            return _iterator_class()(self.pipe, names, reader_name="reader", last_batch_policy=policy,
                                     auto_reset=False, prepare_first_batch=False, ragged=self._frame_names)
        return DALIGenericIterator(self.pipe, names, reader_name="reader", last_batch_policy=policy, auto_reset=False)

    def _quarantined(self) -> set[tuple[int, int]]:
        """(shard, sample) of the samples quarantined so far."""
        where = self._index.position_of_key
        return {where[(b["shard"], b["key"])] for b in self._quarantine.skipped if (b["shard"], b["key"]) in where}

    def _placeholder(self, epoch_order: order.EpochOrder, first_real, bad) -> tuple[int, int]:
        """The sample padding entries repeat: the listing's first real sample, else the first
        sample of the epoch's order that is not quarantined."""
        candidates = first_real if len(first_real) else range(len(epoch_order))
        for p in candidates:
            entry = (int(epoch_order.shard[p]), int(epoch_order.sample[p]))
            if entry not in bad:
                return entry
        raise ValueError(f"split {self._split!r}: every sample is quarantined")

    def _local_tars(self, epoch: int, part: set[int]) -> list[str]:
        """The split's tars for a training pipeline: with a cache, local copies (`ShardCache.
        resolve_shards`; ``part``, the shards of this rank's chunk, is what the epoch costs when
        the tars stream)."""
        tars, idxs = self._index.tar_paths, self._original_index_paths
        if self._cache is None:
            return tars
        tars, _, cost_bytes = self._cache.resolve_shards(tars, idxs, part=part, holder=id(self))
        self.object_storage_bytes[epoch] = self.object_storage_bytes.get(epoch, 0) + cost_bytes
        return tars

    def _shard_paths(self, epoch: int) -> tuple[list[str], list[str]]:
        """(tars, indexes) for ``epoch``'s pipeline: with a cache, local copies (`ShardCache.
        resolve_shards`; this rank's part in ``epoch``, rotated as `build_pipeline` does, is
        what the epoch costs when the tars stream), the previous epoch's unpinned."""
        tars, idxs = self._quarantine.tar_paths, self._quarantine.index_paths
        if self._cache is None:
            return tars, idxs
        reader_shard = reader_part(self.rank, epoch, self.world_size)
        part = rank_shards(self._samples_per_shard, reader_shard, self.world_size)
        tars, idxs, cost_bytes = self._cache.resolve_shards(tars, idxs, part=part, holder=id(self))
        self.object_storage_bytes[epoch] = self.object_storage_bytes.get(epoch, 0) + cost_bytes
        return tars, idxs

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
                out = next(self._it)[0]
            except StopIteration:
                self._p_epoch, self._p_batch = self._p_epoch + 1, 0
                return _EPOCH_END
            except RuntimeError as e:
                if not self._skip_corrupt(e):
                    raise
                self._start(self._p_epoch, self._p_batch)
                continue
            self._p_batch += 1
            return self._to_batch(out, self._p_batch - 1)

    def _to_batch(self, out: dict, batch: int) -> Batch:
        """One iteration of the DALI iterator, the epoch's batch ``batch`` -> `Batch` (the torch
        finishing step on CPU)."""
        if self.spec.resolved_resize_backend == "torch":
            frames = finish_frames(sample_frames(out, self._frame_names), out["crop"], self.spec)
        else:
            frames = out["frames"]
        real = position = None
        if self._ordered:
            B, j = self.spec.batch_size, batch - self._it_first_batch
            real = torch.from_numpy(self._it_real[j * B:(j + 1) * B].copy())
            position = torch.from_numpy(self._it_positions[j * B:(j + 1) * B].copy())
        return Batch(frames=to_snippets(frames, self.spec), label=out["label"].reshape(-1).long(),
                     sample_index=out["sample_index"].reshape(-1).long(),
                     frame_indices=out["frame_indices"].long(), crop=out["crop"].long(),
                     frame_size=out["frame_size"].long(), real=real, position=position)

    def _reset_producer(self) -> None:
        """Stop the thread, drop what it prepared ahead, and make the next item be rebuilt at
        the consumer's position."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        self._p_epoch, self._p_batch = self.epoch, self.batch
        self._it_epoch = None

    def close(self) -> None:
        """Stop the prefetching thread and release the pipeline; idempotent. Iterating again
        afterwards rebuilds the pipeline at `position`."""
        self._reset_producer()
        self._it = self.pipe = None
        if self._cache is not None:
            self._cache.release(id(self))
        if self._index is not None:
            self._index.close()

    def __enter__(self) -> "TSNLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        prefetcher = getattr(self, "_prefetcher", None)
        if prefetcher is not None:
            prefetcher.close()
        cache = getattr(self, "_cache", None)
        if cache is not None:
            cache.release(id(self))

    @property
    def skipped(self) -> list[dict]:
        """The corrupt samples skipped so far: {shard, key, reason} each."""
        return self._quarantine.skipped

    def _skip_corrupt(self, error: Exception) -> bool:
        """After the pipeline failed with ``error``: quarantine the corrupt samples of this
        rank's shards (`quarantine.Quarantine`); False when there is none to blame."""
        try:
            new = self._quarantine.scan()
        except UnreadableShard as e:  # unreadable tar structure: nothing we can cut out
            log.error("%s", e)
            return False
        if not new:
            log.error("DALI pipeline failed and no corrupt sample was found: %s", error)
            return False
        if not self._ordered:  # training keeps the epoch's order: the sample becomes padding
            self.num_samples -= len(new)
        return True


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
