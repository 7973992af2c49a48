"""The DALI graph's input: a Python source that reads, for each sample, only the bytes the
sample's plan needs (its ``info`` member, one offset table, the K x L sampled frames), and
hands the graph the sampled JPEGs with the plan (`SampleSource`, an ``external_source``).

Why not DALI's ``readers.webdataset``: it reads every member of a sample whole (a frame pack
holds every frame: 3 MB for a 10-second clip at short side 256, where RGB TSN with K = 3 needs
~37 kB of JPEGs), and from object storage it makes one ranged GET per member, one at a time
(latency-bound: 10.6 clips/s at 26 ms per request). The source here:

* plans each sample before reading its frames (`dali_planner.SamplePlanner.plan`, the function
  the reference loader replays), so only the sampled frames' byte ranges are read, merged
  where they touch (`byteranges.coalesce`);
* reads through a `ShardAccess`: a local file by ``pread``, a shard in object storage from the
  node's cached copy (`dataloading.store.cache`) or by ranged GETs of just those bytes;
* keeps many samples in flight on a pool of threads (``pool``; pread and pyarrow's S3 client
  release the GIL), ``batches_ahead`` batches ahead of what the graph asked for, and returns
  each batch in order: the batches are the same whatever the timing.

A sample whose bytes fail their pack-time checksums, or whose offset table or info member is
malformed, is corrupt: the source names it in the `quarantine.Quarantine` (a warning, counted),
and in training puts a padding entry in its slot (the substitute sample with zero weight,
``position`` -1: nothing after it shifts); in val/test leaves it out of its batch.

Per sample the source's outputs are (`output_names`): the payload (the sampled JPEGs
``jpeg0..``, frame-major, or ``video`` = the whole video member), the planner's `META`
arrays (+ test view anchors ``view0..``), ``label`` () int32, ``sample_index`` () int32,
``position`` () int64 (training: the sample's position in the epoch's order; val/test: its
index in the rank's part; -1: padding), and for flow computed in the graph from a video,
``rgb_indices`` (K * (L + 1),) int32.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dataloading.format import shards
from dataloading.format.quarantine import Quarantine
from dataloading.format.shard_index import ShardIndex
from dataloading.pipeline.dali_planner import SamplePlanner, wants_test_views
from dataloading.pipeline.stage_times import StageTimes
from dataloading.planning.spec import PipelineSpec
from dataloading.store import storage
from dataloading.store.byteranges import LocalFiles, ObjectFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    """One entry of a batch: sample ``sample`` (line of the index) of shard ``shard`` (its
    position in the split's list) at ``position`` (-1: a padding entry)."""

    shard: int
    sample: int
    position: int


class CorruptSample(ValueError):
    """A sample's bytes cannot be used (checksum mismatch, malformed member); the message
    says why."""


def planner_cut(spec: PipelineSpec, layout: str) -> str | None:
    """What the source reads of a sample's pack (`SamplePlanner` cuts): the flow planes, the
    sampled RGB frames, each snippet's L + 1 RGB frames (flow computed in the graph from a
    frame pack), or None: the whole video member."""
    if spec.dali_flow:
        return "rgb_snippets" if layout == shards.LAYOUT_JPEG else None
    if spec.is_flow:
        return "flow"
    return "rgb" if layout == shards.LAYOUT_JPEG else None


def index_members(spec: PipelineSpec, layout: str) -> tuple[str, ...]:
    """The members a source reads: ``info`` and the pack it cuts (frames blob, offsets table),
    or ``info`` and the video."""
    cut = planner_cut(spec, layout)
    if cut == "flow":
        return ("info", *spec.modality_row.shard_members)
    if cut is not None:
        return ("info", "frames", "offsets")
    return ("info", "video")


class ShardAccess:
    """Where a source reads the bytes of a split's shards: ``locations[s]`` (local paths or
    ``s3://`` URIs) of ``sizes[s]`` bytes (the manifest's). Local files by pread; objects
    through ``copies`` (a callable ``shard -> local path or None``: the node cache's copy,
    `dataloading.store.cache`) when it gives one, else by ranged GETs of just the bytes asked for.
    Counts the bytes read from local files and from object storage (`counters`)."""

    def __init__(self, locations: Sequence[str], sizes: Sequence[int] | None = None, *,
                 copies: Callable[[int], str | None] | None = None, local: LocalFiles | None = None,
                 objects: ObjectFiles | None = None):
        self.locations = list(locations)
        self.sizes = None if sizes is None else [int(n) for n in sizes]
        self.copies = copies
        self.local = local or LocalFiles()
        sized = {} if self.sizes is None else dict(zip(self.locations, self.sizes))
        self.objects = objects or ObjectFiles({k: v for k, v in sized.items() if storage.is_uri(k)})

    def read(self, shard: int, spans) -> list[memoryview]:
        return self._route(shard).read(self._where(shard), spans)

    def max_gap_bytes(self, shard: int) -> int:
        """The gap up to which the reader of ``shard`` merges ranges into one read."""
        return self._route(shard).max_gap_bytes

    def _where(self, shard: int) -> str:
        location = self.locations[shard]
        if storage.is_uri(location) and self.copies is not None:
            return self.copies(shard) or location
        return location

    def _route(self, shard: int):
        return self.objects if storage.is_uri(self._where(shard)) else self.local

    def close(self) -> None:
        self.local.close()
        self.objects.close()


class SampleSource:
    """The ``external_source`` callback (batch mode, ``batch_info=True``) of one pipeline.

    ``batches(i)``: the `Slot`s of pipeline iteration ``i`` (None: the epoch is over: the
    source raises StopIteration); ``draws(i)``: their draws rows ((B, K + 3) int64, the first
    len(slots) used). ``substitutes``: the samples a padding entry may copy, in order of
    preference (the first one that reads is used, with zero draws). ``drop_corrupt``: leave
    a corrupt sample out of its batch (val/test) instead of padding its slot (training); an
    emptied batch gets one padding entry (DALI rejects empty batches). ``pool``: the threads
    that read (None: read on the caller's thread, DALI's prefetching one). ``test_views``: give
    the test views' anchors (the graph cuts them: `dali_planner.wants_test_views`);
    ``whole_frames``: the graph decodes whole frames (test mode, decode-only; default: test
    mode), so the crop's anchor (and without test views its shape) are not given.
    ``on_batch(i)``: called once batch i is read (the shards it read may be released).
    """

    def __init__(self, spec: PipelineSpec, layout: str, access: ShardAccess, index: ShardIndex,
                 batches: Callable[[int], list[Slot] | None], draws: Callable[[int], np.ndarray], *,
                 quarantine: Quarantine | None = None, substitutes: Sequence[Slot] = (), drop_corrupt: bool = False,
                 pool: ThreadPoolExecutor | None = None, batches_ahead: int = 2, test_views: bool = False,
                 whole_frames: bool | None = None, on_batch: Callable[[int], None] | None = None,
                 stage_times: StageTimes | None = None):
        if batches_ahead < 0:
            raise ValueError(f"batches_ahead must be >= 0, got {batches_ahead}")
        self.spec, self.layout, self.access, self.index = spec, layout, access, index
        self.cut = planner_cut(spec, layout)
        self.planner = SamplePlanner(spec, self.cut, test_views=test_views)
        self._batches, self._draws, self._on_batch = batches, draws, on_batch
        self.quarantine = quarantine if quarantine is not None else Quarantine()
        self.substitutes, self.drop_corrupt = list(substitutes), drop_corrupt
        self.pool, self.batches_ahead = pool, batches_ahead
        members = index_members(spec, layout)
        self._offsets_ext = members[2] if self.cut else None
        self._pack_ext = members[1]
        whole = spec.mode == "test" if whole_frames is None else whole_frames
        unused = ({"anchor"} | (set() if test_views else {"shape"})) if whole else set()
        self._all_names = self._names(test_views)
        self._keep = [i for i, n in enumerate(self._all_names) if n not in unused]
        self._pending: dict[int, list] = {}
        self._slots: dict[int, list[Slot] | None] = {}
        self._next_submit = 0
        self._substitute = None
        self._lock = threading.Lock()
        self._closed = False
        self.recent: collections.deque = collections.deque(maxlen=8)  # (iteration, [(slot, outputs)])
        self.error: BaseException | None = None  # the last read error, raised as is by the loader
        self.jpeg_bytes = 0  # bytes of the payload handed to the graph (the sampled frames' JPEGs)
        self.times = stage_times if stage_times is not None else StageTimes(enabled=False)
        self._thread_reads = threading.local()

    # --- outputs -------------------------------------------------------------------------------

    @property
    def payload_names(self) -> tuple[str, ...]:
        if self.cut is None:
            return ("video",)
        return tuple(f"jpeg{j}" for j in range(self.planner.num_jpegs))

    def _names(self, test_views: bool) -> tuple[str, ...]:
        views = tuple(f"view{v}" for v in range(self.planner.num_view_anchors))
        extra = ("rgb_indices",) if self.spec.dali_flow and self.cut is None else ()
        return (*self.payload_names, *SamplePlanner.META, *views, "label", "sample_index", "position", *extra)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The outputs, in order (module docstring; those the graph does not use left out)."""
        return tuple(self._all_names[i] for i in self._keep)

    @property
    def output_dtypes(self) -> list:
        from nvidia.dali import types

        by_name = {"frame_indices": types.INT64, "crop": types.INT64, "frame_size": types.INT64,
                   "position": types.INT64}
        return [types.UINT8 if n in self.payload_names else by_name.get(n, types.INT32) for n in self.output_names]

    # --- the callback ------------------------------------------------------------------------

    def slots(self, iteration: int) -> list[Slot] | None:
        if iteration not in self._slots:
            self._slots[iteration] = self._batches(iteration)
        return self._slots[iteration]

    def __call__(self, batch_info):
        i = batch_info.iteration
        try:
            slots = self.slots(i)
            if slots is None:
                raise StopIteration
            self._submit_through(i + self.batches_ahead)
            rows = self._collect(i, slots)
        except StopIteration:
            raise
        except BaseException as e:
            self.error = e
            raise
        self.slots_done(i)
        return [list(column) for column in zip(*rows)]

    def _submit_through(self, last: int) -> None:
        """Start reading every batch up to iteration ``last`` not yet started."""
        while self._next_submit <= last:
            j = self._next_submit
            slots = self.slots(j)
            if slots is None:
                return
            draws = self._draws(j)
            if self.pool is None:
                self._pending[j] = [(slot, draws[k]) for k, slot in enumerate(slots)]
            else:
                self._pending[j] = [self.pool.submit(self._load_or_bad, slot, draws[k]) for k, slot in enumerate(slots)]
            self._next_submit += 1

    def _collect(self, i: int, slots: list[Slot]) -> list[tuple]:
        pending = self._pending.pop(i)
        with self.times.timed("read_wait"):  # without a pool the reads run here: all of them are waited for
            results = [p.result() if isinstance(p, Future) else self._load_or_bad(*p) for p in pending]
        rows, kept = [], []
        for slot, result in zip(slots, results):
            if isinstance(result, CorruptSample):
                self._name_corrupt(slot, str(result))
                if self.drop_corrupt:
                    continue
                result = self.substitute()
            rows.append(result)
            kept.append((slot, result))
        if not rows:
            rows = [self.substitute()]
        self.recent.append((i, kept))
        for row in rows:
            self.jpeg_bytes += sum(int(a.nbytes) for a in row[:len(self.payload_names)])
        return rows

    def slots_done(self, iteration: int) -> None:
        """The batch of ``iteration`` is read and handed to the graph: ``on_batch`` (the loader
        unpins the shards no later batch of the epoch reads)."""
        if self._on_batch is not None:
            self._on_batch(iteration)

    def _name_corrupt(self, slot: Slot, reason: str) -> None:
        key = self.index.key(slot.shard, slot.sample)
        self.quarantine.add(self.access.locations[slot.shard], key, reason)

    # --- one sample ----------------------------------------------------------------------------

    def _load_or_bad(self, slot: Slot, draws: np.ndarray):
        """`load`'s outputs, or the CorruptSample that says why the sample cannot be used."""
        if self._closed:
            raise RuntimeError("sample source closed")
        t0 = time.perf_counter()
        read_before = self._read_s()
        try:
            return self.load(slot, draws)
        except CorruptSample as e:
            return e
        finally:
            if self.times.enabled:  # what was not reading was planning and checking
                self.times.add("plan", max(time.perf_counter() - t0 - (self._read_s() - read_before), 0.0))

    def _read_s(self) -> float:
        """This thread's seconds in `_read` so far."""
        return getattr(self._thread_reads, "seconds", 0.0)

    def _read(self, shard: int, spans) -> list:
        """`ShardAccess.read`, timed as the ``read`` stage (per thread too, for ``plan``)."""
        if not self.times.enabled:
            return self.access.read(shard, spans)
        t0 = time.perf_counter()
        try:
            return self.access.read(shard, spans)
        finally:
            dt = time.perf_counter() - t0
            self._thread_reads.seconds = self._read_s() + dt
            self.times.add("read", dt)

    def load(self, slot: Slot, draws: np.ndarray) -> tuple:
        """The outputs of one sample (`output_names`), reading only what its plan needs.
        Raises CorruptSample (the reason) for a sample that cannot be used."""
        table = self.index.table(slot.shard)
        key = table.keys[slot.sample]
        known = self.quarantine.reason(self.access.locations[slot.shard], key)
        if known is not None:
            raise CorruptSample(known)
        if slot.sample in table.problems:  # e.g. a member renamed in the shard (`shard_index._table`)
            raise CorruptSample(table.problems[slot.sample])
        spans = [table.span(slot.sample, "info")]
        whole_sample = None
        if self.cut is not None:
            spans.append(table.span(slot.sample, self._offsets_ext))
            if spans[1][0] - spans[0][1] <= self.access.max_gap_bytes(slot.shard):
                # info and the offset table would share one read anyway (a small sample in
                # object storage: a request is worth megabytes): read it once, cut from it
                whole_sample = (spans[0][0], max(spans[1][1], table.span(slot.sample, self._pack_ext)[1]))
        if whole_sample is not None:
            (blob,) = self._read(slot.shard, [whole_sample])
            raw = [blob[a - whole_sample[0]:b - whole_sample[0]] for a, b in spans]
        else:
            raw = self._read(slot.shard, spans)
        info = _info_words(raw[0])
        number = shards.sample_number(key)
        if number is not None and int(info[shards.INFO_SAMPLE_INDEX]) != number:
            # the tar is not the one its index describes (replaced after packing, index kept)
            raise CorruptSample(f"member info is sample {int(info[shards.INFO_SAMPLE_INDEX]):08d}'s, not "
                                f"{number:08d}'s: the shard does not match its index (replaced after packing?)")
        if self.cut is None:  # the video layout: the whole member (checksums: info only, as before)
            problem = self.planner.problem(info)
            if problem:
                raise CorruptSample(problem)
            planned = self.planner.plan(info, draws)
            (video,) = self._read(slot.shard, [table.span(slot.sample, "video")])
            payload = [np.frombuffer(video, np.uint8)]
        else:
            problem = self.planner.problem(info)  # the info member first: the plan is made from it
            if problem:
                raise CorruptSample(problem)
            planned = self.planner.plan(info, draws)
            pack_start, pack_end = table.span(slot.sample, self._pack_ext)
            offsets = _offsets(raw[1], pack_end - pack_start, self._pack_ext)
            entries = planned.entries
            if entries.size and int(entries.max()) >= len(offsets) - 1:
                raise CorruptSample(f"member {self._pack_ext}: entry {int(entries.max())} planned, the offset table "
                                    f"has {len(offsets) - 1} (info member and pack disagree)")
            frame_spans = [(pack_start + int(offsets[e]), pack_start + int(offsets[e + 1])) for e in entries]
            if whole_sample is not None:
                jpegs = [blob[a - whole_sample[0]:b - whole_sample[0]] for a, b in frame_spans]
            else:
                jpegs = self._read(slot.shard, frame_spans)
            problem = self.planner.problem(info, entries, jpegs)
            if problem:
                raise CorruptSample(problem)
            payload = [np.frombuffer(j, np.uint8) for j in jpegs]
        meta = (np.array(info[shards.INFO_LABEL], np.int32), np.array(info[shards.INFO_SAMPLE_INDEX], np.int32),
                np.array(slot.position, np.int64))
        extra = (planned.rgb_indices.astype(np.int32),) if self.spec.dali_flow and self.cut is None else ()
        full = (*payload, *planned.meta, *meta, *extra)
        return tuple(full[i] for i in self._keep)

    def substitute(self) -> tuple:
        """A padding entry's outputs: the first of ``substitutes`` that reads, zero draws,
        position -1 (computed once)."""
        with self._lock:
            if self._substitute is not None:
                return self._substitute
            zero = np.zeros(self.spec.num_segments + 3, np.int64)
            for slot in self.substitutes:
                try:
                    out = self.load(Slot(slot.shard, slot.sample, -1), zero)
                except CorruptSample as e:
                    self._name_corrupt(slot, str(e))
                    continue
                self._substitute = out
                return out
        raise ValueError(f"no readable sample to pad with among {len(self.substitutes)} candidate(s): every one is "
                         f"corrupt (see the warnings above)")

    def close(self) -> None:
        """Stop reading: pending reads not yet started are cancelled; idempotent."""
        self._closed = True
        for pending in self._pending.values():
            for p in pending:
                if isinstance(p, Future):
                    p.cancel()
        self._pending.clear()


def _info_words(raw) -> np.ndarray:
    if len(raw) % 4 or len(raw) < 4 * len(shards.INFO_FIELDS):
        raise CorruptSample(f"member info: {len(raw)} bytes, expected {4 * len(shards.INFO_FIELDS)} (+ checksums)")
    return np.frombuffer(raw, "<i4")


def _offsets(raw, pack_bytes: int, pack_ext: str) -> np.ndarray:
    """The offset table of a frame pack of ``pack_bytes``, checked (a corrupt table would cut
    wrong or short JPEGs, which may still decode)."""
    if len(raw) % 4 or len(raw) < 8:
        raise CorruptSample(f"offsets of {pack_ext}: {len(raw)} bytes is not a table of int32 offsets")
    offsets = np.frombuffer(raw, "<i4")
    if offsets[0] != 0 or int(offsets[-1]) != pack_bytes or np.any(np.diff(offsets) <= 0):
        raise CorruptSample(f"offsets of {pack_ext}: not a strictly increasing table from 0 to the pack's "
                            f"{pack_bytes} bytes")
    return offsets


# --- the two ways a pipeline's batches are made ------------------------------------------------


def listed_batches(slots: Sequence[Slot], batch_size: int) -> Callable[[int], list[Slot] | None]:
    """Iteration ``i`` reads ``slots[i * B:(i + 1) * B]`` (the training loader's listing,
    whole batches by construction); None past the end."""
    steps = -(-len(slots) // batch_size)

    def batches(i: int):
        return list(slots[i * batch_size:(i + 1) * batch_size]) if i < steps else None

    return batches


def sharded_batches(samples_per_shard: Sequence[int], rank: int, world_size: int, batch_size: int, *,
                    start_epoch: int = 0, epochs: int | None = 1) -> Callable[[int], list[Slot] | None]:
    """A sharded reader's iterations (val / test, tools): in epoch e rank ``rank`` reads part
    ``dali_planner.reader_part(rank, e, W)`` of the split's samples in shard order (part p =
    samples [n * p // W, n * (p + 1) // W)), in batches of B; every rank runs
    ``batches_per_epoch(n, W, B)`` iterations per epoch (a shorter part ends with short
    batches; an empty one repeats the part's last sample as padding, ``position`` -1).
    ``epochs`` epochs from ``start_epoch`` (None: endless). ``position`` = the sample's index
    in its part."""
    from dataloading.pipeline.dali_planner import batches_per_epoch, reader_part

    counts = [int(c) for c in samples_per_shard]
    n = sum(counts)
    first = np.cumsum([0, *counts])
    bpe = batches_per_epoch(n, world_size, batch_size)

    def slot_of(g: int, position: int) -> Slot:
        s = int(np.searchsorted(first, g, side="right") - 1)
        return Slot(s, g - int(first[s]), position)

    def batches(i: int):
        e, b = divmod(i, bpe)
        if epochs is not None and e >= epochs:
            return None
        part = reader_part(rank, start_epoch + e, world_size)
        lo, hi = n * part // world_size, n * (part + 1) // world_size
        begin, end = lo + b * batch_size, min(lo + (b + 1) * batch_size, hi)
        if begin < end:
            return [slot_of(g, g - lo) for g in range(begin, end)]
        return [slot_of(max(min(hi, n) - 1, 0), -1)]  # DALI rejects empty batches: one padding entry

    return batches


def sharded_source(tar_paths: Sequence[str], index_paths: Sequence[str], layout: str, spec: PipelineSpec, *,
                   shard_id: int = 0, num_shards: int = 1, start_epoch: int = 0, epochs: int | None = None,
                   decode_only: bool = False, samples_per_shard: Sequence[int] | None = None,
                   pool: ThreadPoolExecutor | None = None) -> SampleSource:
    """A source reading rank ``shard_id``'s part of the shards, every epoch from
    ``start_epoch`` on (``epochs`` None: endless), draws keyed by (seed, epoch, rank, batch)
    (`dali_planner.DrawSource`): what tools and tests build a pipeline on (`build_pipeline`).
    ``samples_per_shard``: the manifest's counts (default: read from the index files, once,
    when the source first runs)."""
    from dataloading.pipeline.dali_planner import DrawSource, batches_per_epoch

    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} not in [0, {num_shards})")
    if len(tar_paths) != len(index_paths) or not tar_paths:
        raise ValueError("need one index path per shard and at least one shard")
    index = ShardIndex(index_paths, index_members(spec, layout), samples_per_shard)
    state: dict = {}

    def setup():
        if not state:
            counts = samples_per_shard or [len(index.table(s).keys) for s in range(len(index_paths))]
            n = sum(counts)
            state["batches"] = sharded_batches(counts, shard_id, num_shards, spec.batch_size, start_epoch=start_epoch,
                                               epochs=epochs)
            state["draws"] = DrawSource(spec, shard_id, batches_per_epoch(n, num_shards, spec.batch_size), start_epoch)
        return state

    first = [Slot(0, 0, -1)]
    return SampleSource(spec, layout, ShardAccess(tar_paths), index, lambda i: setup()["batches"](i),
                        lambda i: setup()["draws"].draws(i), substitutes=first, drop_corrupt=spec.mode != "train",
                        pool=pool, test_views=wants_test_views(spec, decode_only),
                        whole_frames=spec.mode == "test" or decode_only)
