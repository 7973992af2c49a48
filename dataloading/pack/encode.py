"""One video -> the tar members of one sample (format: `dataloading.format.shards`).

`pack_one` runs in a worker process (`dataloading.procpool`): decode, resize, encode (JPEG frame
pack or a re-encoded video) and, for motion modalities, the flow planes (`FlowPacker`). The
parent turns its result into the sample's members with `sample_members`, once the sample's
index is known (it depends on earlier rejections).
"""

from __future__ import annotations

import json

from dataloading import modality
from dataloading.format import shards
from dataloading.pack.options import PackOptions
from dataloading.sources import flow
from dataloading.sources.items import VideoItem
from dataloading.sources.video_io import (VideoEncoder, VideoError, check_truncated, encode_gray_jpeg, encode_jpeg,
                                          read_video_frames)


def pack_one(task: tuple[str, PackOptions]) -> dict:
    """Decode + encode one video. Never raises: failures come back as ``{"rejected": reason}``.

    Runs in a worker process; the result (payload bytes included) is pickled back to the
    parent, which assigns keys and sample indices (they depend on earlier rejections).
    """
    path, opts = task
    try:
        return encode_sample(path, opts)
    except VideoError as e:
        return {"rejected": e.reason}
    except flow.FlowError as e:
        return {"rejected": f"flow extraction failed: {e}"}
    except Exception as e:  # a bug or an unexpected library error must not stop the run
        return {"rejected": f"unexpected error: {type(e).__name__}: {e}"}


def worker_died(task: tuple[str, PackOptions]) -> dict:
    """The result of a video whose worker process died even when it ran alone."""
    return {"rejected": "the decoding process died (crashed, or was killed for using too much memory)"}


class FlowPacker:
    """Flow planes of one video as grayscale JPEGs, computed while its frames stream by."""

    def __init__(self, opts: PackOptions):
        self.opts = opts
        self.extractor = flow.FlowExtractor(opts.flow_algorithm, opts.flow_bound, opts.flow_modalities)
        self.jpegs: dict[str, list[bytes]] = {m: [] for m in opts.flow_modalities}

    def push(self, frame) -> None:
        item = self.extractor.push(frame)
        if item is not None:
            for m, (x, y) in item.items():
                self.jpegs[m] += [encode_gray_jpeg(x, self.opts.jpeg_quality), encode_gray_jpeg(y, self.opts.jpeg_quality)]

    def payload(self, num_frames: int) -> tuple[list[tuple[str, bytes]], dict]:
        """(tar members, per-modality JSON metadata) of a video of ``num_frames`` RGB frames."""
        members, meta = [], {}
        stats = self.extractor.stats
        if stats.num_flow_frames != num_frames - 1:
            raise flow.FlowError(f"{stats.num_flow_frames} flow frames for {num_frames} RGB frames")
        for m, jpegs in self.jpegs.items():
            blob, offsets = shards.encode_frame_pack(jpegs)
            frames_ext, offsets_ext = modality.get(m).shard_members
            members += [(frames_ext, blob), (offsets_ext, offsets)]
            meta[m] = {"algorithm": self.opts.flow_algorithm, "bound": self.opts.flow_bound,
                       "num_frames": stats.num_flow_frames, "order": shards.FLOW_ORDER,
                       "jpeg_quality": self.opts.jpeg_quality}
            if m == modality.WARPED_FLOW:  # pairs warped with the identity (no trustworthy homography), and why
                meta[m]["homography_fallbacks"] = stats.homography_fallbacks
                meta[m]["homography_fallback_reasons"] = dict(stats.fallback_reasons)
        return members, meta


