"""The torch half of augmentation (resize backend 'torch'): the DALI graph's per-sample uint8
frames -> mirrored, resized, normalised float32 batches, then TSN's snippet layout.

On CPU the graph stops after decoding each sample's crop (`dali_pipeline`): DALI's CPU resize
measured ~0.55 ms per 224x224 frame vs ~0.07 ms for torch's vectorised uint8 bilinear, and
stacking / padding / mirroring in the graph cost more of the DALI thread than the rest of it
but decoding. `TSNLoader` applies `finish_frames` then `to_snippets` to every batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from dataloading.planning import augment
from dataloading.planning.spec import PipelineSpec
from dataloading.sources import flow

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


def finish_frames(frames: Sequence[torch.Tensor | Sequence[torch.Tensor]], crop: torch.Tensor,
                  spec: PipelineSpec) -> torch.Tensor:
    """The 'torch' resize backend: the DALI graph's per-sample uint8 frames -> mirrored,
    resized, normalised float32.

    ``frames``: per sample, a (F, h, w, C) uint8 tensor or F (h, w, C) ones (C = 3 RGB or 2
    flow), each sample of its own size (`sample_frames`); train/val: the sample's crop,
    mirrored here when ``crop[b, 4]`` (the plan's flip; flow x already inverted by the graph);
    test: whole frames, cut into the V views of `augment.test_crops` here (10; 5 without flip;
    the mirrored flow views get `flow.flip_x`). Colour channels come out in ``spec.channel_order``
    (BGR: the decoded RGB reversed), normalised with ``spec.norm_mean_255`` / ``norm_std_255``.
    Returns (B, F, C, S, S) or (B, V, F, C, S, S), contiguous. Bilinear with antialiasing on
    uint8 (torch's vectorised path), mirrored after resizing (as the reference loader does).
    """
    import torch.nn.functional as F

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

    # BGR input (e.g. the authors' BN-Inception): the decoded RGB planes are written in reverse
    # order by the copy into the output, which costs nothing extra; reversing the (F, h, w, C)
    # crop first instead measured 1.4-1.9x the whole finishing time (torch.flip on a size-3 dim).
    order = range(C - 1, -1, -1) if spec.reverses_channels else None

    def resize_into(dst: torch.Tensor, v: torch.Tensor, mirror: bool) -> None:
        v = v.contiguous().permute(0, 3, 1, 2)  # (F, h, w, C) -> dense channels-last: torch's fast uint8 path
        if v.shape[-2:] != (S, S):
            v = F.interpolate(v, size=(S, S), mode="bilinear", antialias=True, align_corners=False)
        v = v.flip(-1) if mirror else v
        if order is None:
            dst.copy_(v)
        else:
            for c_out, c_in in enumerate(order):
                dst[:, c_out].copy_(v[:, c_in])

    for b in range(B):
        if spec.mode == "test":
            h, w = frames[b].shape[1:3]
            n = len(augment.TEST_CROP_POSITIONS)
            for i, c in enumerate(augment.test_crops(h, w, spec.crop)[:n]):
                resize_into(out[b, i], frames[b][:, c.y:c.y + c.height, c.x:c.x + c.width], False)
                if views > n:  # view i + n: view i mirrored
                    out[b, i + n].copy_(out[b, i].flip(-1))
                    if spec.is_flow:  # a mirrored flow field has its x component negated
                        out[b, i + n, :, 0] = flow.flip_x(out[b, i + n, :, 0])
        else:
            resize_into(out[b, 0], frames[b], bool(crop[b, 4]))
        out[b].sub_(mean).div_(std)
    return out if spec.mode == "test" else out[:, 0]


def sample_frames(batch: dict, names: Sequence[str]) -> list:
    """Per sample, its frames from the frame outputs ``names`` (`frame_output_names`) of a
    batch whose frame outputs are per-sample lists: the sample's (F, h, w, C) tensor from the
    one output ``frames``, else the list of its per-frame (h, w, C) tensors (a list of one
    for F = 1: the K = 1 baseline's single ``frame0`` is a frame, not a sample)."""
    if tuple(names) == ("frames",):
        return list(batch["frames"])
    return [list(f) for f in zip(*(batch[n] for n in names))]


def to_snippets(frames: torch.Tensor, spec: PipelineSpec) -> torch.Tensor:
    """(B, [V,] K*Lf, C, H, W) -> (B, [V,] K, L, C, H, W); rgb_diff takes differences."""
    lead = frames.shape[:-4]
    K, Lf = spec.num_segments, spec.frames_per_snippet  # flow: L flow frames of (x, y) planes
    x = frames.reshape(*lead, K, Lf, *frames.shape[-3:])
    if spec.modality_row.is_difference:
        x = x[..., 1:, :, :, :] - x[..., :-1, :, :, :]
    return x
