"""Flow in the DALI graph: the flow-aware flip of flow frames (packed or computed) and, with
``flow_source='dali'`` (GPU only), flow computed on the fly from the RGB frames.

Every formula is the flow format's own (`dataloading.sources.flow`), applied to DataNodes: the flip is
`flow.flip_x` (x -> 255 - x), the quantisation `flow.levels_per_px` on `flow.DEFAULT_BOUND`.
DALI is imported inside the functions: importing this module (e.g. with `tsn --help`) does
not load DALI.
"""

from __future__ import annotations

from dataloading.format import shards
from dataloading.planning.spec import PipelineSpec
from dataloading.sources import flow


def flip_x_where(q_x, flip):
    """The quantised x plane(s) ``q_x`` (uint8 DataNode) of a sample, `flow.flip_x` applied where
    the sample's ``flip`` (int64 DataNode, 0 or 1) is 1; uint8. One fused arithmetic operator."""
    from nvidia.dali import fn, types

    return fn.cast(flip * flow.flip_x(q_x) + (1 - flip) * q_x, dtype=types.UINT8)


def flow_frames(px, py, flip, spec: PipelineSpec, axis: int):
    """Join a flow frame's quantised x and y planes (uint8 DataNodes, channels last) on ``axis``.

    Returns (frames, x_inverted): ``frames`` has x inverted on a flipped training sample (the
    graph or the torch finishing step mirrors the pixels afterwards); ``x_inverted`` is the
    same with x inverted unconditionally, for the mirrored test views the graph cuts itself
    (test mode, flip on, resize backend 'dali'), else None.
    """
    from nvidia.dali import fn, types

    if spec.mode == "train" and spec.crop.flip:
        px = flip_x_where(px, flip)
    x_inverted = None
    if spec.mode == "test" and spec.crop.flip and spec.resolved_resize_backend == "dali":
        x_inverted = fn.cat(fn.cast(flow.flip_x(px), dtype=types.UINT8), py, axis=axis)
    return fn.cat(px, py, axis=axis), x_inverted


def quantized_flow(flow_grid, height, width, bound: float = flow.DEFAULT_BOUND):
    """(F, h', w', 2) float flow on a coarse grid (pixels of the full frame, as `fn.optical_flow`
    returns it) -> (F, height, width, 2) uint8, upsampled bilinearly and quantised as
    `flow.quantize`: clip to +-bound, ``(f + bound) * levels_per_px(bound)``, rounded (half up
    here, half to even there: they differ only on exact .5 values)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    up = fn.resize(flow_grid, resize_x=fn.cast(width, dtype=types.FLOAT), resize_y=fn.cast(height, dtype=types.FLOAT),
                   interp_type=types.INTERP_LINEAR)
    scaled = (dmath.clamp(up, -bound, bound) + bound) * flow.levels_per_px(bound)
    return fn.cast(dmath.floor(scaled + 0.5), dtype=types.UINT8)


def computed_flow(payload, layout: str, rgb_indices, frame_size, spec: PipelineSpec, decoder_device: str):
    """Flow frames computed in the graph: (K * L, H, W, 2) uint8 whole frames, quantised like the
    packed flow. ``payload``: the source's (`dataloading.pipeline.source`): the K x (L + 1) RGB JPEGs of the
    snippets (snippet k's flow frame l is the flow from RGB frame s_k + l to s_k + l + 1, frame
    numbers capped at the last frame, as the packed flow indices are; the planner computes them),
    or [the video] with ``rgb_indices`` (K * (L + 1),) int32, the frames to decode of it.
    ``frame_size``: (2,) stored h, w."""
    from nvidia.dali import fn, types

    K, L = spec.num_segments, spec.snippet_length
    if layout == shards.LAYOUT_JPEG:
        frames = [fn.decoders.image(jpeg, device=decoder_device, output_type=types.RGB) for jpeg in payload]
        snippets = [fn.stack(*frames[k * (L + 1):(k + 1) * (L + 1)], axis_name="F") for k in range(K)]
    else:
        (video,) = payload
        decoded = fn.decoders.video(video, frames=rgb_indices, device=decoder_device)
        snippets = [decoded[k * (L + 1):(k + 1) * (L + 1)] for k in range(K)]
    flows = [fn.optical_flow(seq, device="gpu", image_type=types.RGB, output_grid=4) for seq in snippets]
    grid = fn.cat(*flows, axis=0) if len(flows) > 1 else flows[0]
    return quantized_flow(grid, frame_size[0], frame_size[1])
