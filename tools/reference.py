"""Plain-Python reference loader: the correctness oracle for the DALI pipeline and the
baseline of `tsn bench-loader`.

Same shards, same draws, same per-sample plan (`dataloading.planning.plan.plan_sample`: frame indices,
crop, flip, test views), decoded with its own code, OpenCV (JPEG frame packs) or PyAV (video
layout), augmented with numpy/OpenCV. Corrupt samples are skipped and counted
(``Loader.skipped``) with a message naming the shard and key.

Flow modalities: sampling over the ``num_frames - 1`` flow frames, the x and y planes of each
sampled flow frame decoded as grayscale JPEGs into (H, W, 2); on a flipped view the x plane of
the crop becomes `flow.flip_x` of it (``255 - x``) before resizing (as the DALI graph does),
then the image is mirrored; normalisation with `PipelineSpec.norm_mean_255` / ``norm_std_255``.
"""

from __future__ import annotations

import io
import logging
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from dataloading import modality
from dataloading.format import shards
from dataloading.planning import augment, order, plan, sampling
from dataloading.planning.spec import PipelineSpec
from dataloading.sources import flow

log = logging.getLogger(__name__)


@dataclass
class RawSample:
    """The tar members of one sample, as read from a shard."""

    shard: str
    key: str
    members: dict[str, bytes]


def iter_shard(tar_path: str):
    """Yield RawSample for each sample of a shard, in tar order."""
    with tarfile.open(tar_path, "r:") as tar:
        current, members = None, {}
        for m in tar:
            if not m.isfile():
                continue
            key, ext = shards.split_member_name(m.name)
            if key != current and current is not None:
                yield RawSample(tar_path, current, members)
                members = {}
            current = key
            members[ext] = tar.extractfile(m).read()
        if current is not None:
            yield RawSample(tar_path, current, members)


def decode_frames(sample: RawSample, layout: str, indices: np.ndarray) -> list[np.ndarray]:
    """RGB uint8 (H, W, 3) frames at ``indices`` (any order, repeats allowed)."""
    if layout == shards.LAYOUT_JPEG:
        offsets = shards.decode_offsets(sample.members["offsets"])
        blob = memoryview(sample.members["frames"])
        out = []
        for i in indices:
            raw = np.frombuffer(shards.frame_from_pack(blob, offsets, int(i)), np.uint8)
            bgr = cv2.imdecode(raw, cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"frame {int(i)} does not decode as JPEG")
            out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        return out
    import av

    wanted = set(int(i) for i in indices)
    last = max(wanted)
    got: dict[int, np.ndarray] = {}
    # Decode sequentially from the start (no seeking): exact frame numbering even for
    # open-GOP or oddly timestamped streams.
    with av.open(io.BytesIO(sample.members["video"])) as container:
        for n, frame in enumerate(container.decode(video=0)):
            if n in wanted:
                got[n] = frame.to_ndarray(format="rgb24")
            if n >= last:
                break
    missing = wanted - set(got)
    if missing:
        raise ValueError(f"video has no frames {sorted(missing)[:5]}")
    return [got[int(i)] for i in indices]


def decode_flow(sample: RawSample, modality_name: str, indices: np.ndarray) -> list[np.ndarray]:
    """Quantised flow uint8 (H, W, 2) (x, y) of flow frames ``indices`` (0-based, any order)."""
    frames_ext, offsets_ext = modality.get(modality_name).shard_members
    offsets = shards.decode_offsets(sample.members[offsets_ext])
    blob = memoryview(sample.members[frames_ext])
    out = []
    for i in indices:
        planes = []
        for j in (2 * int(i), 2 * int(i) + 1):
            raw = np.frombuffer(shards.frame_from_pack(blob, offsets, j), np.uint8)
            img = cv2.imdecode(raw, cv2.IMREAD_GRAYSCALE)
            if img is None:
                raise ValueError(f"{modality_name} plane {j} (flow frame {int(i)}) does not decode as JPEG")
            planes.append(img)
        out.append(np.stack(planes, axis=2))
    return out


