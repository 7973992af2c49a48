"""Typed, frozen run configuration loaded from YAML, with dotted command-line overrides.

    cfg = load_config("configs/default.yaml", ["optim.lr=0.01", "data.shards=/data/ucf"])

Every section is a frozen dataclass; unknown keys and wrong types fail before any work starts,
naming the key's full path (``model.num_segmnets: unknown key; known: ...``). The resolved
config is written beside every run (`dump_config`) and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad config: the message names the file (when there is one) and the key path."""


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(choices)}; got {value!r}")


def _positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(obj, name)}")


@dataclass(frozen=True)
class DataConfig:
    shards: str = "data/synth-packed"  # a directory written by `tsn pack`
    train_split: str = "train"
    val_split: str = "val"
    # Embedded default: generated with `tsn synth` and packed on first use when `shards` is missing.
    synth_dir: str = "data/synth"
    synth_classes: int = 6
    synth_videos_per_class: int = 40
    synth_seed: int = 0
    pack_short_side: int = 64
    val_fraction: float = 0.25

    def __post_init__(self):
        _positive(self, "synth_classes", "synth_videos_per_class", "pack_short_side")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class AugmentConfig:
    # The embedded default trains small (56 px crops of frames stored at short side 64) so
    # that it runs in minutes on a CPU; the paper's 224-of-256 is in configs/ucf101_*.yaml.
    input_size: int = 56
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    max_distort: int = 1
    more_fix_crop: bool = True
    resize_short: int = 64  # the stored short side the crop fractions refer to (eval crop = input/resize)
    # Horizontal flip (train) and flipped test views; off where classes are defined by
    # direction, as in the synthetic dataset's left/right and clockwise/counter-clockwise.
    flip: bool = False  # the embedded synthetic default; the paper (configs/ucf101_*.yaml): true
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LoaderConfig:
    device: str = "cpu"  # 'gpu': DALI 'mixed' decoding (nvJPEG / NVDEC) on the worker's GPU
    num_threads: int = 2
    shuffle_buffer: int = 256
    prefetch_queue_depth: int = 2
    # Flow streams: 'packed' reads the flow computed by `tsn pack --modalities ...,flow`;
    # 'dali' computes it on the fly from the RGB frames with DALI's fn.optical_flow (NVIDIA
    # optical-flow hardware: device gpu and model.modality flow only; untested without a GPU).
    flow_source: str = "packed"

    def __post_init__(self):
        _one_of("device", self.device, ("cpu", "gpu"))
        _one_of("flow_source", self.flow_source, ("packed", "dali"))
        _positive(self, "num_threads", "shuffle_buffer", "prefetch_queue_depth")


