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

A sample whose members turn out corrupt at read time is quarantined: the loader finds it by
checking its shards in Python, drops it from a run-local copy of the DALI index files,
counts it (``skipped``), names it in a warning, and rebuilds the pipeline at the same
epoch and batch; nothing else is lost.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataloading import shards
from dataloading.dali_pipeline import PipelineSpec, build_pipeline, frame_output_names, output_names

log = logging.getLogger(__name__)

_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """Let glibc reuse freed batch buffers instead of returning them to the OS.

    A batch of 8 x 8 frames at 224 px is 38 MB; glibc maps blocks over 32 MB freshly (and
    trims freed heap tops), so every batch paid ~12 ms of page faults here, more than
    resizing it. Raising the mmap threshold and the trim threshold to 1 GB made allocating +
    filling it 0.85 ms instead of 15 ms. The mmap threshold is 512 MB because an rgb_diff
    batch (8 x 18 frames) is 87 MB: at 64 MB its finishing took 68 ms a batch, at 512 MB 41.
    Blocks above it (test-mode batches of 10 views x 25 segments) are still mapped freshly.
    Process-wide, once; no-op off glibc. In a non-main thread (Ray Train's loop) glibc's
    per-thread arenas map blocks over 64 MB freshly whatever the threshold.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 512 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        log.debug("not glibc: malloc thresholds left as they are")


@dataclass
class Batch:
    frames: torch.Tensor  # (B, K, L, C, H, W) or (B, V, K, L, C, H, W)
    label: torch.Tensor  # (B,) int64
    sample_index: torch.Tensor  # (B,) int64, unique per sample within a split
    frame_indices: torch.Tensor  # (B, K * frames_per_snippet) int64
    crop: torch.Tensor  # (B, 5) int64: x, y, w, h, flip (in stored-frame pixels)
    frame_size: torch.Tensor  # (B, 2) int64: stored frame height, width


def finish_frames(frames: Sequence[torch.Tensor | Sequence[torch.Tensor]], crop: torch.Tensor,
                  spec: PipelineSpec) -> torch.Tensor:
    """The 'torch' resize backend: the DALI graph's per-sample uint8 frames -> mirrored,
    resized, normalised float32.

    ``frames``: per sample, a (F, h, w, C) uint8 tensor or F (h, w, C) ones (C = 3 RGB or 2
    flow), each sample of its own size (`sample_frames`); train/val: the sample's crop,
    mirrored here when ``crop[b, 4]`` (flow x already inverted by the graph); test: whole
    frames, cut into the V views of `augment.test_crops` here (10; 5 without flip; the
    flipped flow views get x -> 255 - x). Returns (B, F, C, S, S) or (B, V, F, C, S, S),
    contiguous. Bilinear with antialiasing on uint8 (torch's vectorised path), mirrored
    after resizing (as the reference loader does).
    """
    import torch.nn.functional as F

    from dataloading import augment

    S = spec.crop.input_size
    frames = [f if isinstance(f, torch.Tensor) else torch.stack(list(f)) for f in frames]
    B = len(frames)
    F_, C = frames[0].shape[0], frames[0].shape[-1]
    views = spec.num_views
    # One preallocated channels-first output filled in place. Measured per batch of 8 x 8
    # frames: stacking per-sample results or normalising interleaved (HWC) floats cost more
    # than the resize itself; planar normalisation is ~5x faster than interleaved, and
    # normalising each sample right after writing it (still in cache) 10 -> 6.4 ms.
    out = torch.empty((B, views, F_, C, S, S), dtype=torch.float32)
    mean = torch.tensor(spec.norm_mean_255, dtype=torch.float32).view(C, 1, 1)
    std = torch.tensor(spec.norm_std_255, dtype=torch.float32).view(C, 1, 1)

    def resize_into(dst: torch.Tensor, v: torch.Tensor, mirror: bool) -> None:
        v = v.contiguous().permute(0, 3, 1, 2)  # (F, h, w, C) -> dense channels-last: torch's fast uint8 path
        if v.shape[-2:] != (S, S):
            v = F.interpolate(v, size=(S, S), mode="bilinear", antialias=True, align_corners=False)
        dst.copy_(v.flip(-1) if mirror else v)

    for b in range(B):
        if spec.mode == "test":
            h, w = frames[b].shape[1:3]
            n = len(augment.TEST_CROP_POSITIONS)
            for i, c in enumerate(augment.test_crops(h, w, spec.crop)[:n]):
                resize_into(out[b, i], frames[b][:, c.y:c.y + c.height, c.x:c.x + c.width], False)
                if views > n:
                    out[b, i + n].copy_(out[b, i].flip(-1))
                    if spec.is_flow:  # a mirrored flow field has its x component negated
                        out[b, i + n, :, 0].mul_(-1).add_(255.0)
        else:
            resize_into(out[b, 0], frames[b], bool(crop[b, 4]))
        out[b].sub_(mean).div_(std)
    return out if spec.mode == "test" else out[:, 0]


def sample_frames(batch: dict, names: Sequence[str]) -> list:
    """Per sample, its frames from the frame outputs ``names`` (`frame_output_names`) of a
    batch whose frame outputs are per-sample lists: one tensor if there is one output, else
    the list of the sample's per-frame tensors."""
    if len(names) == 1:
        return list(batch[names[0]])
    return [list(f) for f in zip(*(batch[n] for n in names))]


def pipeline_outputs(outputs, spec: PipelineSpec, layout: str, decode_only: bool = False) -> dict:
    """One iteration of a pipeline (``pipe.run()``'s outputs) by name, copied into torch:
    ``frames`` = per sample its (F, h, w, C) uint8 frames (resize backend 'torch', or
    ``decode_only``) or the dense batch tensor (backend 'dali'); the `META_NAMES` outputs
    as batch tensors. For tests and tools; `TSNLoader` streams without these copies."""
    from dataloading.dali_pipeline import META_NAMES

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


def to_snippets(frames: torch.Tensor, spec: PipelineSpec) -> torch.Tensor:
    """(B, [V,] K*Lf, C, H, W) -> (B, [V,] K, L, C, H, W); rgb_diff takes differences."""
    lead = frames.shape[:-4]
    K, Lf = spec.num_segments, spec.frames_per_snippet  # flow: L flow frames of (x, y) planes
    x = frames.reshape(*lead, K, Lf, *frames.shape[-3:])
    if spec.modality == "rgb_diff":
        x = x[..., 1:, :, :, :] - x[..., :-1, :, :, :]
    return x


def check_sample(sample, layout: str, modality: str = "rgb") -> str | None:
    """Why a raw sample (`reference.RawSample`) is unusable for ``modality``, or None when it reads."""
    from tools import reference

    try:
        info = shards.decode_info(sample.members["info"])
        n = info["num_frames"]
        if modality in shards.FLOW_MODALITIES:
            frames_ext, offsets_ext = shards.flow_members(modality)
            offsets = shards.decode_offsets(sample.members[offsets_ext])
            if len(offsets) != 2 * (n - 1) + 1 or offsets[-1] != len(sample.members[frames_ext]):
                return f"{modality} offset table does not match its frame pack"
            reference.decode_flow(sample, modality, np.arange(n - 1))
            return None
        if layout == shards.LAYOUT_JPEG:
            offsets = shards.decode_offsets(sample.members["offsets"])
            if len(offsets) != n + 1 or offsets[-1] != len(sample.members["frames"]):
                return "offset table does not match the frame pack"
        reference.decode_frames(sample, layout, np.arange(n))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


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


class TSNLoader:
    """One rank's batches of one split. ``len(loader)`` = batches per epoch (equal on all ranks)."""

    def __init__(self, dataset_dir: str | Path, split: str, spec: PipelineSpec, *, rank: int = 0,
                 world_size: int = 1, device_id: int | None = None, start_epoch: int = 0,
                 start_batch: int = 0):
        manifest = shards.load_manifest(dataset_dir)
        keep_freed_memory()
        self.layout = manifest["layout"]
        shards.require_modality(dataset_dir, manifest, spec.stored_modality)
        if self.layout == shards.LAYOUT_VIDEO and spec.device == "cpu" and not spec.is_flow \
                and manifest["codec"] not in shards.CPU_DECODABLE_VIDEO_CODECS:
            raise ValueError(f"{dataset_dir}: codec {manifest['codec']!r} decodes only on GPU (DALI 'mixed' "
                             f"backend); repack with --codec jpeg, vp9 or mjpeg for CPU training")
        self.tar_paths, self.index_paths, self.num_samples = shards.split_shards(dataset_dir, split)
        self.spec, self.rank, self.world_size, self.device_id = spec, rank, world_size, device_id
        per_rank = -(-self.num_samples // world_size)  # DALI pads every rank's part to the largest
        if spec.mode == "train" and per_rank < spec.batch_size:
            raise ValueError(
                f"{dataset_dir}: split {split!r} has {self.num_samples} videos, {per_rank} "
                f"per rank over {world_size} rank(s): not one full batch of {spec.batch_size} (training drops "
                f"incomplete batches); lower train.batch_size_per_worker or cluster.num_workers")
        self.epoch = start_epoch
        self.batch = start_batch  # batches of `epoch` already delivered
        self.skipped: list[dict] = []
        self._quarantine_dir: tempfile.TemporaryDirectory | None = None
        self._start(start_epoch, start_batch)

    def _start(self, epoch: int, skip_batches: int) -> None:
        """(Re)build the pipeline at ``epoch`` and skip batches already delivered; quarantine
        corrupt samples met on the way (building already prefetches batches)."""
        while True:
            try:
                self._build(epoch, skip_batches)
                return
            except RuntimeError as e:
                if not self._quarantine(e):
                    raise

    def _build(self, epoch: int, batch: int) -> None:
        """A fresh pipeline for ``epoch`` (see `build_pipeline`: its data order depends only on
        seed, epoch and rank), advanced past the ``batch`` batches already delivered."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._it = self.pipe = None  # release the previous epoch's pipeline first
        self.pipe = build_pipeline(
            self.tar_paths, self.index_paths, self.layout, self.spec, shard_id=self.rank,
            num_shards=self.world_size, num_samples=self.num_samples, device_id=self.device_id,
            start_epoch=epoch)
        policy = LastBatchPolicy.DROP if self.spec.mode == "train" else LastBatchPolicy.PARTIAL
        names = list(output_names(self.spec, self.layout))
        self._frame_names = frame_output_names(self.spec, self.layout)
        if self.spec.resolved_resize_backend == "torch":  # CPU: frames handed over per sample
            self._it = _iterator_class()(self.pipe, names, reader_name="reader", last_batch_policy=policy,
                                         auto_reset=False, prepare_first_batch=False, ragged=self._frame_names)
        else:  # the graph resized: one dense batch tensor (on the GPU in production)
            self._it = DALIGenericIterator(self.pipe, names, reader_name="reader", last_batch_policy=policy,
                                           auto_reset=False)
        self._it_epoch = epoch
        for _ in range(batch):
            next(self._it)

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return len(self._it)

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batches of it delivered): pass as start_epoch/start_batch to resume here."""
        return self.epoch, self.batch

    def __iter__(self):
        """The rest of the current epoch; the next pass is the next epoch."""
        if self._it_epoch != self.epoch:
            self._start(self.epoch, self.batch)
        while True:
            try:
                out = next(self._it)[0]
            except StopIteration:
                self.epoch, self.batch = self.epoch + 1, 0
                return
            except RuntimeError as e:
                if not self._quarantine(e):
                    raise
                self._start(self.epoch, self.batch)
                continue
            self.batch += 1
            if self.spec.resolved_resize_backend == "torch":
                frames = finish_frames(sample_frames(out, self._frame_names), out["crop"], self.spec)
            else:
                frames = out["frames"]
            yield Batch(frames=to_snippets(frames, self.spec), label=out["label"].reshape(-1).long(),
                        sample_index=out["sample_index"].reshape(-1).long(),
                        frame_indices=out["frame_indices"].long(), crop=out["crop"].long(),
                        frame_size=out["frame_size"].long())

    def _quarantine(self, error: Exception) -> bool:
        """Find corrupt samples in this rank's shards and drop them from run-local indices."""
        from tools import reference

        bad = []
        for tar in self.tar_paths:
            try:
                for sample in reference.iter_shard(tar):
                    reason = check_sample(sample, self.layout, self.spec.stored_modality)
                    if reason:
                        bad.append({"shard": tar, "key": sample.key, "reason": reason})
            except Exception as e:  # unreadable tar structure: nothing we can cut out
                log.error("shard %s is unreadable: %s", tar, e)
                return False
        known = {(b["shard"], b["key"]) for b in self.skipped}
        new = [b for b in bad if (b["shard"], b["key"]) not in known]
        if not new:
            log.error("DALI pipeline failed and no corrupt sample was found: %s", error)
            return False
        if self._quarantine_dir is None:
            self._quarantine_dir = tempfile.TemporaryDirectory(prefix="tsn-quarantine-")
        drop = {(b["shard"], b["key"]) for b in bad}
        new_tars, new_idx = [], []
        for i, (tar, idx) in enumerate(zip(self.tar_paths, self.index_paths)):
            lines = Path(idx).read_text().splitlines()
            kept = [ln for ln in lines[1:] if (tar, shards.split_member_name(ln.split()[3])[0]) not in drop]
            if not kept:  # DALI rejects empty indices: leave the shard out
                continue
            out = Path(self._quarantine_dir.name) / f"{i:06d}.idx"
            out.write_text("\n".join([f"{shards.DALI_INDEX_VERSION} {len(kept)}", *kept]) + "\n")
            new_tars.append(tar)
            new_idx.append(str(out))
        if not new_tars:
            raise ValueError(f"every sample of this rank's shards is corrupt: {self.tar_paths}")
        self.tar_paths, self.index_paths = new_tars, new_idx
        self.num_samples -= len(new)
        for b in new:
            log.warning("skipping corrupt sample %s in %s: %s", b["key"], b["shard"], b["reason"])
        self.skipped.extend(new)
        return True


def pipeline_spec(cfg, mode: str, batch_size: int | None = None) -> PipelineSpec:
    """Wire the config's data sections into a PipelineSpec (the one place that reads them)."""
    from dataloading.augment import CropSpec

    a, m = cfg.augment, cfg.model
    crop = CropSpec(input_size=a.input_size, scales=a.scales, max_distort=a.max_distort,
                    more_fix_crop=a.more_fix_crop, resize_short=a.resize_short, flip=a.flip)
    modality = m.modality
    return PipelineSpec(
        mode=mode, num_segments=m.test_segments if mode == "test" else m.num_segments,
        snippet_length=m.snippet_length, modality=modality,
        batch_size=batch_size or cfg.train.batch_size_per_worker, crop=crop,
        mean=tuple(a.mean), std=tuple(a.std), device=cfg.loader.device, num_threads=cfg.loader.num_threads,
        seed=cfg.run.seed, shuffle_buffer=cfg.loader.shuffle_buffer,
        prefetch_queue_depth=cfg.loader.prefetch_queue_depth, flow_source=cfg.loader.flow_source)
