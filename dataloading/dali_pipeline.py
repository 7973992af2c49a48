"""The DALI pipeline: packed shards -> TSN batches (decode + augment in DALI).

Graph, per sample, one named step each (`build_pipeline`)::

    _read:    readers.webdataset -> info, payload: training, the listed samples in order (the
              rank's chunk of the epoch's order, `dataloading.order`); else sharded by rank
              (shuffled in train mode)
    _plan:    external_source (draws: `dali_planner.PositionDraws` / `DrawSource`) + python_function
              (`dali_planner.SamplePlanner`: `plan.plan_sample` on info + draws, once per batch)
              -> K*L frame indices, crop box, flip, [test view anchors,] the sampled frames' JPEGs
    _decode:  jpeg layout : decode only the crop of each sampled JPEG
                            (`decoders.image_slice`, libjpeg-turbo on CPU / nvJPEG with device 'gpu')
              video layout: `decoders.video(frames=indices)` then slice the crop
              flow / warped_flow (any layout): the same on the modality's grayscale frame pack,
                            two JPEGs (x, y) per sampled flow frame, concatenated to C = 2
                            channels; on a flipped sample the x plane becomes 255 - x
                            (`dali_flow.flow_frames`, TSN.md section 3)
    _augment: resize backend 'dali' (GPU): -> stack (F, h, w, C) -> resize to input size -> flip +
                            normalise (F, C, H, W) float32; test mode: the planner's test views
              resize backend 'torch' (CPU): one output per sampled frame, (h, w, C) uint8 of each
                            sample's own size; `finish.finish_frames` stacks, mirrors, resizes and
                            normalises them outside the graph (faster than DALI's CPU operators)

With ``flow_source='dali'`` (GPU only) the flow modality is computed on the fly instead of
read from the shards (`dali_flow.computed_flow`): the snippet's L + 1 consecutive RGB frames
are decoded whole (nvJPEG / NVDEC), `fn.optical_flow` (NVIDIA optical-flow hardware) computes
their L flow fields on a 4-pixel grid, which are upsampled to the frame size and quantised
like the packed flow (`dataloading.flow`), then cropped, flipped and normalised as above.
Warped flow has no DALI twin (no homography estimation in the graph): packed only.

Flow modalities sample among the ``num_frames - 1`` stored flow frames with the same
`sampling` functions (snippet = L consecutive flow frames) and normalise with mean 128 (the
authors' flow mean: zero flow is stored as 128) and the RGB streams' scale, 255 x mean(std),
so that flow inputs have the magnitude the cross-modality-initialised first conv expects.

DALI is imported inside the functions: importing this module does not load DALI.
"""

from __future__ import annotations

from dataclasses import dataclass

from dataloading import dali_flow, sampling, shards
from dataloading.dali_planner import DrawSource, PositionDraws, SamplePlanner, batches_per_epoch, reader_part
from dataloading.spec import PipelineSpec

META_NAMES = ("label", "sample_index", "frame_indices", "crop", "frame_size")


