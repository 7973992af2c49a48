"""The DALI pipeline: a sample source -> TSN batches (decode + augment in DALI).

Graph, per sample, one named step each (`build_pipeline`)::

    input:    external_source = `source.SampleSource`: per sample, the plan (`SamplePlanner`:
              frame indices, crop box, flip, [test view anchors]) and only the bytes it needs
              (the sampled frames' JPEGs, or the whole video member), read on the source's
              threads from local files, the node's shard cache or object storage
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
like the packed flow (`dataloading.sources.flow`), then cropped, flipped and normalised as above.
Warped flow has no DALI twin (no homography estimation in the graph): packed only.

Flow modalities sample among the ``num_frames - 1`` stored flow frames with the same
`sampling` functions (snippet = L consecutive flow frames) and normalise with mean 128 (the
authors' flow mean: zero flow is stored as 128) and the RGB streams' scale, 255 x mean(std),
so that flow inputs have the magnitude the cross-modality-initialised first conv expects.

DALI is imported inside the functions: importing this module does not load DALI.
"""

from __future__ import annotations

from dataclasses import dataclass

from dataloading.format import shards
from dataloading.pipeline import dali_flow
from dataloading.pipeline.dali_planner import wants_test_views
from dataloading.pipeline.source import SampleSource
from dataloading.planning.spec import PipelineSpec

META_NAMES = ("label", "sample_index", "frame_indices", "crop", "frame_size", "position")


def build_pipeline(source: SampleSource, layout: str, spec: PipelineSpec, *, device_id: int | None = None,
                   decode_only: bool = False):
    """Build (not yet run) the DALI pipeline for one rank, fed by ``source`` (its batches,
    order, draws and reads: `dataloading.pipeline.source`; built with ``test_views=wants_test_views(spec,
    decode_only)``).

    ``device_id``: the GPU for spec.device == 'gpu' (None on CPU). Outputs (`output_names`),
    per sample (F = K * frames_per_snippet): ``frames`` (F, C, H, W) float32 [train/val] or
    (10, F, C, H, W) [test] with the 'dali' resize backend; with 'torch', (F, h, w, C) uint8 of
    each sample's own size: the crop, not mirrored [train/val] or the whole frames [test], for
    `finish.finish_frames`; ``label`` (), ``sample_index`` (), ``frame_indices`` (F,),
    ``crop`` (5,) = x, y, w, h, flip, ``frame_size`` (2,) = stored h, w, ``position`` ()
    (the source's: -1 for a padding entry).
    C = 3 (RGB) or 2 (flow x, y); for flow modalities ``frame_indices`` are flow frame indices
    in ``[0, num_frames - 2]`` (``layout`` then does not matter: flow is always a JPEG pack).
    ``decode_only``: ``frames`` are the sampled frames decoded whole, (F, H, W, C) uint8, no
    augmentation (the decode limit measured by `tsn bench-loader`).
    """
    from nvidia.dali import fn, pipeline_def

    _check_arguments(layout, spec, device_id)
    if source.spec != spec or source.layout != layout:
        raise ValueError("the source was made for another spec or layout than the pipeline")
    if source.planner.num_view_anchors != (len(_test_positions()) if wants_test_views(spec, decode_only) else 0):
        raise ValueError("the source's test views do not match the pipeline (test_views=wants_test_views(spec))")
    graph_resizes = not decode_only and spec.resolved_resize_backend == "dali"
    decoder_device = "mixed" if spec.device == "gpu" else "cpu"
    whole = spec.mode == "test" or decode_only  # decode whole frames (the test views share one decode)

    @pipeline_def(batch_size=spec.batch_size, num_threads=spec.num_threads, device_id=device_id,
                  seed=spec.seed, prefetch_queue_depth=spec.prefetch_queue_depth)
    def tsn_pipeline():
        named = dict(zip(source.output_names, fn.external_source(
            source=source, num_outputs=len(source.output_names), batch=True, batch_info=True,
            dtype=source.output_dtypes)))
        plan = _plan_nodes(named, source)
        frames, x_inverted = _decode(spec, layout, named, plan, whole, decoder_device)
        meta = tuple(named[n] for n in META_NAMES)
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