def augment_frames(frames: list[np.ndarray], box: augment.CropBox, spec: PipelineSpec) -> np.ndarray:
    """Crop, (flow: invert x on a flipped view,) resize to input size, flip, normalise:
    (F, C, S, S) float32 from (H, W, C) uint8 frames."""
    s = spec.crop.input_size
    mean = np.asarray(spec.norm_mean_255, np.float32)
    std = np.asarray(spec.norm_std_255, np.float32)
    out = np.empty((len(frames), spec.channels, s, s), np.float32)
    for f, img in enumerate(frames):
        crop = img[box.y : box.y + box.height, box.x : box.x + box.width]
        if box.flip and spec.is_flow:
            crop = crop.copy()
            crop[..., 0] = flow.flip_x(crop[..., 0])
        interp = cv2.INTER_AREA if crop.shape[0] > s or crop.shape[1] > s else cv2.INTER_LINEAR
        crop = cv2.resize(crop, (s, s), interpolation=interp)
        if box.flip:
            crop = crop[:, ::-1]
        if spec.reverses_channels:  # BGR input (spec.channel_order)
            crop = crop[..., ::-1]
        out[f] = ((crop.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    return out


def load_sample(sample: RawSample, layout: str, spec: PipelineSpec, draws: np.ndarray | None):
    """One sample as the DALI pipeline would produce it with the same draws row.

    Returns (frames, label, sample_index, frame_indices, crop) with the shapes of
    `dali_pipeline.build_pipeline`'s outputs; ``crop`` = (x, y, w, h, flip).
    """
    info = shards.decode_info(sample.members["info"])
    p = plan.plan_sample(spec, info["num_frames"], info["height"], info["width"], draws)
    if spec.is_flow:  # L consecutive flow frames among the N - 1
        decoded = decode_flow(sample, spec.modality, p.frame_indices)
    else:
        decoded = decode_frames(sample, layout, p.frame_indices)
    if spec.mode == "test":
        frames = np.stack([augment_frames(decoded, view, spec) for view in p.views])
    else:
        frames = augment_frames(decoded, p.crop, spec)
    return frames, info["label"], info["sample_index"], p.frame_indices, plan.crop_row(p.crop)


class Loader:
    """Iterate batches of one rank's share of the shards, like the DALI pipeline.

    Rank ``shard_id`` of ``num_shards`` takes the contiguous block of samples DALI gives it
    in ``epoch`` (block ``(rank + epoch) % S``: samples [floor(b*N/S), floor((b+1)*N/S)) in
    shard order), in order (no shuffling: the oracle must be predictable). Batches of ``spec.batch_size``; the last one may be short.
    ``threads`` decode samples of a batch concurrently (OpenCV releases the GIL).
    """

    def __init__(self, tar_paths: list[str], layout: str, spec: PipelineSpec, shard_id: int = 0,
                 num_shards: int = 1, threads: int = 1, epoch: int = 0):
        self.tar_paths, self.layout, self.spec = list(tar_paths), layout, spec
        self.shard_id, self.num_shards, self.epoch = shard_id, num_shards, epoch
        self.threads = threads
        self.skipped: list[tuple[str, str, str]] = []  # (shard, key, reason)

    def _samples(self):
        total = sum(1 for p in self.tar_paths for _ in iter_shard(p)) if self.num_shards > 1 else None
        lo = hi = None
        if total is not None:
            block = (self.shard_id + self.epoch) % self.num_shards
            lo, hi = block * total // self.num_shards, (block + 1) * total // self.num_shards
        i = 0
        for p in self.tar_paths:
            for s in iter_shard(p):
                if lo is None or lo <= i < hi:
                    yield s
                i += 1

    def _load(self, args):
        sample, draws = args
        try:
            return load_sample(sample, self.layout, self.spec, draws)
        except Exception as e:  # a corrupt member must not stop the epoch
            reason = f"{type(e).__name__}: {e}"
            log.warning("skipping corrupt sample %s in %s: %s", sample.key, sample.shard, reason)
            self.skipped.append((sample.shard, sample.key, reason))
            return None

    def __iter__(self):
        spec = self.spec
        pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        batch, b = [], 0
        try:
            for sample in self._samples():
                batch.append(sample)
                if len(batch) == spec.batch_size:
                    out = self._emit(batch, b, pool)
                    if out is not None:
                        yield out
                    batch, b = [], b + 1
            if batch:
                out = self._emit(batch, b, pool)
                if out is not None:
                    yield out
        finally:
            if pool:
                pool.shutdown()

    def _emit(self, batch, b, pool):
        draws = sampling.batch_draws(self.spec.seed, self.epoch, self.shard_id, 0, b, self.spec.batch_size,
                                     self.spec.num_segments)
        return self._collect(list(zip(batch, draws)), pool)

    def _collect(self, jobs, pool):
        """(sample, draws row) pairs -> one batch dict, corrupt samples left out (None: all were)."""
        results = list(pool.map(self._load, jobs)) if pool else [self._load(j) for j in jobs]
        results = [r for r in results if r is not None]
        if not results:
            return None
        frames, labels, sidx, idx, crops = zip(*results)
        return {"frames": np.stack(frames), "label": np.array(labels), "sample_index": np.array(sidx),
                "frame_indices": np.stack(idx), "crop": np.stack(crops)}


class OrderedLoader(Loader):
    """The training loader's data path replayed: the samples at ``positions`` of epoch
    ``epoch``'s order (`dataloading.planning.order.epoch_order` of the split's shards, seeded by
    ``spec.seed``), in that order, in batches of ``spec.batch_size`` (the last may be short),
    each with the draws of its position (`sampling.sample_draws`), as `TSNLoader` reads a
    rank's chunk. ``tar_paths``: the split's shards in manifest order (sample ``i`` of a shard
    = the i-th sample in tar order = line i of its index)."""

    def __init__(self, tar_paths: list[str], layout: str, spec: PipelineSpec, positions, *, epoch: int = 0,
                 threads: int = 1):
        super().__init__(tar_paths, layout, spec, threads=threads, epoch=epoch)
        self.positions = [int(p) for p in positions]
        self._shards = [list(iter_shard(t)) for t in self.tar_paths]
        self.order = order.epoch_order([len(s) for s in self._shards], spec.seed, epoch, spec.order_shard_block)

    def __iter__(self):
        pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        B = self.spec.batch_size
        try:
            for b in range(0, len(self.positions), B):
                chunk = self.positions[b:b + B]
                samples = [self._shards[int(self.order.shard[p])][int(self.order.sample[p])] for p in chunk]
                draws = sampling.sample_draws(self.spec.seed, self.epoch, chunk, self.spec.num_segments)
                out = self._collect(list(zip(samples, draws)), pool)
                if out is not None:
                    yield out
        finally:
            if pool:
                pool.shutdown()
