"""The DALI pipeline: packed shards -> TSN batches (decode + augment in DALI).

Graph, per sample::

    readers.webdataset (sharded by rank, shuffled)  -> info, payload
    external_source (draws from `sampling.batch_draws`) -> segment + augmentation draws
    python_function (`SamplePlanner`: `sampling` / `augment` on info + draws, once per batch)
        -> K*L frame indices, crop box, flip, the sampled frames' JPEG bytes
    jpeg layout : decode only the crop of each sampled JPEG
                  (`decoders.image_slice`, libjpeg-turbo on CPU / nvJPEG with device 'gpu')
    video layout: `decoders.video(frames=indices)` then slice the crop
    flow / warped_flow (any layout): the same on the modality's grayscale frame pack, two
                  JPEGs (x, y) per sampled flow frame, concatenated to C = 2 channels; on a
                  flipped sample the x plane becomes 255 - x (TSN.md section 3)
    resize backend 'dali' (GPU): -> stack (F, h, w, C) -> resize to input size -> flip +
                  normalise (F, C, H, W) float32
    resize backend 'torch' (CPU): one output per sampled frame, (h, w, C) uint8 of each
                  sample's own size; `loader.finish_frames` stacks, mirrors, resizes and
                  normalises them outside the graph (faster than DALI's CPU operators)

With ``flow_source='dali'`` (GPU only) the flow modality is computed on the fly instead of
read from the shards: the snippet's L + 1 consecutive RGB frames are decoded whole (nvJPEG /
NVDEC), `fn.optical_flow` (NVIDIA optical-flow hardware) computes their L flow fields on a
4-pixel grid, which are upsampled to the frame size, clipped to +-`FLOW_BOUND_PX` and quantised
like the packed flow (`dataloading.flow.quantize`), then cropped, flipped and normalised as
above. Warped flow has no DALI twin (no homography estimation in the graph): packed only.

Flow modalities sample among the ``num_frames - 1`` stored flow frames with the same
`sampling` functions (snippet = L consecutive flow frames) and normalise with mean 128 (the
authors' flow mean: zero flow is stored as 128) and the RGB streams' scale, 255 x mean(std),
so that flow inputs have the magnitude the cross-modality-initialised first conv expects.

All per-sample randomness comes from the draws, so a batch is reproducible from
(seed, epoch, rank, batch index) and the reference loader can replay it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from dataloading import augment, sampling, shards

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("train", "val", "test")
MODALITIES = ("rgb", "rgb_diff", "flow", "warped_flow")
FLOW_MODALITIES = shards.FLOW_MODALITIES
FLOW_MEAN_255 = 128.0  # = dataloading.flow.FLOW_MEAN_255 (not imported: that module pulls in cv2)
FLOW_BOUND_PX = 20.0  # = dataloading.flow.DEFAULT_BOUND: the packed flow's clip bound
FLOW_SOURCES = ("packed", "dali")
DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class PipelineSpec:
    """What a pipeline produces. Frames per snippet read from storage = ``frames_per_snippet``
    (``snippet_length + 1`` for rgb_diff, whose L differences need L+1 frames; for flow
    modalities, L flow frames of C = 2 planes). ``mean``/``std`` are the RGB statistics (0..1
    scale); flow normalisation derives from them (`norm_mean_255`)."""

    mode: str = "train"
    num_segments: int = 3
    snippet_length: int = 1
    modality: str = "rgb"
    batch_size: int = 8
    crop: augment.CropSpec = field(default_factory=augment.CropSpec)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    device: str = "cpu"  # 'gpu': nvJPEG / NVDEC decoding ('mixed') and GPU augmentation
    num_threads: int = 2
    seed: int = 0
    shuffle_buffer: int = 256  # reader's initial_fill; train only
    prefetch_queue_depth: int = 2
    # Where crops are resized to input_size and normalised: 'dali' (in the graph; on the GPU),
    # 'torch' (after the graph, uint8 bilinear), 'auto' = dali on GPU, torch on CPU, because
    # DALI's CPU resize measured ~0.55 ms per 224x224 frame here vs ~0.07 ms for torch's.
    resize_backend: str = "auto"
    # Flow modalities: 'packed' reads the flow computed at packing (`tsn pack --modalities`);
    # 'dali' computes flow on the fly from the RGB frames with `fn.optical_flow` (GPU only,
    # flow only). The packed path is the one tested end to end here (no GPU on CI).
    flow_source: str = "packed"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        for name in ("num_segments", "snippet_length", "batch_size", "num_threads", "prefetch_queue_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.modality == "rgb" and self.snippet_length != 1:
            raise ValueError(f"rgb snippets are single frames: snippet_length must be 1, got {self.snippet_length}")
        if self.resize_backend not in ("auto", "dali", "torch"):
            raise ValueError(f"resize_backend must be 'auto', 'dali' or 'torch', got {self.resize_backend!r}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.device == "gpu" and self.resize_backend == "torch":
            raise ValueError("resize_backend 'torch' finishes frames on the CPU; with device 'gpu' the graph "
                             "resizes on the GPU (resize_backend 'dali' or 'auto')")
        check_flow_source(self.flow_source, self.device, self.modality)

    @property
    def dali_flow(self) -> bool:
        """Flow computed in the graph from RGB frames (`fn.optical_flow`) instead of read."""
        return self.is_flow and self.flow_source == "dali"

    @property
    def stored_modality(self) -> str:
        """The shard entries this spec reads: the RGB frames when DALI computes the flow."""
        return "rgb" if self.dali_flow else self.modality

    @property
    def frames_per_snippet(self) -> int:
        return self.snippet_length + (1 if self.modality == "rgb_diff" else 0)

    @property
    def is_flow(self) -> bool:
        return self.modality in FLOW_MODALITIES

    @property
    def channels(self) -> int:
        """C per frame: 2 (x, y) for flow modalities, 3 (RGB) otherwise."""
        return 2 if self.is_flow else 3

    @property
    def norm_mean_255(self) -> tuple[float, ...]:
        """Per-channel mean subtracted from 0..255 values: RGB ``255 * mean``; flow 128."""
        return (FLOW_MEAN_255,) * 2 if self.is_flow else tuple(255.0 * m for m in self.mean)

    @property
    def norm_std_255(self) -> tuple[float, ...]:
        """Per-channel divisor on the 0..255 scale: RGB ``255 * std``; flow ``255 * mean(std)``."""
        if self.is_flow:
            return (255.0 * sum(self.std) / len(self.std),) * 2
        return tuple(255.0 * s for s in self.std)

    @property
    def resolved_resize_backend(self) -> str:
        if self.resize_backend == "auto":
            return "dali" if self.device == "gpu" else "torch"
        return self.resize_backend

    @property
    def num_views(self) -> int:
        if self.mode != "test":
            return 1
        return 2 * len(augment.TEST_CROP_POSITIONS) if self.crop.flip else len(augment.TEST_CROP_POSITIONS)


def check_flow_source(flow_source: str, device: str, modality: str) -> None:
    """Raise ValueError unless ``flow_source`` can serve ``modality`` on ``device``."""
    if flow_source not in FLOW_SOURCES:
        raise ValueError(f"flow_source must be one of {FLOW_SOURCES}, got {flow_source!r}")
    if flow_source == "dali":
        if device != "gpu":
            raise ValueError("flow_source 'dali' runs fn.optical_flow on NVIDIA optical-flow hardware: it needs "
                             "device 'gpu'; on CPU use the flow computed at packing (flow_source 'packed')")
        if modality != "flow":
            raise ValueError(f"flow_source 'dali' computes plain optical flow only (modality 'flow'), not "
                             f"{modality!r}: warped flow needs the homography estimated at packing")


def _graph_quantized_flow(fn, types, dmath, flow_grid, height, width, bound: float = FLOW_BOUND_PX):
    """(F, h', w', 2) float flow on a coarse grid (pixels of the full frame, as `fn.optical_flow`
    returns it) -> (F, height, width, 2) uint8, upsampled bilinearly and quantised as
    `dataloading.flow.quantize`: clip to +-bound, ``(f + bound) * 255 / (2 * bound)``, rounded
    (half up here, half to even there: they differ only on exact .5 values)."""
    up = fn.resize(flow_grid, resize_x=fn.cast(width, dtype=types.FLOAT), resize_y=fn.cast(height, dtype=types.FLOAT),
                   interp_type=types.INTERP_LINEAR)
    scaled = (dmath.clamp(up, -bound, bound) + bound) * (255.0 / (2.0 * bound))
    return fn.cast(dmath.floor(scaled + 0.5), dtype=types.UINT8)


def _graph_dali_flow(fn, types, dmath, payload, layout: str, starts, last_rgb, info, spec: PipelineSpec,
                     decoder_device: str):
    """Flow frames computed in the graph: (K * L, H, W, 2) uint8 whole frames, quantised like the
    packed flow. Snippet k's flow frame l is the flow from RGB frame s_k + l to s_k + l + 1 (frame
    numbers capped at the last frame, as the packed flow indices are)."""
    L = spec.snippet_length
    rgb_indices = [[dmath.min(s + l, last_rgb) for l in range(L + 1)] for s in starts]
    if layout == shards.LAYOUT_JPEG:
        blob, offsets = payload

        def frame(idx):
            begin = offsets[idx]
            jpeg = fn.slice(blob, begin, offsets[idx + 1] - begin, axes=[0])
            return fn.decoders.image(jpeg, device=decoder_device, output_type=types.RGB)

        snippets = [fn.stack(*[frame(i) for i in idx], axis_name="F") for idx in rgb_indices]
    else:
        (video,) = payload
        flat = fn.stack(*[i for idx in rgb_indices for i in idx])
        decoded = fn.decoders.video(video, frames=fn.cast(flat, dtype=types.INT32), device=decoder_device)
        snippets = [decoded[k * (L + 1):(k + 1) * (L + 1)] for k in range(len(starts))]
    flows = [fn.optical_flow(seq, device="gpu", image_type=types.RGB, output_grid=4) for seq in snippets]
    grid = fn.cat(*flows, axis=0) if len(flows) > 1 else flows[0]
    return _graph_quantized_flow(fn, types, dmath, grid, info[shards.INFO_HEIGHT], info[shards.INFO_WIDTH])


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


class SamplePlanner:
    """The per-sample plan of a batch, computed inside the graph by one `fn.python_function`
    (batch processing) with the pure functions the reference loader uses: frame indices
    (`sampling.frame_indices` on the stored frame count; N - 1 flow frames for flow), the crop
    box (`augment.train_crop` from the draws; `augment.center_crop` in val/test) and, for
    frame packs, the sampled frames' JPEG bytes cut out of the pack.

    One Python operator replaces the ~400 scalar DALI operators (subscripts, arithmetic, one
    slice per frame) that computing the same per sample and frame in the graph takes: each DALI
    operator costs tens of microseconds per batch on a CPU thread, and the plan went from ~10 to
    ~2 ms of the DALI thread per batch of 8 x 8 frames (the graph 26 -> 18 ms per batch for
    K=8, L=1, 45 -> 34 ms for K=3, L=5 rgb_diff). It holds the GIL for ~1 ms per batch.

    Call with (infos, draws, *pack) as lists of per-sample numpy arrays: ``info`` int32
    (`shards.INFO_FIELDS`), ``draws`` int64 (K + 3,), and ``pack`` = (blob uint8, offsets
    int32) when ``cut`` is 'rgb' (F JPEGs: frames) or 'flow' (2F: x, y plane of each flow
    frame), nothing when ``cut`` is None. Returns per-sample lists of: frame_indices (F,)
    int64, crop (5,) int64 = x, y, w, h, flip, anchor (2,) int32 = x, y, shape (2,) int32 =
    w, h, frame_size (2,) int64 = stored h, w, then the ``num_jpegs`` JPEG byte strings
    (uint8), frame-major (F = K * frames_per_snippet).
    """

    CUTS = (None, "rgb", "flow")
    NUM_META = 5

    def __init__(self, spec: PipelineSpec, cut: str | None):
        if cut not in self.CUTS:
            raise ValueError(f"cut must be one of {self.CUTS}, got {cut!r}")
        self.spec, self.cut = spec, cut
        self.frames = spec.num_segments * spec.frames_per_snippet
        self.num_jpegs = {None: 0, "rgb": self.frames, "flow": 2 * self.frames}[cut]
        self.num_outputs = self.NUM_META + self.num_jpegs

    def plan(self, info: np.ndarray, draws: np.ndarray) -> tuple[np.ndarray, augment.CropBox]:
        """(frame indices (F,), crop box) of one sample."""
        spec, K = self.spec, self.spec.num_segments
        n, h, w = int(info[shards.INFO_NUM_FRAMES]), int(info[shards.INFO_HEIGHT]), int(info[shards.INFO_WIDTH])
        if spec.is_flow:  # sample among the N - 1 flow frames
            n -= 1
        indices = sampling.frame_indices(spec.mode, n, K, spec.frames_per_snippet, draws[:K]).reshape(-1)
        if spec.mode == "train":
            box = augment.train_crop(h, w, spec.crop, *(int(d) for d in draws[K:K + len(sampling.AUG_DRAWS)]))
        else:
            box = augment.center_crop(h, w, spec.crop)
        return indices, box

    def __call__(self, infos, draws, *pack):
        B = len(infos)
        meta = [[None] * B for _ in range(self.NUM_META)]
        jpegs = [[None] * B for _ in range(self.num_jpegs)]
        for b in range(B):
            indices, box = self.plan(infos[b], draws[b])
            meta[0][b] = indices
            meta[1][b] = np.array([box.x, box.y, box.width, box.height, int(box.flip)], np.int64)
            meta[2][b] = np.array([box.x, box.y], np.int32)
            meta[3][b] = np.array([box.width, box.height], np.int32)
            meta[4][b] = np.array([infos[b][shards.INFO_HEIGHT], infos[b][shards.INFO_WIDTH]], np.int64)
            if self.cut is None:
                continue
            entries = indices if self.cut == "rgb" else np.stack([2 * indices, 2 * indices + 1], 1).reshape(-1)
            for j, e in enumerate(entries):
                jpegs[j][b] = shards.frame_from_pack(pack[0][b], pack[1][b], e)
        return (*meta, *jpegs)

    def node(self, fn, info, draws, *pack) -> list:
        """The plan's DataNodes: this planner as one batch-processing `fn.python_function`."""
        return fn.python_function(info, draws, *pack, function=self, num_outputs=self.num_outputs,
                                  batch_processing=True)