def build_pipeline(tar_paths: list[str], index_paths: list[str], layout: str, spec: PipelineSpec, *,
                   shard_id: int = 0, num_shards: int = 1, num_samples: int | None = None,
                   device_id: int | None = None, start_epoch: int = 0, start_batch: int = 0,
                   decode_only: bool = False, positions=None):
    """Build (not yet run) the DALI pipeline for one rank.

    ``positions`` (the training loader's way): the index files list exactly the samples to
    read, in order (``index_paths[i]`` a run-local index of ``tar_paths[i]``; a tar may appear
    several times), and ``positions[j]`` is the position of the j-th listed sample in epoch
    ``start_epoch``'s order (`dataloading.order`), -1 for a padding entry: the reader neither
    shards (``shard_id`` 0, ``num_shards`` 1) nor shuffles, and the draws are keyed by position
    (`PositionDraws`), so a sample's plan does not depend on the world size. Without it the
    reader reads its part ``shard_id`` of ``num_shards`` (shuffled in train mode) with draws
    keyed by (seed, epoch, rank, batch) (`DrawSource`).

    ``shard_id``: the rank (its draws; its part of the data is rotated by ``start_epoch``).
    ``num_samples``: samples in the split (from the manifest); needed to map pipeline
    iterations to epochs for the draws. ``device_id``: the GPU for spec.device == 'gpu'
    (None on CPU). Outputs (`output_names`), per sample (F = K * frames_per_snippet):
    ``frames`` (F, C, H, W) float32 [train/val] or (10, F, C, H, W) [test] with the 'dali'
    resize backend; with 'torch', (F, h, w, C) uint8 of each sample's own size: the crop, not
    mirrored [train/val] or the whole frames [test], for `finish.finish_frames`; ``label`` (1,),
    ``sample_index`` (1,), ``frame_indices`` (F,), ``crop`` (5,) = x, y, w, h, flip,
    ``frame_size`` (2,) = stored h, w.
    C = 3 (RGB) or 2 (flow x, y); for flow modalities ``frame_indices`` are flow frame indices
    in ``[0, num_frames - 2]`` (``layout`` then does not matter: flow is always a JPEG pack).
    ``decode_only``: ``frames`` are the sampled frames decoded whole, (F, H, W, C) uint8, no
    augmentation (the decode limit measured by `tsn bench-loader`).
    """
    from nvidia.dali import pipeline_def

    _check_arguments(tar_paths, index_paths, layout, spec, shard_id, num_shards, device_id)
    if positions is not None:
        if (shard_id, num_shards) != (0, 1):
            raise ValueError("a listed reader (positions) reads its samples unsharded: shard_id 0, num_shards 1")
        draws = PositionDraws(spec, start_epoch, positions)
    else:
        if num_samples is None:
            num_samples = sum(shards.index_sample_count(p) for p in index_paths)
        draws = DrawSource(spec, shard_id, batches_per_epoch(num_samples, num_shards, spec.batch_size),
                           start_epoch, start_batch)
    cut = _planner_cut(spec, layout)
    graph_resizes = not decode_only and spec.resolved_resize_backend == "dali"
    planner = SamplePlanner(spec, cut, test_views=graph_resizes and spec.mode == "test")
    decoder_device = "mixed" if spec.device == "gpu" else "cpu"
    whole = spec.mode == "test" or decode_only  # decode whole frames (the test views share one decode)

    # The reader's shuffle seed and its part of the data depend only on (seed, epoch, rank):
    # `TSNLoader` builds one pipeline per epoch, so an epoch's sample order does not depend on
    # the epochs before it, and a run resumed at (epoch, batch) sees exactly the same data.
    # Rotating the part by epoch (as DALI's stick_to_shard=False would) shows every rank all
    # data over the epochs.
    reader_shard = reader_part(shard_id, start_epoch, num_shards)
    reader_seed = int(sampling.rng_for(spec.seed, start_epoch, shard_id, 0).integers(1 << 30))

    @pipeline_def(batch_size=spec.batch_size, num_threads=spec.num_threads, device_id=device_id,
                  seed=reader_seed, prefetch_queue_depth=spec.prefetch_queue_depth)
    def tsn_pipeline():
        info, payload = _read(tar_paths, index_paths, _members(spec, layout), spec, reader_shard, num_shards,
                              listed=positions is not None)
        plan = _plan(planner, info, draws, payload if cut else ())
        frames, x_inverted = _decode(spec, layout, payload, info, plan, whole, decoder_device)
        meta = (info[shards.INFO_LABEL], info[shards.INFO_SAMPLE_INDEX], plan.frame_indices, plan.crop,
                plan.frame_size)
        if not graph_resizes:
            # uint8 crops (not yet mirrored) or whole frames (test), each sample its own size,
            # one output per frame (`frame_output_names`); `finish.finish_frames` mirrors,
            # resizes and normalises them. Stacking, padding them to one shape (fn.pad) and
            # mirroring them here cost 6, 20 and 3 ms of the DALI thread per batch of 8 x 8
            # frames, more than the rest of the graph but decoding; torch stacks a sample's
            # frames in ~0.05 ms.
            return (*(frames if isinstance(frames, list) else [frames]), *meta)
        return (_augment(spec, frames, x_inverted, plan), *meta)

    return tsn_pipeline()


def _check_arguments(tar_paths, index_paths, layout, spec, shard_id, num_shards, device_id) -> None:
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


def _members(spec: PipelineSpec, layout: str) -> tuple[str, ...]:
    """The tar members the reader fetches besides ``info``: the flow modality's own pack, or
    the layout's RGB members (also when the graph computes the flow from them)."""
    if spec.is_flow and not spec.dali_flow:
        return spec.modality_row.shard_members
    return shards.LAYOUT_MEMBERS[layout]


def _planner_cut(spec: PipelineSpec, layout: str) -> str | None:
    """What the planner cuts out of the pack: flow planes, RGB frames (frame packs), or nothing
    (video layout; flow computed from RGB in the graph slices its own L + 1 frames)."""
    if spec.dali_flow:
        return None
    if spec.is_flow:
        return "flow"
    return "rgb" if layout == shards.LAYOUT_JPEG else None


def _read(tar_paths, index_paths, members, spec: PipelineSpec, reader_shard: int, num_shards: int,
          listed: bool = False):
    """The reader: (info int32 (5,), payload: one node per member, offsets int32, others uint8).
    ``listed``: read the indexes' samples in their listed order (DALI 2.4 honours an index that
    lists a subset of a tar's samples in any order, repeats included), no shuffling."""
    from nvidia.dali import fn, types

    outputs = fn.readers.webdataset(
        paths=list(tar_paths), index_paths=list(index_paths), ext=["info", *members],
        dtypes=[types.INT32] + [types.INT32 if m.endswith("offsets") else types.UINT8 for m in members],
        missing_component_behavior="error", shard_id=reader_shard, num_shards=num_shards,
        random_shuffle=spec.mode == "train" and not listed, initial_fill=spec.shuffle_buffer,
        pad_last_batch=True, stick_to_shard=False, name="reader")
    return outputs[0], outputs[1:]