def _test_positions():
    from dataloading.planning import augment

    return augment.TEST_CROP_POSITIONS


def _check_arguments(layout, spec, device_id) -> None:
    if layout not in shards.LAYOUT_MEMBERS:
        raise ValueError(f"unknown shard layout {layout!r}")
    if spec.device == "gpu" and device_id is None:
        raise ValueError("device 'gpu' needs a device_id (the local GPU index)")
    if spec.device == "cpu" and device_id is not None:
        raise ValueError("device 'cpu' runs without a GPU: pass device_id=None")


@dataclass
class _PlanNodes:
    """The plan's graph inputs (`SampleSource` outputs), by name."""

    frame_indices: object
    crop: object  # (5,) x, y, w, h, flip
    anchor: object  # (2,) int32 x, y of the crop
    shape: object  # (2,) int32 w, h of the crop (test: of every view)
    frame_size: object  # (2,) int64 stored h, w
    flip: object  # crop[4], one subscript operator shared by every frame's use
    view_anchors: list  # test views the graph cuts itself: (2,) int32 x, y each
    payload: list  # frame-major JPEGs (F frames, or F (x, y) plane pairs, or K x (L + 1) RGB frames), or [video]
    rgb_indices: object = None  # flow computed from a video: the RGB frames to decode


def _plan_nodes(named: dict, source: SampleSource) -> _PlanNodes:
    views = [named[f"view{v}"] for v in range(source.planner.num_view_anchors)]
    return _PlanNodes(named["frame_indices"], named["crop"], named.get("anchor"), named.get("shape"), named["frame_size"],
                      flip=named["crop"][4], view_anchors=views, payload=[named[n] for n in source.payload_names],
                      rgb_indices=named.get("rgb_indices"))


def _decode(spec: PipelineSpec, layout: str, named: dict, plan: _PlanNodes, whole: bool, decoder_device: str):
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
        seq = dali_flow.computed_flow(plan.payload, layout, plan.rgb_indices, plan.frame_size, spec, decoder_device)
        if not whole:
            seq = fn.slice(seq, plan.anchor, plan.shape, axis_names="WH")
        return dali_flow.flow_frames(seq[:, :, :, 0:1], seq[:, :, :, 1:2], plan.flip, spec, axis=3)
    if spec.is_flow:
        pairs = [dali_flow.flow_frames(image(x, types.GRAY), image(y, types.GRAY), plan.flip, spec, axis=2)
                 for x, y in zip(plan.payload[0::2], plan.payload[1::2])]
        inverted = [inv for _, inv in pairs if inv is not None]
        return [frame for frame, _ in pairs], fn.stack(*inverted, axis_name="F") if inverted else None
    if layout == shards.LAYOUT_JPEG:
        return [image(jpeg, types.RGB) for jpeg in plan.payload], None
    (video,) = plan.payload
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


def sharded_pipeline(tar_paths: list[str], index_paths: list[str], layout: str, spec: PipelineSpec, *,
                     shard_id: int = 0, num_shards: int = 1, start_epoch: int = 0, device_id: int | None = None,
                     decode_only: bool = False):
    """`build_pipeline` on `source.sharded_source`: rank ``shard_id``'s part of the shards,
    epoch after epoch (tools and tests; the training loader lists its own batches)."""
    from dataloading.pipeline.source import sharded_source

    source = sharded_source(tar_paths, index_paths, layout, spec, shard_id=shard_id, num_shards=num_shards,
                            start_epoch=start_epoch, decode_only=decode_only)
    return build_pipeline(source, layout, spec, device_id=device_id, decode_only=decode_only)