def build_pipeline(tar_paths: list[str], index_paths: list[str], layout: str, spec: PipelineSpec, *,
                   shard_id: int = 0, num_shards: int = 1, num_samples: int | None = None,
                   device_id: int | None = None, start_epoch: int = 0, start_batch: int = 0,
                   decode_only: bool = False):
    """Build (not yet run) the DALI pipeline for one rank.

    ``shard_id``: the rank (its draws; its part of the data is rotated by ``start_epoch``).
    ``num_samples``: samples in the split (from the manifest); needed to map pipeline
    iterations to epochs for the draws. ``device_id``: the GPU for spec.device == 'gpu'
    (None on CPU). Outputs, per sample (F = K * frames_per_snippet):
    ``frames`` (F, C, H, W) float32 [train/val] or (10, F, C, H, W) [test] with the 'dali'
    resize backend; with 'torch', (F, h, w, C) uint8 of each sample's own size: the crop, not
    mirrored [train/val] or the whole frames [test], for `loader.finish_frames`; ``label`` (1,),
    ``sample_index`` (1,), ``frame_indices`` (F,), ``crop`` (5,) = x, y, w, h, flip.
    C = 3 (RGB) or 2 (flow x, y); for flow modalities ``frame_indices`` are flow frame indices
    in ``[0, num_frames - 2]`` (``layout`` then does not matter: flow is always a JPEG pack).
    ``decode_only``: ``frames`` are the sampled frames decoded whole, (F, H, W, C) uint8, no
    augmentation (the decode limit measured by `tsn bench-loader`).
    """
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    if layout not in shards.LAYOUT_MEMBERS:
        raise ValueError(f"unknown shard layout {layout!r}")
    if spec.device == "gpu" and device_id is None:
        raise ValueError("device 'gpu' needs a device_id (the local GPU index)")
    if spec.device == "cpu" and device_id is not None:
        raise ValueError("device 'cpu' runs without a GPU: pass device_id=None")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} not in [0, {num_shards})")
    if len(tar_paths) != len(index_paths) or not tar_paths:
        raise ValueError("need one index path per shard and at least one shard")
    if num_samples is None:
        num_samples = sum(int(open(p).readline().split()[1]) for p in index_paths)
    bpe = batches_per_epoch(num_samples, num_shards, spec.batch_size)
    draws_source = DrawSource(spec, shard_id, bpe, start_epoch, start_batch)
    members = (shards.flow_members(spec.modality) if spec.is_flow and not spec.dali_flow
               else shards.LAYOUT_MEMBERS[layout])
    # what the planner cuts out of the pack: flow planes, RGB frames (frame packs), or nothing
    # (video layout; flow computed from RGB in the graph slices its own L + 1 frames)
    cut = (None if spec.dali_flow else "flow" if spec.is_flow
           else "rgb" if layout == shards.LAYOUT_JPEG else None)
    planner = SamplePlanner(spec, cut)
    decoder_device = "mixed" if spec.device == "gpu" else "cpu"
    K, Lf = spec.num_segments, spec.frames_per_snippet
    mean, std = list(spec.norm_mean_255), list(spec.norm_std_255)

    # The reader's shuffle seed and its part of the data depend only on (seed, epoch, rank):
    # `TSNLoader` builds one pipeline per epoch, so an epoch's sample order does not depend on
    # the epochs before it, and a run resumed at (epoch, batch) sees exactly the same data.
    # Rotating the part by epoch (as DALI's stick_to_shard=False would) shows every rank all
    # data over the epochs.
    reader_shard = (shard_id + start_epoch) % num_shards
    reader_seed = int(sampling.rng_for(spec.seed, start_epoch, shard_id, 0).integers(1 << 30))

    @pipeline_def(batch_size=spec.batch_size, num_threads=spec.num_threads, device_id=device_id,
                  seed=reader_seed, prefetch_queue_depth=spec.prefetch_queue_depth)
    def tsn_pipeline():
        outputs = fn.readers.webdataset(
            paths=list(tar_paths), index_paths=list(index_paths), ext=["info", *members],
            dtypes=[types.INT32] + [types.INT32 if m.endswith("offsets") else types.UINT8 for m in members],
            missing_component_behavior="error", shard_id=reader_shard, num_shards=num_shards,
            random_shuffle=spec.mode == "train", initial_fill=spec.shuffle_buffer,
            pad_last_batch=True, stick_to_shard=False, name="reader")
        info, payload = outputs[0], outputs[1:]
        draws = fn.external_source(source=draws_source, batch=True, batch_info=True, dtype=types.INT64)
        plan = planner.node(fn, info, draws, *(payload if cut else ()))
        frame_indices, crop, anchor, shape, frame_size = plan[:SamplePlanner.NUM_META]
        jpegs = plan[SamplePlanner.NUM_META:]  # frame-major: F frames, or F (x, y) plane pairs
        flip = crop[4]
        test = spec.mode == "test"
        whole = test or decode_only  # decode whole frames (the 10 test views share one decode)
        seq_x_inverted = None  # flow, test views with the dali backend: x planes as 255 - x
        if spec.dali_flow:
            starts = [frame_indices[k * Lf] for k in range(K)]  # l = 0 is never clamped
            last_rgb = fn.cast(info[shards.INFO_NUM_FRAMES], dtype=types.INT64) - 1
            seq = _graph_dali_flow(fn, types, dmath, payload, layout, starts, last_rgb, info, spec, decoder_device)
            if not whole:
                seq = fn.slice(seq, anchor, shape, axis_names="WH")
            px, py = seq[:, :, :, 0:1], seq[:, :, :, 1:2]
            if spec.mode == "train" and spec.crop.flip:  # as below: x -> 255 - x on flipped samples
                px = fn.cast(flip * 255 + (1 - 2 * flip) * px, dtype=types.UINT8)
            if test and spec.crop.flip and spec.resolved_resize_backend == "dali":
                seq_x_inverted = fn.cat(fn.cast(255 - fn.cast(px, dtype=types.INT32), dtype=types.UINT8), py, axis=3)
            seq = fn.cat(px, py, axis=3)
        elif spec.is_flow:
            def plane(jpeg):  # one grayscale plane -> (h, w, 1) uint8
                if whole:
                    return fn.decoders.image(jpeg, device=decoder_device, output_type=types.GRAY)
                return fn.decoders.image_slice(jpeg, anchor, shape, axis_names="WH", device=decoder_device,
                                               output_type=types.GRAY, normalized_anchor=False,
                                               normalized_shape=False)

            pairs, inverted = [], []
            for j in range(K * Lf):
                px, py = plane(jpegs[2 * j]), plane(jpegs[2 * j + 1])
                if spec.mode == "train" and spec.crop.flip:
                    # a flipped sample's x flow changes sign: x -> 255 - x (flip is 0 or 1)
                    px = fn.cast(flip * 255 + (1 - 2 * flip) * px, dtype=types.UINT8)
                if test and spec.crop.flip and spec.resolved_resize_backend == "dali":
                    inverted.append(fn.cat(fn.cast(255 - fn.cast(px, dtype=types.INT32), dtype=types.UINT8), py,
                                           axis=2))
                pairs.append(fn.cat(px, py, axis=2))
            seq = pairs  # per-frame nodes; stacked below only where the graph resizes
            if inverted:
                seq_x_inverted = fn.stack(*inverted, axis_name="F")
        elif layout == shards.LAYOUT_JPEG:
            decoded = []
            for jpeg in jpegs:
                if whole:
                    decoded.append(fn.decoders.image(jpeg, device=decoder_device, output_type=types.RGB))
                else:  # decode only the crop's region
                    decoded.append(fn.decoders.image_slice(
                        jpeg, anchor, shape, axis_names="WH", device=decoder_device,
                        output_type=types.RGB, normalized_anchor=False, normalized_shape=False))
            seq = decoded
        else:
            (video,) = payload
            seq = fn.decoders.video(video, frames=fn.cast(frame_indices, dtype=types.INT32),
                                    device=decoder_device)
            if not whole:
                seq = fn.slice(seq, anchor, shape, axis_names="WH")
        label, sample_index = info[shards.INFO_LABEL], info[shards.INFO_SAMPLE_INDEX]
        meta = (label, sample_index, frame_indices, crop, frame_size)
        if decode_only or spec.resolved_resize_backend == "torch":
            # uint8 crops (not yet mirrored) or whole frames (test), each sample its own size,
            # one output per frame (`frame_output_names`); `loader.finish_frames` mirrors,
            # resizes and normalises them. Stacking, padding them to one shape (fn.pad) and
            # mirroring them here cost 6, 20 and 3 ms of the DALI thread per batch of 8 x 8
            # frames, more than the rest of the graph but decoding; torch stacks a sample's
            # frames in ~0.05 ms.
            return (*(seq if isinstance(seq, list) else [seq]), *meta)
        if isinstance(seq, list):
            seq = fn.stack(*seq, axis_name="F")
        size = [spec.crop.input_size, spec.crop.input_size]
        normalize = dict(mean=mean, std=std, dtype=types.FLOAT, output_layout="FCHW")
        if test:
            c = spec.crop
            h = fn.cast(info[shards.INFO_HEIGHT], dtype=types.INT64)
            w = fn.cast(info[shards.INFO_WIDTH], dtype=types.INT64)
            side = dmath.min(h, w) * c.input_size // c.resize_short

            def views_of(frames):
                views = []
                for px, py in augment.TEST_CROP_POSITIONS:
                    vx, vy = px * ((w - side) // 4), py * ((h - side) // 4)
                    crop = fn.slice(frames, fn.cast(fn.stack(vx, vy), dtype=types.INT32),
                                    fn.cast(fn.stack(side, side), dtype=types.INT32), axis_names="WH")
                    views.append(fn.resize(crop, size=size))
                return views

            views = views_of(seq)
            out = [fn.crop_mirror_normalize(v, mirror=0, **normalize) for v in views]
            if c.flip:
                flipped = views if seq_x_inverted is None else views_of(seq_x_inverted)
                out += [fn.crop_mirror_normalize(v, mirror=1, **normalize) for v in flipped]
            frames = fn.stack(*out)
        else:
            frames = fn.crop_mirror_normalize(fn.resize(seq, size=size), mirror=fn.cast(flip, dtype=types.INT32),
                                              **normalize)
        return (frames, *meta)

    return tsn_pipeline()


META_NAMES = ("label", "sample_index", "frame_indices", "crop", "frame_size")


def frame_output_names(spec: PipelineSpec, layout: str, decode_only: bool = False) -> tuple[str, ...]:
    """The outputs of `build_pipeline` that carry the frames, in order (the meta outputs,
    `META_NAMES`, follow them). One, ``frames``, with the 'dali' resize backend (a batch
    tensor) or from the video layout ((F, h, w, C) per sample, its own size); else one per
    sampled frame, ``frame0`` ... ``frame{F-1}``, (h, w, C) per sample."""
    per_frame = ((decode_only or spec.resolved_resize_backend == "torch") and not spec.dali_flow
                 and (spec.is_flow or layout == shards.LAYOUT_JPEG))
    if not per_frame:
        return ("frames",)
    return tuple(f"frame{j}" for j in range(spec.num_segments * spec.frames_per_snippet))


def output_names(spec: PipelineSpec, layout: str, decode_only: bool = False) -> tuple[str, ...]:
    """Names of `build_pipeline`'s outputs, in order."""
    return (*frame_output_names(spec, layout, decode_only), *META_NAMES)