def encode_sample(path: str, opts: PackOptions) -> dict:
    """The payload members (frames/offsets or video, + flow) and the stored/source facts of one
    video, or ``{"rejected": reason}`` when it has fewer than ``opts.min_frames`` frames.
    Raises `VideoError` / `flow.FlowError` for undecodable videos, sources that decode to far
    fewer frames than their container claims (`video_io.check_truncated`) and failed flow."""
    info_out: list = []
    frames = read_video_frames(path, opts.short_side, opts.fps, info_out)
    flow_packer = FlowPacker(opts) if opts.flow_modalities else None
    if opts.layout == shards.LAYOUT_JPEG:
        jpegs = []
        for f in frames:
            jpegs.append(encode_jpeg(f, opts.jpeg_quality))
            if flow_packer is not None:
                flow_packer.push(f)
        info = info_out[0]
        check_truncated(info)  # a source cut short that decodes without an error
        if len(jpegs) < opts.min_frames:
            return {"rejected": f"only {len(jpegs)} decoded frames, need >= {opts.min_frames}"}
        blob, offsets = shards.encode_frame_pack(jpegs)
        payload = [("frames", blob), ("offsets", offsets)]
        num_frames, height, width = len(jpegs), info.height, info.width
    else:
        encoder = None
        for frame in frames:
            if encoder is None:
                encoder = VideoEncoder(opts.codec, info_out[0].fps, opts.gop)
            # 4:2:0 video needs even sizes; only a kept (short_side=None) odd source size gets
            # here, and losing its last row/column is harmless.
            h, w = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2
            encoder.add(frame[:h, :w])
            if flow_packer is not None:
                flow_packer.push(frame[:h, :w])  # flow of the stored (even-sized) frames
        info = info_out[0]
        check_truncated(info)
        if info.num_frames < opts.min_frames:
            return {"rejected": f"only {info.num_frames} decoded frames, need >= {opts.min_frames}"}
        data, num_frames = encoder.finish()
        if num_frames < opts.min_frames:
            return {
                "rejected": f"re-encoded {opts.codec} video decodes to only {num_frames} frames, "
                f"need >= {opts.min_frames}"
            }
        payload = [("video", data)]
        height, width = encoder.height, encoder.width
    flow_meta = {}
    if flow_packer is not None:
        flow_members, flow_meta = flow_packer.payload(num_frames)
        payload += flow_members
    return {
        "payload": payload,
        "flow_meta": flow_meta,
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "fps": info.fps,
        "source_fps": info.source_fps,
        "source_width": info.source_width,
        "source_height": info.source_height,
        "source_num_frames_header": info.header_num_frames,
        "source_num_decoded_frames": info.num_decoded_frames,
        "source_codec": info.codec_name,
    }


def sample_members(
    item: VideoItem, result: dict, sample_index: int, opts: PackOptions
) -> tuple[list[tuple[str, bytes]], dict]:
    """The tar members (info, json, cls, payload) of one sample and its stats for the journal."""
    key = f"{sample_index:08d}"
    n, fps = result["num_frames"], result["fps"]
    meta = {
        "key": key,
        "sample_index": sample_index,
        "num_frames": n,
        "fps": fps,
        "duration_seconds": n / fps,
        "width": result["width"],
        "height": result["height"],
        "label": item.label,
        "class_name": item.class_name,
        "source": item.path,
        "source_num_frames_header": result["source_num_frames_header"],
        "source_num_decoded_frames": result["source_num_decoded_frames"],
        "source_fps": result["source_fps"],
        "source_width": result["source_width"],
        "source_height": result["source_height"],
        "source_codec": result["source_codec"],
        "layout": opts.layout,
        "codec": opts.codec,
        "modalities": list(opts.modalities),
        **result.get("flow_meta", {}),
    }
    if opts.layout == shards.LAYOUT_JPEG:
        meta["jpeg_quality"] = opts.jpeg_quality
    else:
        meta["gop"] = 1 if opts.codec == "mjpeg" else opts.gop  # mjpeg: every frame is a keyframe
    # The checksums (in the info member) let `tsn inspect --verify` and the loader catch bytes
    # that changed after packing, which a JPEG or video decoder often decodes without a word.
    members = shards.add_checksums([
        ("info", shards.encode_info(n, item.label, result["height"], result["width"], sample_index)),
        ("json", json.dumps(meta).encode()),
        ("cls", str(item.label).encode()),
        *result["payload"],
    ])
    stats = {k: meta[k] for k in ("key", "sample_index", "num_frames", "duration_seconds", "class_name", "source")}
    return members, stats