@dataclass
class _PlanNodes:
    """The planner's outputs (`SamplePlanner`), by name."""

    frame_indices: object
    crop: object  # (5,) x, y, w, h, flip
    anchor: object  # (2,) int32 x, y of the crop
    shape: object  # (2,) int32 w, h of the crop (test: of every view)
    frame_size: object
    flip: object  # crop[4], one subscript operator shared by every frame's use
    view_anchors: list  # test views the graph cuts itself: (2,) int32 x, y each
    jpegs: list  # frame-major: F frames, or F (x, y) plane pairs


def _plan(planner: SamplePlanner, info, draws: DrawSource, pack) -> _PlanNodes:
    from nvidia.dali import fn, types

    draw_rows = fn.external_source(source=draws, batch=True, batch_info=True, dtype=types.INT64)
    out = planner.node(fn, info, draw_rows, *pack)
    frame_indices, crop, anchor, shape, frame_size = out[:planner.NUM_META]
    views_end = planner.NUM_META + planner.num_view_anchors
    return _PlanNodes(frame_indices, crop, anchor, shape, frame_size, flip=crop[4],
                      view_anchors=out[planner.NUM_META:views_end], jpegs=out[views_end:])


def _decode(spec: PipelineSpec, layout: str, payload, info, plan: _PlanNodes, whole: bool, decoder_device: str):
    """The sampled frames, (h, w, C) uint8: the crop, or whole frames when ``whole``.

    Returns (frames, x_inverted): ``frames`` is a list of per-frame nodes (frame packs: stacked
    later only where the graph resizes) or one (F, h, w, C) node (video, computed flow);
    ``x_inverted``: flow test views mirrored by the graph, (F, H, W, 2) (`dali_flow.flow_frames`).
    """
    from nvidia.dali import fn, types

    def image(jpeg, output_type):
        if whole:
            return fn.decoders.image(jpeg, device=decoder_device, output_type=output_type)
        return fn.decoders.image_slice(jpeg, plan.anchor, plan.shape, axis_names="WH", device=decoder_device,
                                       output_type=output_type, normalized_anchor=False, normalized_shape=False)

    if spec.dali_flow:
        seq = dali_flow.computed_flow(payload, layout, plan.frame_indices, info, spec, decoder_device)
        if not whole:
            seq = fn.slice(seq, plan.anchor, plan.shape, axis_names="WH")
        return dali_flow.flow_frames(seq[:, :, :, 0:1], seq[:, :, :, 1:2], plan.flip, spec, axis=3)
    if spec.is_flow:
        pairs = [dali_flow.flow_frames(image(x, types.GRAY), image(y, types.GRAY), plan.flip, spec, axis=2)
                 for x, y in zip(plan.jpegs[0::2], plan.jpegs[1::2])]
        inverted = [inv for _, inv in pairs if inv is not None]
        return [frame for frame, _ in pairs], fn.stack(*inverted, axis_name="F") if inverted else None
    if layout == shards.LAYOUT_JPEG:
        return [image(jpeg, types.RGB) for jpeg in plan.jpegs], None
    (video,) = payload
    seq = fn.decoders.video(video, frames=fn.cast(plan.frame_indices, dtype=types.INT32), device=decoder_device)
    return (seq if whole else fn.slice(seq, plan.anchor, plan.shape, axis_names="WH")), None


def _augment(spec: PipelineSpec, frames, x_inverted, plan: _PlanNodes):
    """Resize backend 'dali': the crop (train/val) or the test views (test) resized to the input
    size, mirrored where flipped, colour channels in ``spec.channel_order``, normalised:
    (F, C, S, S) or (V, F, C, S, S) float32."""
    from nvidia.dali import fn, types

    if isinstance(frames, list):
        frames = fn.stack(*frames, axis_name="F")
    if spec.reverses_channels:  # BGR input (`spec.channel_order`): the decoded RGB channels reversed
        frames = fn.cat(frames[:, :, :, 2:3], frames[:, :, :, 1:2], frames[:, :, :, 0:1], axis=3)
    size = [spec.crop.input_size, spec.crop.input_size]
    normalize = dict(mean=list(spec.norm_mean_255), std=list(spec.norm_std_255), dtype=types.FLOAT,
                     output_layout="FCHW")
    if spec.mode != "test":
        return fn.crop_mirror_normalize(fn.resize(frames, size=size), mirror=fn.cast(plan.flip, dtype=types.INT32),
                                        **normalize)

    def views_of(seq):  # the unmirrored test views, resized (their shape is the centre crop's)
        return [fn.resize(fn.slice(seq, anchor, plan.shape, axis_names="WH"), size=size)
                for anchor in plan.view_anchors]

    views = views_of(frames)
    out = [fn.crop_mirror_normalize(v, mirror=0, **normalize) for v in views]
    if spec.crop.flip:
        mirrored = views if x_inverted is None else views_of(x_inverted)
        out += [fn.crop_mirror_normalize(v, mirror=1, **normalize) for v in mirrored]
    return fn.stack(*out)


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
