"""The DALI graph's side of the per-sample plan: the draws fed into the graph (`DrawSource`)
and the one Python operator that turns (info, draws, pack) into each sample's plan
(`SamplePlanner`, calling `plan.plan_sample`).

All per-sample randomness comes from the draws, so a batch is reproducible and the reference
loader can replay it exactly: the training loader's draws are keyed by each sample's position
in the epoch's order (`PositionDraws`: seed, epoch, position; `dataloading.order`), so they do
not depend on the world size; a sharded reader's (val / test, tools) by (seed, epoch, rank,
batch index) (`DrawSource`; val and test plans use no draws).
"""

from __future__ import annotations

import math

import numpy as np

from dataloading import augment, plan, sampling, shards
from dataloading.spec import PipelineSpec


def reader_part(rank: int, epoch: int, world_size: int) -> int:
    """Which of the ``world_size`` equal parts of the data the reader of ``rank`` reads in
    ``epoch``: rotated by one per epoch (as DALI's stick_to_shard=False would), so every rank
    sees all the data over the epochs. The pipeline and the shard cache both use it."""
    return (rank + epoch) % world_size


def batches_per_epoch(num_samples: int, num_shards: int, batch_size: int) -> int:
    """Pipeline iterations per epoch for every rank: DALI pads each rank's part to the largest
    part, ``ceil(num_samples / num_shards)``, so all ranks run the same number of batches."""
    return math.ceil(math.ceil(num_samples / num_shards) / batch_size)


class DrawSource:
    """external_source callback: the draws of pipeline iteration ``i``.

    Pipeline iterations map to (epoch, batch) by ``batches_per_epoch`` because the reader
    pads every epoch to exactly that many iterations, whatever is prefetched.
    """

    def __init__(self, spec: PipelineSpec, rank: int, batches_per_epoch: int, start_epoch: int = 0,
                 start_batch: int = 0):
        self.spec, self.rank, self.bpe = spec, rank, batches_per_epoch
        self.offset = start_epoch * batches_per_epoch + start_batch

    def position(self, iteration: int) -> tuple[int, int]:
        return divmod(self.offset + iteration, self.bpe)

    def __call__(self, batch_info):
        epoch, batch = self.position(batch_info.iteration)
        return sampling.batch_draws(self.spec.seed, epoch, self.rank, 0, batch, self.spec.batch_size,
                                    self.spec.num_segments)


class PositionDraws:
    """external_source callback of a reader that reads a listed sequence of samples in order
    (the training loader's): iteration ``i`` gets the draws of ``positions[i * B : (i + 1) *
    B]`` (`sampling.sample_draws` for ``epoch``; -1, a padding entry, and iterations past the
    list's end get rows of zeros)."""

    def __init__(self, spec: PipelineSpec, epoch: int, positions):
        self.spec, self.epoch = spec, epoch
        self.positions = np.asarray(positions, np.int64)

    def rows(self, iteration: int) -> np.ndarray:
        """The positions of pipeline iteration ``iteration``, (B,) int64, -1 where none."""
        B = self.spec.batch_size
        out = np.full(B, -1, np.int64)
        part = self.positions[iteration * B:(iteration + 1) * B]
        out[:len(part)] = part
        return out

    def __call__(self, batch_info):
        return sampling.sample_draws(self.spec.seed, self.epoch, self.rows(batch_info.iteration),
                                     self.spec.num_segments)


