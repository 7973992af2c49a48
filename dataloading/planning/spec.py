"""What a data pipeline produces: `PipelineSpec`, the one value the DALI graph, the per-sample
plan, the torch finishing step and the reference loader are all built from.

Plain data and checks, no DALI: the config adapter (`app.pipeline`) and the reference loader
build specs without touching the graph. Modality facts (channels, frames per snippet, flow or
not) come from the modality table (`dataloading.modality`); the flow normalisation from the
flow storage format (`dataloading.sources.flow`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dataloading import modality
from dataloading.planning import augment
from dataloading.planning.preprocessing import IMAGENET_MEAN, IMAGENET_STD, check_channel_order, normalisation_255

MODES = ("train", "val", "test")
FLOW_SOURCES = ("packed", "dali")
DEVICES = ("cpu", "gpu")
RESIZE_BACKENDS = ("auto", "dali", "torch")


@dataclass(frozen=True)
class PipelineSpec:
    """What a pipeline produces. Frames per snippet read from storage = ``frames_per_snippet``
    (``snippet_length + 1`` for rgb_diff, whose L differences need L+1 frames; for flow
    modalities, L flow frames of C = 2 planes). ``mean``/``std`` are the colour statistics (0..1
    scale) in ``channel_order``, the order of the colour channels of the output (``BGR``: the
    decoded RGB channels reversed; flow keeps x, y); the input conventions of backbones
    (`dataloading.planning.preprocessing`) map onto these three fields, and the flow and RGB-difference
    normalisation derive from them (`norm_mean_255`)."""

    mode: str = "train"
    num_segments: int = 3
    snippet_length: int = 1
    modality: str = "rgb"
    batch_size: int = 8
    crop: augment.CropSpec = field(default_factory=augment.CropSpec)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    device: str = "cpu"  # 'gpu': nvJPEG / NVDEC decoding ('mixed') and GPU augmentation
    num_threads: int = 2
    seed: int = 0
    order_shard_block: int = 0  # train order: shards in canonical blocks of this many (`order.epoch_order`)
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
        row = modality.get(self.modality)  # ValueError naming the known modalities
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        for name in ("num_segments", "snippet_length", "batch_size", "num_threads", "prefetch_queue_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        row.check_snippet_length(self.snippet_length)
        if self.resize_backend not in RESIZE_BACKENDS:
            raise ValueError(f"resize_backend must be 'auto', 'dali' or 'torch', got {self.resize_backend!r}")
        if self.order_shard_block < 0:
            raise ValueError(f"order_shard_block must be >= 0, got {self.order_shard_block}")
        if self.device == "gpu" and self.resize_backend == "torch":
            raise ValueError("resize_backend 'torch' finishes frames on the CPU; with device 'gpu' the graph "
                             "resizes on the GPU (resize_backend 'dali' or 'auto')")
        check_flow_source(self.flow_source, self.device, self.modality)
        check_channel_order(self.channel_order)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values (std > 0), got {list(self.mean)}, {list(self.std)}")

    @property
    def modality_row(self) -> modality.Modality:
        """This spec's row of the modality table."""
        return modality.get(self.modality)

    @property
    def dali_flow(self) -> bool:
        """Flow computed in the graph from RGB frames (`fn.optical_flow`) instead of read."""
        return self.is_flow and self.flow_source == "dali"

    @property
    def stored_modality(self) -> str:
        """The shard entries this spec reads: the RGB frames when DALI computes the flow."""
        return modality.RGB if self.dali_flow else self.modality

    @property
    def frames_per_snippet(self) -> int:
        return self.modality_row.frames_per_snippet(self.snippet_length)

    @property
    def is_flow(self) -> bool:
        return self.modality_row.is_flow

    @property
    def channels(self) -> int:
        """C per frame: 2 (x, y) for flow modalities, 3 (RGB) otherwise."""
        return self.modality_row.channels_per_frame

    @property
    def norm_mean_255(self) -> tuple[float, ...]:
        """Per-channel mean subtracted from 0..255 values: RGB ``255 * mean``; flow 128
        (`preprocessing.normalisation_255`)."""
        return normalisation_255(self.mean, self.std, self.is_flow)[0]

    @property
    def norm_std_255(self) -> tuple[float, ...]:
        """Per-channel divisor on the 0..255 scale: RGB ``255 * std``; flow ``255 * mean(std)``."""
        return normalisation_255(self.mean, self.std, self.is_flow)[1]

    @property
    def reverses_channels(self) -> bool:
        """Colour channels are fed in BGR order: the decoded RGB frames' channels reversed."""
        return self.channel_order == "BGR" and not self.is_flow

    @property
    def resolved_resize_backend(self) -> str:
        if self.resize_backend == "auto":
            return "dali" if self.device == "gpu" else "torch"
        return self.resize_backend

    @property
    def num_views(self) -> int:
        """Views per sample: the test views (`augment.test_crops`) in test mode, else 1."""
        if self.mode != "test":
            return 1
        return 2 * len(augment.TEST_CROP_POSITIONS) if self.crop.flip else len(augment.TEST_CROP_POSITIONS)


def check_flow_source(flow_source: str, device: str, modality_name: str) -> None:
    """Raise ValueError unless ``flow_source`` can serve ``modality_name`` on ``device``."""
    if flow_source not in FLOW_SOURCES:
        raise ValueError(f"flow_source must be one of {FLOW_SOURCES}, got {flow_source!r}")
    if flow_source == "dali":
        if device != "gpu":
            raise ValueError("flow_source 'dali' runs fn.optical_flow on NVIDIA optical-flow hardware: it needs "
                             "device 'gpu'; on CPU use the flow computed at packing (flow_source 'packed')")
        if modality_name != modality.FLOW:
            raise ValueError(f"flow_source 'dali' computes plain optical flow only (modality 'flow'), not "
                             f"{modality_name!r}: warped flow needs the homography estimated at packing")
