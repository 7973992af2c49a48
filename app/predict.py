"""Predicting the classes of video files with trained checkpoints (`tsn predict`).

A video goes through the same steps as a packed sample under `tsn eval`, with the same
functions, so the scores agree when the frames agree:

* decoding: `dataloading.sources.video_io.read_video_frames` at the short side (and fps) the
  checkpoint's dataset was packed at (its manifest; else ``augment.resize_short``);
  (`VideoFrames`: held in memory, or for very long videos decoded a second time keeping only
  the sampled frames);
* flow modalities: the packer's extractor (`dataloading.sources.flow.FlowExtractor`, the algorithm and
  bound recorded in the manifest), quantised uint8 (x, y) planes as packed, computed only for
  the sampled frame pairs (`flow_pair`);
* sampling, crops, views: `dataloading.planning.plan.plan_sample` for the checkpoint's `PipelineSpec`
  (`app.pipeline.pipeline_spec`: test mode = ``model.test_segments`` x the test views;
  ``fast`` = val mode, ``model.num_segments`` snippets of the centre crop);
* finishing: `dataloading.pipeline.finish.finish_frames` + `to_snippets` (resize, mirror, flow x-flip,
  normalisation), the torch backend of the data path;
* scores: `tsn.evaluation.video_scores` (mean over views and snippets, pre-softmax);
* several checkpoints: `tsn.scores.fuse_scores` with `tsn fuse`'s weights.

What differs from `tsn eval` on a pack of the same video is only what packing loses: the
stored frames are JPEGs (and the flow planes grayscale JPEGs), decoded again by the loader.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.build import build_model
from app.config import Config, config_from_dict, config_to_dict
from app.evaluate import config_of_checkpoint
from app.pipeline import pipeline_spec
from app.preprocessing import checkpoint_overrides
from dataloading.format import shards
from dataloading.pipeline.finish import finish_frames, to_snippets
from dataloading.planning import plan
from dataloading.planning.spec import PipelineSpec
from dataloading.sources import flow
from dataloading.sources.video_io import VideoError, read_video_frames
from tsn.checkpoint import load_checkpoint
from tsn.evaluation import video_scores
from tsn.scores import default_weights, fuse_scores

log = logging.getLogger(__name__)


@dataclass
class Stream:
    """One checkpoint ready to score videos.

    ``spec``: what its clips are made of (mode test or val, K, L, modality, crop, normalisation).
    ``short_side`` / ``fps``: how source videos are decoded (as the checkpoint's data was packed).
    ``flow_algorithm`` / ``flow_bound``: the flow extractor's settings (flow modalities only).
    """

    path: str
    cfg: Config
    model: torch.nn.Module
    class_names: list[str]
    spec: PipelineSpec
    short_side: int | None
    fps: float | None
    flow_algorithm: str
    flow_bound: float
    device: torch.device

    @property
    def decode_key(self) -> tuple:
        """Streams with the same key share one decoding of a video."""
        return (self.short_side, self.fps)


def _manifest_or_none(cfg: Config) -> dict | None:
    try:
        return shards.load_manifest(cfg.data.shards)
    except (FileNotFoundError, ValueError, KeyError, OSError):
        return None


def load_stream(path: str, *, fast: bool = False, device: str | torch.device = "cpu",
                flow_algorithm: str | None = None) -> Stream:
    """Load a checkpoint (weights only) and its config into a `Stream` in eval mode.

    Class names: the checkpoint's ``meta.class_names`` (recorded by training), else its
    dataset's manifest, else ``class_<i>``. Decoding settings and flow settings: the manifest of
    the config's ``data.shards`` when it is readable here, else ``augment.resize_short``, every
    frame, and the packer's default flow (``flow_algorithm`` overrides the algorithm).
    """
    state = load_checkpoint(path)
    # fed as trained: the preprocessing recorded in the checkpoint (app.preprocessing), as `tsn eval`
    cfg = config_from_dict(config_to_dict(config_of_checkpoint(state, str(path))),
                           checkpoint_overrides(state, str(path)), source=f"{path} config")
    try:
        num_classes = int(state["model"]["fc.weight"].shape[0])
    except KeyError:
        raise ValueError(f"{path}: checkpoint model has no 'fc.weight': not a TSN checkpoint") from None
    device = torch.device(device)
    model = build_model(cfg, num_classes, fresh=False)
    model.load_state_dict(state["model"])
    model.to(device).eval()

    manifest = _manifest_or_none(cfg)
    names = list((state.get("meta") or {}).get("class_names") or [])
    if len(names) != num_classes and manifest is not None:
        names = list(manifest.get("classes") or [])
    if len(names) != num_classes:
        log.warning("%s records no class names; using class_<i>", path)
        names = [f"class_{i}" for i in range(num_classes)]

    spec = pipeline_spec(cfg, "val" if fast else "test", batch_size=1)
    # Frames are finished by torch on the CPU here whatever the training loader used; flow is
    # computed here, never by DALI.
    spec = dataclasses.replace(spec, device="cpu", resize_backend="torch", flow_source="packed")

    if manifest is not None:
        short_side, fps = manifest.get("short_side"), manifest.get("fps")
        flow_meta = manifest.get("flow") or {}
    else:
        short_side, fps, flow_meta = cfg.augment.resize_short, None, {}
        log.warning("%s: dataset %s not readable here; decoding at short side %s (augment.resize_short)",
                    path, cfg.data.shards, short_side)
    algorithm = flow_algorithm or flow_meta.get("algorithm") or flow.ALGORITHMS[0]
    bound = float(flow_meta.get("bound") or flow.DEFAULT_BOUND)
    if spec.is_flow:
        flow.check_algorithm(algorithm)
    return Stream(str(path), cfg, model, names, spec, short_side, fps, algorithm, bound, device)


def clip_input(frames: np.ndarray, spec: PipelineSpec) -> torch.Tensor:
    """The network input of one video, as the data path builds it for ``spec``.

    ``frames``: (N, H, W, C) uint8, all of the modality's frames: RGB (C = 3), or for flow
    modalities the N quantised flow frames of a video of N + 1 RGB frames (C = 2, x then y).
    Returns (1, V, K, L, C, S, S) float32 in test mode (V test views), (1, K, L, C, S, S)
    otherwise (`clip_input_from`). Raises ValueError on a wrong shape.
    """
    if frames.ndim != 4 or frames.shape[-1] != spec.channels:
        raise ValueError(f"expected frames (N, H, W, {spec.channels}), got {tuple(frames.shape)}")
    n, h, w = frames.shape[:3]
    p = plan.plan_sample(spec, n + 1 if spec.is_flow else n, h, w)
    return clip_input_from(frames[p.frame_indices], p, spec)


def clip_input_from(sampled: np.ndarray, p: plan.SamplePlan, spec: PipelineSpec) -> torch.Tensor:
    """`clip_input` from the frames the plan ``p`` selects: ``sampled`` (K * Lf, H, W, C) uint8
    are the modality's frames at ``p.frame_indices``, whole; the plan's crop (val) or views
    (test) are cut, resized, mirrored and normalised by `finish.finish_frames`."""
    if spec.mode == "test":  # whole frames: finish_frames cuts the views
        out = finish_frames([torch.from_numpy(sampled)], torch.zeros((1, 5), dtype=torch.int64), spec)
    else:
        c = p.crop
        out = finish_frames([torch.from_numpy(sampled[:, c.y:c.y + c.height, c.x:c.x + c.width])],
                            torch.from_numpy(plan.crop_row(c))[None], spec)
    return to_snippets(out, spec)


@torch.no_grad()
def scores_of_input(stream: Stream, x: torch.Tensor) -> np.ndarray:
    """Pre-softmax video scores (C,) float32 of one video's network input (`clip_input`)."""
    return video_scores(stream.model, x.to(stream.device))[0].float().cpu().numpy()


def clip_scores(stream: Stream, frames: np.ndarray) -> np.ndarray:
    """Pre-softmax video scores (C,) float32 of all of one video's modality frames (`clip_input`)."""
    return scores_of_input(stream, clip_input(frames, stream.spec))


def flow_pair(prev: np.ndarray, nxt: np.ndarray, modality_name: str, algorithm: str, bound: float) -> np.ndarray:
    """The packer's flow frame of one RGB frame pair: (H, W, 2) uint8 quantised (x, y) planes.
    A fresh extractor per pair gives what the packer's one extractor over the whole video gives
    at that pair (OpenCV's flow objects keep no state between pairs), so only the sampled
    pairs need computing."""
    extractor = flow.FlowExtractor(algorithm, bound, (modality_name,))
    extractor.push(prev)
    return np.stack(extractor.push(nxt)[modality_name], axis=-1)


def flow_frames(rgb: np.ndarray, modality_name: str, algorithm: str, bound: float) -> np.ndarray:
    """The packer's flow of a whole video: (N - 1, H, W, 2) uint8 quantised (x, y) planes."""
    extractor = flow.FlowExtractor(algorithm, bound, (modality_name,))
    out = []
    for frame in rgb:
        item = extractor.push(frame)
        if item is not None:
            out.append(np.stack(item[modality_name], axis=-1))
    if not out:
        raise flow.FlowError(f"a video of {len(rgb)} frame(s) has no frame pair to compute flow from")
    return np.stack(out)


# A video whose decoded frames fit in this is decoded once and held; a longer one is decoded a
# second time keeping only the sampled frames (a 10 s clip at 340x256 is ~65 MB; an hour is ~23 GB).
MAX_HELD_FRAME_BYTES = 1 << 30


class VideoFrames:
    """The frames of one video at one (short side, fps) that the streams' plans ask for.

    ``num_frames``, ``height``, ``width`` come from a first full decode (frames are counted,
    never read from headers); ``frames(indices)`` returns (len, H, W, 3) uint8. Raises
    `VideoError` as `read_video_frames` does.
    """

    def __init__(self, path: str, short_side: int | None, fps: float | None, max_held_bytes: int | None = None):
        self.path, self.short_side, self.fps = path, short_side, fps
        max_held_bytes = MAX_HELD_FRAME_BYTES if max_held_bytes is None else max_held_bytes
        held, size = [], 0
        info_out: list = []
        for frame in read_video_frames(path, short_side, fps, info_out):
            if held is not None:
                held.append(frame)
                size += frame.nbytes
                if size > max_held_bytes:
                    held = None  # too long to hold: decode again for the sampled frames only
        info = info_out[0]
        self.num_frames, self.height, self.width = info.num_frames, info.height, info.width
        self._held = held
        self._picked: dict[int, np.ndarray] = {}

    def fetch(self, indices) -> None:
        """Decode again and keep the frames at ``indices`` (no-op when every frame is held)."""
        wanted = {int(i) for i in indices} - set(self._picked)
        if self._held is not None or not wanted:
            return
        last = max(wanted)
        for i, frame in enumerate(read_video_frames(self.path, self.short_side, self.fps)):
            if i in wanted:
                self._picked[i] = frame
            if i >= last:
                break
        if not wanted <= set(self._picked):
            raise VideoError(self.path, f"decoded {self.num_frames} frames the first time, fewer the second")

    def frames(self, indices) -> np.ndarray:
        """(len(indices), H, W, 3) uint8 frames at ``indices`` (`fetch` them first when not held)."""
        source = self._held if self._held is not None else self._picked
        return np.stack([source[int(i)] for i in indices])


def video_stream_scores(path: str, streams: Sequence[Stream]) -> list[np.ndarray]:
    """Each stream's scores (C,) of one video file.

    Decodes once per `Stream.decode_key` (twice for videos too long to hold), plans each stream's
    sample on the decoded frame count and size, and computes flow only for the sampled pairs,
    each pair once. Raises `VideoError`, `flow.FlowError` or ValueError.
    """
    videos: dict[tuple, VideoFrames] = {}
    plans = []
    wanted: dict[tuple, list[np.ndarray]] = {}
    for s in streams:
        if s.decode_key not in videos:
            videos[s.decode_key] = VideoFrames(path, s.short_side, s.fps)
        v = videos[s.decode_key]
        if s.spec.is_flow and v.num_frames < 2:
            raise flow.FlowError(f"a video of {v.num_frames} frame(s) has no frame pair to compute flow from")
        p = plan.plan_sample(s.spec, v.num_frames, v.height, v.width)
        plans.append(p)
        idx = p.frame_indices  # flow frame i is the pair of RGB frames (i, i + 1)
        wanted.setdefault(s.decode_key, []).append(np.concatenate([idx, idx + 1]) if s.spec.is_flow else idx)
    for key, parts in wanted.items():  # all streams' frames in one more decode (videos too long to hold)
        videos[key].fetch(np.concatenate(parts))
    pairs: dict[tuple, np.ndarray] = {}
    out = []
    for s, p in zip(streams, plans):
        v = videos[s.decode_key]
        if s.spec.is_flow:
            sampled = []
            for i in p.frame_indices.tolist():
                key = (s.decode_key, s.spec.modality, s.flow_algorithm, s.flow_bound, i)
                if key not in pairs:
                    prev, nxt = v.frames([i, i + 1])
                    pairs[key] = flow_pair(prev, nxt, s.spec.modality, s.flow_algorithm, s.flow_bound)
                sampled.append(pairs[key])
            sampled = np.stack(sampled)
        else:
            sampled = v.frames(p.frame_indices)
        out.append(scores_of_input(s, clip_input_from(sampled, p, s.spec)))
    return out


@dataclass
class Prediction:
    """One video's outcome: ``scores`` (C,) fused pre-softmax scores, or ``error``."""

    video: str
    scores: np.ndarray | None = None
    error: str | None = None

    def top_k(self, class_names: Sequence[str], k: int) -> list[dict]:
        """The k best classes: ``[{"class", "index", "score", "probability"}]``, best first;
        probability = softmax of the (fused) scores."""
        s = self.scores.astype(np.float64)
        p = np.exp(s - s.max())
        p /= p.sum()
        order = np.argsort(-s, kind="stable")[:k]
        return [{"class": class_names[i], "index": int(i), "score": float(s[i]), "probability": float(p[i])}
                for i in order]


def check_streams(streams: Sequence[Stream]) -> list[str]:
    """The class names the streams share; ValueError naming the checkpoints when they differ."""
    first = streams[0]
    for s in streams[1:]:
        if s.class_names != first.class_names:
            raise ValueError(f"{s.path} and {first.path} have different classes "
                             f"({len(s.class_names)} vs {len(first.class_names)}; fusion needs the same label set)")
    return first.class_names


def predict_videos(videos: Sequence[str], streams: Sequence[Stream], *, weights: Sequence[float] | None = None,
                   softmax: bool = False, on_result: Callable[[Prediction], None] | None = None
                   ) -> list[Prediction]:
    """Score each video with every stream and fuse (`tsn.scores.fuse_scores`; ``weights``
    default `tsn.scores.default_weights`). A video that cannot be decoded, has no flow or is
    too short gets ``error`` (the reason) and the others are still predicted. ``on_result`` is
    called with each prediction as soon as it is made."""
    if not streams:
        raise ValueError("no checkpoint given")
    weights = tuple(weights) if weights else default_weights(len(streams))
    if len(weights) != len(streams):
        raise ValueError(f"{len(streams)} checkpoints but {len(weights)} weights")
    check_streams(streams)
    out = []
    for video in videos:
        try:
            per_stream = video_stream_scores(str(video), streams)
            dicts = [{"sample_index": np.zeros(1, np.int64), "label": np.zeros(1, np.int64), "scores": s[None]}
                     for s in per_stream]
            fused = fuse_scores(dicts, weights, softmax=softmax)[2][0]
            pred = Prediction(str(video), scores=fused.astype(np.float32))
        except VideoError as e:
            pred = Prediction(str(video), error=e.reason)
        except (flow.FlowError, ValueError) as e:
            pred = Prediction(str(video), error=str(e))
        out.append(pred)
        if on_result is not None:
            on_result(pred)
    return out


def describe(stream: Stream) -> str:
    """One line: what a stream computes."""
    s = stream.spec
    views = s.num_views if s.mode == "test" else 1
    return (f"{Path(stream.path).name}: {s.modality}, {s.num_segments} segments x {views} view(s) of "
            f"{s.crop.input_size} px, decoded at short side {stream.short_side}"
            + (f", flow {stream.flow_algorithm}" if s.is_flow else ""))