@dataclass(frozen=True)
class ModelConfig:
    # The embedded default trains a tiny CNN from scratch on the synthetic dataset, whose
    # classes are told apart by motion: RGB difference over 5 frames, dropout 0.5 (the paper's
    # 0.8 is for ImageNet-pretrained nets), no partial BN (it freezes statistics of a
    # *pretrained* net; random ones are worthless). It reaches ~0.5-0.6 top-1 (chance 0.17) in
    # about a minute of CPU training. The paper's settings: configs/ucf101_*.yaml.
    backbone: str = "tiny"
    modality: str = "rgb_diff"  # rgb | rgb_diff | flow | warped_flow
    consensus: str = "avg"  # avg | max | weighted
    num_segments: int = 3
    snippet_length: int = 5  # frames (rgb), differences (rgb_diff) or flow pairs (flow)
    test_segments: int = 25
    dropout: float | None = 0.5  # None: 0.8 for RGB streams, 0.7 for flow streams
    partial_bn: bool = False
    pretrained: str | None = None  # a LOCAL weights file; nothing is downloaded
    # Cross-modality pre-training from a trained RGB TSN: a LOCAL checkpoint (`tsn train` output
    # or a bare state dict) whose weights seed this model (first conv mean-replicated for
    # rgb_diff / flow; fc copied when the class count matches). Applied after `pretrained`,
    # only when a run starts (a resumed run keeps its own weights).
    init_from: str | None = None

    def __post_init__(self):
        _one_of("modality", self.modality, ("rgb", "rgb_diff", "flow", "warped_flow"))
        _one_of("consensus", self.consensus, ("avg", "max", "weighted"))
        _positive(self, "num_segments", "snippet_length", "test_segments")
        if self.modality == "rgb" and self.snippet_length != 1:
            raise ValueError(f"snippet_length: must be 1 for modality rgb (one frame per snippet), "
                             f"got {self.snippet_length}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 25
    batch_size_per_worker: int = 8  # videos per optimizer step on one worker (global = x workers)
    clip_grad_norm: float | None = 40.0  # max total L2 norm of the gradients; None: no clipping
    # The final test protocol (model.test_segments x 10 crops per video) holds 250 snippets per
    # video in memory: a smaller batch than training.
    test_batch_size_per_worker: int = 2
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    amp: bool = True  # mixed precision (autocast float16 + GradScaler); only ever used on CUDA
    log_every_n_steps: int = 10  # step log lines of `tsn train --local`; 0: epoch lines only

    def __post_init__(self):
        _positive(self, "epochs", "batch_size_per_worker", "test_batch_size_per_worker")
        _one_of("device", self.device, ("auto", "cpu", "cuda"))
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm: must be > 0 or null, got {self.clip_grad_norm}")
        if self.log_every_n_steps < 0:
            raise ValueError(f"log_every_n_steps: must be >= 0, got {self.log_every_n_steps}")


@dataclass(frozen=True)
class OptimConfig:
    """SGD with the authors' per-group policy (`tsn.practices.param_groups`) and a step schedule
    (`tsn.schedule`): lr x lr_gamma at each epoch of ``lr_steps``, after a linear warmup of
    ``warmup_epochs`` (fractional allowed; per iteration)."""

    lr: float = 0.05  # the embedded default trains from scratch; the paper's fine-tuning: 0.001
    # Linear scaling rule: ``lr`` is the rate for a global batch of ``lr_reference_batch``
    # videos; the run uses lr * (batch_size_per_worker * workers) / lr_reference_batch.
    # 0: no scaling, ``lr`` is used as given.
    lr_reference_batch: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_steps: tuple[int, ...] = ()  # epochs at which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    # (weight, bias) lr multipliers of the first conv; null: (5, 10) for motion modalities,
    # (1, 2) for rgb (`tsn.practices.default_first_conv_lr_mult`).
    first_conv_lr_mult: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.lr_reference_batch < 0:
            raise ValueError(f"lr_reference_batch: must be >= 0 (0: no scaling), got {self.lr_reference_batch}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if list(self.lr_steps) != sorted(self.lr_steps) or any(e < 1 for e in self.lr_steps):
            raise ValueError(f"lr_steps: must be increasing epochs >= 1, got {list(self.lr_steps)}")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma: must be in (0, 1], got {self.lr_gamma}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        if self.first_conv_lr_mult is not None and len(self.first_conv_lr_mult) != 2:
            raise ValueError(f"first_conv_lr_mult: must be [weight, bias], got {list(self.first_conv_lr_mult)}")


@dataclass(frozen=True)
class RunConfig:
    name: str = "tsn-default"
    seed: int = 0
    # Where runs live: RUN_DIR = storage_path/name unless `--run-dir` is given. Any pyarrow /
    # fsspec URI (s3://, gs://) works for the Ray job's checkpoints.
    storage_path: str = "runs"


@dataclass(frozen=True)
class CheckpointConfig:
    every_n_steps: int = 0  # 0: only at epoch ends
    keep_last: int = 2
    keep_best: bool = True  # also keep the best by val top-1

    def __post_init__(self):
        if self.every_n_steps < 0:
            raise ValueError(f"every_n_steps: must be >= 0, got {self.every_n_steps}")
        _positive(self, "keep_last")


@dataclass(frozen=True)
class ClusterConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1

    def __post_init__(self):
        _positive(self, "num_workers")
        if self.max_failures < -1:
            raise ValueError(f"max_failures: must be >= -1 (-1: unlimited), got {self.max_failures}")


@dataclass(frozen=True)
class MetricsConfig:
    port: int = 9450  # base port: a worker serves on port + local rank; 0 disables

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self):
        # Checks across sections (each section checked its own fields already).
        if self.loader.flow_source == "dali":
            if self.loader.device != "gpu":
                raise ValueError("loader.flow_source: 'dali' runs fn.optical_flow on the GPU; it needs "
                                 "loader.device=gpu (on CPU use the flow computed at packing: 'packed')")
            if self.model.modality != "flow":
                raise ValueError(f"loader.flow_source: 'dali' computes plain optical flow only (model.modality "
                                 f"flow), not {self.model.modality!r}; warped flow is computed at packing")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, path: str):
    """Check/convert one YAML value against a field type; raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item, *rest) = typing.get_args(tp)
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported field type {tp}")


def _build(cls, data: dict, path: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise ConfigError(f"{full}: unknown key; known keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}.{e}" if path else str(e)) from e


def parse_override(text: str) -> tuple[list[str], object]:
    """``a.b=value`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    return parts, value


def config_from_dict(data: dict | None, overrides: list[str] = (), source: str | None = None) -> Config:
    data = dict(data or {})
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a section")
            else:
                child = node[p] = dict(child)
            node = child
        node[parts[-1]] = value
    try:
        return _build(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (None: the embedded defaults) and apply ``a.b=value`` overrides."""
    data = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    return config_from_dict(data, overrides, str(path) if path else None)


def config_to_dict(cfg) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {f.name: ({g.name: plain(getattr(getattr(cfg, f.name), g.name))
                      for g in dataclasses.fields(getattr(cfg, f.name))})
            for f in dataclasses.fields(cfg)}


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
