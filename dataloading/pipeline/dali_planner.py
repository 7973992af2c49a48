"""The per-sample plan as the DALI graph consumes it: the draws (`DrawSource`, `PositionDraws`)
and the planner (`SamplePlanner`) that turns a sample's info member and its draws into the
frame indices, crop box, flip, test-view anchors and the pack entries to read, then checks
and packages what was read for the graph (`dataloading.pipeline.source` runs it per sample on its
reading threads, before any byte of the frames is read: that is how only the sampled frames
are read).

All per-sample randomness comes from the draws, so a batch is reproducible and the reference
loader can replay it exactly: the training loader's draws are keyed by each sample's position
in the epoch's order (`PositionDraws`: seed, epoch, position; `dataloading.planning.order`), so they do
not depend on the world size; a sharded reader's (val / test, tools) by (seed, epoch, rank,
batch index) (`DrawSource`; val and test plans use no draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dataloading.format import shards
from dataloading.planning import augment, plan, sampling
from dataloading.planning.spec import PipelineSpec


def wants_test_views(spec: PipelineSpec, decode_only: bool = False) -> bool:
    """Whether the graph cuts the test views itself (test mode, resized in the graph): the
    source must then give their anchors (`SampleSource` ``test_views``)."""
    return not decode_only and spec.resolved_resize_backend == "dali" and spec.mode == "test"


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
    """The draws of a sharded reader's pipeline iteration ``i`` (`draws`).

    Pipeline iterations map to (epoch, batch) by ``batches_per_epoch`` because the sharded
    source (`dataloading.pipeline.source.sharded_batches`) runs every epoch for exactly that many
    iterations on every rank.
    """

    def __init__(self, spec: PipelineSpec, rank: int, batches_per_epoch: int, start_epoch: int = 0,
                 start_batch: int = 0):
        self.spec, self.rank, self.bpe = spec, rank, batches_per_epoch
        self.offset = start_epoch * batches_per_epoch + start_batch

    def position(self, iteration: int) -> tuple[int, int]:
        return divmod(self.offset + iteration, self.bpe)

    def draws(self, iteration: int) -> np.ndarray:
        """(B, K + 3) int64 draws of pipeline iteration ``iteration``."""
        epoch, batch = self.position(iteration)
        return sampling.batch_draws(self.spec.seed, epoch, self.rank, 0, batch, self.spec.batch_size,
                                    self.spec.num_segments)


class PositionDraws:
    """The draws of a reader that reads a listed sequence of samples in order (the training
    loader's): iteration ``i`` gets the draws of ``positions[i * B : (i + 1) * B]``
    (`sampling.sample_draws` for ``epoch``; -1, a padding entry, and iterations past the
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

    def draws(self, iteration: int) -> np.ndarray:
        """(B, K + 3) int64 draws of pipeline iteration ``iteration``."""
        return sampling.sample_draws(self.spec.seed, self.epoch, self.rows(iteration), self.spec.num_segments)


@dataclass(frozen=True)
class Planned:
    """One sample's plan for the graph: ``meta`` = the `SamplePlanner.META` arrays (+ the test
    view anchors), ``entries`` = the pack entries to read (frame-major; None: the whole member,
    video layout), ``rgb_indices`` = the RGB frames the graph computes flow from (flow computed
    in the graph, else None)."""

    meta: tuple
    entries: np.ndarray | None
    rgb_indices: np.ndarray | None = None


class SamplePlanner:
    """The per-sample plan the graph consumes: `plan.plan_sample` (the function the reference
    loader uses) on a sample's info member and its draws row.

    ``cut``: what is read of the sample's pack: 'rgb' (the F = K * frames_per_snippet sampled
    RGB JPEGs), 'flow' (2F: the x, y planes of each sampled flow frame), 'rgb_snippets' (flow
    computed in the graph from a frame pack: the L + 1 RGB JPEGs of each snippet), or None (the
    video layout: the whole video member, decoded in the graph).

    `plan` returns the `META` arrays: frame_indices (F,) int64, crop (5,) int64 = x, y, w, h,
    flip, anchor (2,) int32 = x, y, shape (2,) int32 = w, h, frame_size (2,) int64 = stored h,
    w; then, with ``test_views`` (test mode, graph resize), the anchor (2,) int32 of each
    unmirrored test view (their shape is the centre crop's, ``shape``). It costs ~0.1 ms of
    Python per sample.
    """

    CUTS = (None, "rgb", "flow", "rgb_snippets")
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
        self.num_jpegs = {None: 0, "rgb": self.frames, "flow": 2 * self.frames,
                          "rgb_snippets": spec.num_segments * (spec.snippet_length + 1)}[cut]
        # the frame pack the JPEGs are cut from (its offsets table and its checksums)
        self.pack_ext = spec.modality_row.shard_members[0] if cut == "flow" else ("frames" if cut else None)

    def plan(self, info: np.ndarray, draws: np.ndarray | None) -> Planned:
        """The plan of the sample whose info member is ``info`` (int32 words) for the draws row
        ``draws`` (`sampling.batch_draws` / `sample_draws`)."""
        h, w, n = int(info[shards.INFO_HEIGHT]), int(info[shards.INFO_WIDTH]), int(info[shards.INFO_NUM_FRAMES])
        p = plan.plan_sample(self.spec, n, h, w, draws)
        box = p.crop
        meta = [p.frame_indices, plan.crop_row(box), np.array([box.x, box.y], np.int32),
                np.array([box.width, box.height], np.int32), np.array([h, w], np.int64)]
        meta += [np.array([p.views[v].x, p.views[v].y], np.int32) for v in range(self.num_view_anchors)]
        indices = p.frame_indices
        rgb = None
        if self.cut == "rgb":
            entries = indices
        elif self.cut == "flow":  # a flow pack holds 2 entries per flow frame: x at 2i, y at 2i + 1
            entries = np.stack([2 * indices, 2 * indices + 1], 1).reshape(-1)
        else:
            entries = None
        if self.spec.dali_flow:  # snippet k's flow frame l is the flow from RGB frame s_k + l to s_k + l + 1
            K, L = self.spec.num_segments, self.spec.snippet_length
            starts = indices.reshape(K, L)[:, 0]
            rgb = np.minimum(starts[:, None] + np.arange(L + 1)[None, :], n - 1).reshape(-1)
            entries = rgb if self.cut == "rgb_snippets" else None
        return Planned(tuple(meta), entries, rgb)

    # --- checksums (issue 17): a small region; `shards.cut_checksum_problem` holds the logic ---
    verify_checksums = True  # False only to measure what the check costs

    def problem(self, info: np.ndarray, entries=(), jpegs=()) -> str | None:
        """Why the sample's info member (int32 words) or the JPEGs cut for it differ from the
        checksums recorded at pack time, or None. Only the bytes used are hashed: ~K*L JPEGs."""
        if not self.verify_checksums:
            return None
        return shards.cut_checksum_problem(info, self.pack_ext if self.cut else None, entries, jpegs)