class SamplePlanner:
    """The per-sample plan of a batch, computed inside the graph by one `fn.python_function`
    (batch processing): `plan.plan_sample` on each sample's info and draws (the function the
    reference loader uses) and, for frame packs, the sampled frames' JPEG bytes cut out of the
    pack.

    One Python operator replaces the ~400 scalar DALI operators (subscripts, arithmetic, one
    slice per frame) that computing the same per sample and frame in the graph takes: each DALI
    operator costs tens of microseconds per batch on a CPU thread, and the plan went from ~10 to
    ~2 ms of the DALI thread per batch of 8 x 8 frames (the graph 26 -> 18 ms per batch for
    K=8, L=1, 45 -> 34 ms for K=3, L=5 rgb_diff). It holds the GIL for ~1 ms per batch.

    Call with (infos, draws, *pack) as lists of per-sample numpy arrays: ``info`` int32
    (`shards.INFO_FIELDS`), ``draws`` int64 (K + 3,), and ``pack`` = (blob uint8, offsets
    int32) when ``cut`` is 'rgb' (F JPEGs: frames) or 'flow' (2F: x, y plane of each flow
    frame), nothing when ``cut`` is None. Returns per-sample lists of the `META` outputs:
    frame_indices (F,) int64, crop (5,) int64 = x, y, w, h, flip, anchor (2,) int32 = x, y,
    shape (2,) int32 = w, h, frame_size (2,) int64 = stored h, w; then, with ``test_views``
    (test mode), the anchor (2,) int32 = x, y of each unmirrored test view (their shape is the
    centre crop's, ``shape``); then the ``num_jpegs`` JPEG byte strings (uint8), frame-major
    (F = K * frames_per_snippet).
    """

    CUTS = (None, "rgb", "flow")
    META = ("frame_indices", "crop", "anchor", "shape", "frame_size")
    NUM_META = len(META)

    def __init__(self, spec: PipelineSpec, cut: str | None, test_views: bool = False):
        if cut not in self.CUTS:
            raise ValueError(f"cut must be one of {self.CUTS}, got {cut!r}")
        if test_views and spec.mode != "test":
            raise ValueError(f"test_views needs mode 'test', got {spec.mode!r}")
        self.spec, self.cut = spec, cut
        self.frames = spec.num_segments * spec.frames_per_snippet
        # only the unmirrored views: the mirrored ones are the same crops, mirrored by the graph
        self.num_view_anchors = len(augment.TEST_CROP_POSITIONS) if test_views else 0
        self.num_jpegs = {None: 0, "rgb": self.frames, "flow": 2 * self.frames}[cut]
        self.num_outputs = self.NUM_META + self.num_view_anchors + self.num_jpegs
        # checksums: the frame pack the cut JPEGs come from (`_verify`)
        self.pack_ext = spec.modality_row.shard_members[0] if cut == "flow" else ("frames" if cut else None)

    def __call__(self, infos, draws, *pack):
        B = len(infos)
        out = [[None] * B for _ in range(self.num_outputs)]
        jpeg0 = self.NUM_META + self.num_view_anchors
        for b in range(B):
            info = infos[b]
            h, w = int(info[shards.INFO_HEIGHT]), int(info[shards.INFO_WIDTH])
            p = plan.plan_sample(self.spec, int(info[shards.INFO_NUM_FRAMES]), h, w, draws[b])
            box = p.crop
            out[0][b] = p.frame_indices
            out[1][b] = plan.crop_row(box)
            out[2][b] = np.array([box.x, box.y], np.int32)
            out[3][b] = np.array([box.width, box.height], np.int32)
            out[4][b] = np.array([h, w], np.int64)
            for v in range(self.num_view_anchors):
                out[self.NUM_META + v][b] = np.array([p.views[v].x, p.views[v].y], np.int32)
            if self.cut is None:
                self._verify(info)
                continue
            indices = p.frame_indices
            # a flow pack holds 2 entries per flow frame: x plane at 2i, y plane at 2i + 1
            entries = indices if self.cut == "rgb" else np.stack([2 * indices, 2 * indices + 1], 1).reshape(-1)
            for j, e in enumerate(entries):
                out[jpeg0 + j][b] = shards.frame_from_pack(pack[0][b], pack[1][b], e)
            self._verify(info, entries, [out[jpeg0 + j][b] for j in range(len(entries))])
        return tuple(out)

    # --- checksums (issue 17): a small region; `shards.cut_checksum_problem` holds the logic ---
    verify_checksums = True  # False only to measure what the check costs

    def _verify(self, info, entries=(), jpegs=()) -> None:
        """Raise `shards.ChecksumError` naming the sample when its info member or the JPEGs cut
        for it differ from the checksums recorded at pack time (the loader then finds it with
        `quarantine`, skips and counts it). Only the bytes used are hashed: ~K*L JPEGs."""
        if not self.verify_checksums:
            return
        problem = shards.cut_checksum_problem(info, self.pack_ext, entries, jpegs)
        if problem:
            key = f"{int(info[shards.INFO_SAMPLE_INDEX]):08d}"
            raise shards.ChecksumError(f"corrupt sample {key} (sample_index as read): {problem}")

    def node(self, fn, info, draws, *pack) -> list:
        """The plan's DataNodes: this planner as one batch-processing `fn.python_function`."""
        return fn.python_function(info, draws, *pack, function=self, num_outputs=self.num_outputs,
                                  batch_processing=True)
