"""Typed, frozen run configuration loaded from YAML, with dotted command-line overrides.

    cfg = load_config("configs/default.yaml", ["optim.lr=0.01", "data.shards=/data/ucf"])

Every section is a frozen model; unknown keys and wrong types fail before any work starts,
naming the key's full path (``model.num_segmnets: unknown key; known keys here: ...``,
``optim.lr: expected a number, got 'abc'``). The resolved config is written beside every run
(`dump_config`) and stored in every checkpoint (`config_to_dict` / `config_from_dict`).

Why pydantic: the sections used to be dataclasses checked by a hand-written coercer that walked
type hints, Optional arms and tuples itself. Pydantic's strict mode has exactly the rules a
config file wants (a bool is not an int, an int is a valid float, no string-to-number
guessing), ``extra="forbid"`` and ``frozen=True`` come with it, and every error carries its
location; this module only declares the fields with their value rules (`Annotated` validators
beside each field) and translates a `ValidationError` into the one-line message users see
(`_message`).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from dataloading.modality import FLOW, MODALITIES, RGB_DIFF
from dataloading.modality import get as get_modality
from dataloading.store.files import atomic_write_text


class ConfigError(ValueError):
    """A bad config: the message names the file (when there is one) and the key path."""


# --- value rules: each error reads "<key path>: must be <rule>, got <value>" ---------------

def _shown(value):
    return list(value) if isinstance(value, tuple) else value


def _must(ok: Callable[[Any], bool], rule: str) -> AfterValidator:
    """A value rule checked after the type: ``ok(value)`` or "must be <rule>, got <value>"."""

    def check(value):
        if not ok(value):
            raise ValueError(f"must be {rule}, got {_shown(value)}")
        return value

    return AfterValidator(check)


def _one_of(*choices: str) -> AfterValidator:
    def check(value):
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    return AfterValidator(check)


def _tuple_from_list(value):
    # YAML gives lists; sections hold tuples (frozen, hashable), and strict mode takes only tuples.
    return tuple(value) if isinstance(value, list) else value


Count = Annotated[int, _must(lambda v: v >= 1, ">= 1")]
NonNegativeInt = Annotated[int, _must(lambda v: v >= 0, ">= 0")]
NonNegativeFloat = Annotated[float, _must(lambda v: v >= 0, ">= 0")]
Fraction = Annotated[float, _must(lambda v: 0 <= v < 1, "in [0, 1)")]  # [0, 1)
Floats = Annotated[tuple[float, ...], BeforeValidator(_tuple_from_list)]
Ints = Annotated[tuple[int, ...], BeforeValidator(_tuple_from_list)]


class _Section(BaseModel):
    # allow_inf_nan=False: a YAML .nan / .inf (or one inside a list) is refused at load, naming
    # the key, instead of surfacing as a NaN loss or a crash at the first step.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


# --- the sections ---------------------------------------------------------------------------

EMBEDDED_SHARDS = "data/synth-packed"  # the embedded default's dataset: `DataConfig.uses_embedded_dataset`


class DataConfig(_Section):
    shards: str = EMBEDDED_SHARDS  # a directory written by `tsn pack`
    train_split: str = "train"
    val_split: str = "val"
    # Embedded default: generated with `tsn synth` and packed on first use when `shards` is missing.
    synth_dir: str = "data/synth"
    synth_classes: Count = 6
    synth_videos_per_class: Count = 40
    synth_seed: int = 0
    pack_short_side: Count = 64
    val_fraction: Fraction = 0.25
    # Node-local cache of s3:// shards (`dataloading.store.cache`, `dataloading.store.streamer`): each rank's
    # shards are fetched whole, in the order it reads them, a few ahead, once per node; later
    # epochs read the local copies. null: every epoch reads the sampled frames in place (ranged
    # GETs, no local disk). The directory is shared by every rank and run on the node (local
    # disk, not a shared volume).
    cache_dir: Annotated[str | None, _must(lambda v: v is None or (v != "" and "://" not in v),
                                           "a local directory or null")] = None
    # copies beyond this are evicted, the one needed again furthest in the future first
    cache_size_bytes: Count = 100 << 30
    fetch_ahead_shards: NonNegativeInt = 2  # shards fetched beyond the one being read
    fetch_requests_in_flight: Count = 4  # ranged GETs of whole-shard parts at once, per process
    fetch_part_bytes: Count = 64 << 20  # whole-shard part size (memory: in flight x part)
    # Sample reads in flight per loader (the sampled frames' byte ranges); null: 2 for local
    # files and cached copies, 32 for ranged GETs from object storage (a round trip each).
    read_requests_in_flight: Annotated[int | None, _must(lambda v: v is None or v >= 1, ">= 1 or null")] = None
    # Training order: 0 reshuffles the shards every epoch; N > 0 keeps a canonical shard order
    # in blocks of N shards, reshuffled inside each block (`order.epoch_order`), so a node reads
    # nearly the same shards every epoch and a cache of its share holds them (no re-downloads)
    order_shard_block: NonNegativeInt = 0

    @property
    def uses_embedded_dataset(self) -> bool:
        """True when `shards` is the embedded default's directory, which the driver generates
        and packs when it is missing (or of another recipe); any other path must already hold a
        packed dataset."""
        return self.shards == EMBEDDED_SHARDS


class AugmentConfig(_Section):
    # The embedded default trains small (56 px crops of frames stored at short side 64) so
    # that it runs in minutes on a CPU; the paper's 224-of-256 is in configs/ucf101_*.yaml.
    input_size: int = 56
    scales: Floats = (1.0, 0.875, 0.75, 0.66)
    max_distort: int = 1
    more_fix_crop: bool = True
    resize_short: int = 64  # the stored short side the crop fractions refer to (eval crop = input/resize)
    # Horizontal flip (train) and flipped test views; off where classes are defined by
    # direction, as in the synthetic dataset's left/right and clockwise/counter-clockwise.
    flip: bool = False  # the embedded synthetic default; the paper (configs/ucf101_*.yaml): true
    # Input normalisation belongs to the backbone's weights (`tsn.backbones.weights_preprocessing`:
    # BN-Inception BGR 0..255 minus [104, 117, 128], std 1; timm models their pretrained_cfg;
    # tiny ImageNet statistics), resolved by `app.preprocessing`. null: the backbone's. Set, these
    # override it: mean / std per colour channel on the 0..1 scale in `channel_order`, channel_order
    # RGB or BGR. Flow and RGB difference derive theirs (flow: minus 128 over 255 x mean(std)).
    mean: Annotated[Floats, _must(lambda v: len(v) == 3, "3 values (one per colour channel)")] | None = None
    std: Annotated[Floats, _must(lambda v: len(v) == 3 and min(v) > 0, "3 values > 0")] | None = None
    channel_order: Annotated[str, _one_of("RGB", "BGR")] | None = None


class LoaderConfig(_Section):
    device: Annotated[str, _one_of("cpu", "gpu")] = "cpu"  # 'gpu': DALI 'mixed' decoding (nvJPEG / NVDEC) on the worker's GPU
    num_threads: Count = 2
    prefetch_queue_depth: Count = 2
    # Flow streams: 'packed' reads the flow computed by `tsn pack --modalities ...,flow`;
    # 'dali' computes it on the fly from the RGB frames with DALI's fn.optical_flow (NVIDIA
    # optical-flow hardware: device gpu and model.modality flow only; untested without a GPU).
    flow_source: Annotated[str, _one_of("packed", "dali")] = "packed"
    # Seconds per input stage (read, plan, read wait, decode, finish: dataloading.pipeline.stage_times),
    # exported as tsn_input_stage_seconds_total and printed by `tsn stream`. Costs a timer call
    # per read and per stage (tsn bench-loader measures it); false turns it off.
    stage_timing: bool = True


class TemporalShiftConfig(_Section):
    # TSM (Lin et al., ICCV 2019; `tsn.temporal_shift`): 1/fold_div of the channels move one
    # segment forward and 1/fold_div one segment back inside every residual block. 0: TSN.
    # The paper's setting: fold_div 8, place blockres. ResNet-style timm backbones only.
    fold_div: Annotated[int, _must(lambda v: v == 0 or v >= 2, "0 (off) or >= 2")] = 0
    place: Annotated[str, _one_of("blockres", "block")] = "blockres"


class ModelConfig(_Section):
    # The embedded default trains a small CNN from scratch on the synthetic dataset, whose
    # classes are told apart by motion: RGB difference over 5 frames, dropout 0.5 (the paper's
    # 0.8 is for ImageNet-pretrained nets), no partial BN (it freezes statistics of a
    # *pretrained* net; random ones are worthless). 'small', not 'tiny': rotation and looming
    # need its 31 px receptive field (tsn.backbones.TinyCNN). It reaches ~0.9 top-1 (chance
    # 0.17) in under a minute of CPU training (README "Proof it learns"). The paper's
    # settings: configs/ucf101_*.yaml.
    backbone: str = "small"
    modality: Annotated[str, _one_of(*MODALITIES)] = RGB_DIFF  # the table: dataloading.modality
    consensus: Annotated[str, _one_of("avg", "max", "weighted")] = "avg"
    num_segments: Count = 3
    snippet_length: Count = 5  # frames (rgb: always 1), differences (rgb_diff) or flow pairs (flow)
    test_segments: Count = 25
    dropout: Fraction | None = 0.5  # None: the modality's default (0.8 RGB streams, 0.7 flow streams)
    partial_bn: bool = False
    # ImageNet weights for the backbone: 'imagenet' (the published ones: timm's Hugging Face Hub
    # cache, BN-Inception the authors' file via torch.hub's cache; nothing is downloaded when
    # HF_HUB_OFFLINE is set) or a LOCAL weights file; applied only when a run starts.
    pretrained: str | None = None
    # Cross-modality pre-training from a trained RGB TSN: a LOCAL checkpoint (`tsn train` output
    # or a bare state dict) whose weights seed this model (first conv mean-replicated for
    # rgb_diff / flow; fc copied when the class count matches). Applied after `pretrained`,
    # only when a run starts (a resumed run keeps its own weights).
    init_from: str | None = None
    temporal_shift: TemporalShiftConfig = Field(default_factory=TemporalShiftConfig)

    @model_validator(mode="after")
    def _snippet_length_fits_the_modality(self) -> ModelConfig:
        get_modality(self.modality).check_snippet_length(self.snippet_length)  # rgb: 1
        return self

    @model_validator(mode="after")
    def _temporal_shift_needs_a_resnet(self) -> ModelConfig:
        if self.temporal_shift.fold_div:
            from tsn.temporal_shift import check_backbone  # torch + timm: only when TSM is asked for

            try:
                check_backbone(self.backbone)
            except ValueError as e:
                raise ValueError(f"temporal_shift.fold_div={self.temporal_shift.fold_div} with backbone {self.backbone!r}: {e}") from None
        return self


class TrainConfig(_Section):
    epochs: Count = 60  # the embedded default: 60 epochs of 180 videos, lr / 10 at 40 and 52
    batch_size_per_worker: Count = 8  # videos per optimizer step on one worker (global = x workers)
    # max total L2 norm of the gradients; None: no clipping
    clip_grad_norm: Annotated[float, _must(lambda v: v > 0, "> 0 or null")] | None = 40.0
    # The final test protocol (model.test_segments x 10 crops per video) holds 250 snippets per
    # video in memory: a smaller batch than training.
    test_batch_size_per_worker: Count = 2
    device: Annotated[str, _one_of("auto", "cpu", "cuda")] = "auto"  # auto: cuda when available
    amp: bool = True  # mixed precision (autocast float16 + GradScaler); only ever used on CUDA
    log_every_n_steps: NonNegativeInt = 10  # step log lines of `tsn train --local`; 0: epoch lines only


class OptimConfig(_Section):
    """SGD with the authors' per-group policy (`tsn.practices.param_groups`) and a step schedule
    (`tsn.schedule`): lr x lr_gamma at each epoch of ``lr_steps``, after a linear warmup of
    ``warmup_epochs`` (fractional allowed; per iteration)."""

    # the embedded default trains from scratch; the paper's fine-tuning: 0.001
    lr: Annotated[float, _must(lambda v: v > 0, "> 0")] = 0.05
    # Linear scaling rule: ``lr`` is the rate for a global batch of ``lr_reference_batch``
    # videos; the run uses lr * (batch_size_per_worker * workers) / lr_reference_batch.
    # 0: no scaling, ``lr`` is used as given.
    lr_reference_batch: Annotated[int, _must(lambda v: v >= 0, ">= 0 (0: no scaling)")] = 0
    momentum: Fraction = 0.9
    weight_decay: NonNegativeFloat = 5e-4
    # epochs at which the lr is multiplied by lr_gamma. The embedded default steps at 2/3 and
    # ~7/8 of its 60 epochs, the shape of the paper's schedules (flow: /10 at 12k and 18k of
    # 20k iterations); a constant lr left its validation top-1 swinging by +-0.1 epoch to epoch.
    lr_steps: Annotated[Ints, _must(lambda s: list(s) == sorted(s) and all(e >= 1 for e in s),
                                    "increasing epochs >= 1")] = (40, 52)
    lr_gamma: Annotated[float, _must(lambda v: 0 < v <= 1, "in (0, 1]")] = 0.1
    warmup_epochs: NonNegativeFloat = 0.0
    # (weight, bias) lr multipliers of the first conv; null: the modality's (5, 10) for motion
    # modalities, (1, 2) for rgb (`tsn.practices.default_first_conv_lr_mult`).
    first_conv_lr_mult: Annotated[Floats, _must(lambda m: len(m) == 2, "[weight, bias]")] | None = None


class RunConfig(_Section):
    name: str = "tsn-default"
    seed: int = 0
    # Where runs live: RUN_DIR = storage_path/name unless `--run-dir` is given. Any pyarrow /
    # fsspec URI (s3://, gs://) works for the Ray job's checkpoints.
    storage_path: str = "runs"


class CheckpointConfig(_Section):
    every_n_steps: NonNegativeInt = 0  # 0: only at epoch ends
    keep_last: Count = 2
    keep_best: bool = True  # also keep the best by val top-1
    # Write and store checkpoints in the background (app.checkpoint_writer): the loop waits only
    # for the host copy; false: it waits until each is stored and committed (the old behaviour).
    background: bool = True


def _worker_count(value):
    """``cluster.num_workers``: an integer N >= 1 (a fixed group) or ``[min, max]`` with
    1 <= min <= max (an elastic group, Ray Train's ``ScalingConfig(num_workers=(min, max))``)."""
    if isinstance(value, list):  # YAML gives lists; the section holds a tuple (frozen, hashable)
        value = tuple(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"must be >= 1 (or [min, max]), got {value}")
        return value
    if not (isinstance(value, tuple) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"must be an integer >= 1 or a list of two integers [min, max], got {_shown(value)!r}")
    if value[0] < 1:
        raise ValueError(f"[min, max]: min must be >= 1, got {list(value)}")
    if value[0] > value[1]:
        raise ValueError(f"[min, max]: min must be <= max, got {list(value)}")
    return value


class ClusterConfig(_Section):
    # N: a fixed group of N workers; [min, max]: an elastic group (Ray Train V2): it starts with
    # as many workers as the cluster has room for (at least min, waiting for them otherwise),
    # restarts on the survivors from the last checkpoint when a node is lost, and grows at the
    # next resize check when resources appear (docs/kubernetes.md, "Preemption").
    num_workers: Annotated[int | tuple[int, int], BeforeValidator(_worker_count)] = 2
    # Elastic groups: how often a healthy group checks whether more workers would fit (a resize
    # restarts the group from the last checkpoint, so checking often costs nothing but growing
    # does: steps since that checkpoint are redone). Ray's default.
    elastic_resize_monitor_interval_s: Annotated[float, _must(lambda v: v > 0, "> 0")] = 60.0
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, _must(lambda v: v > 0, "> 0")] = 1.0
    max_failures: Annotated[int, _must(lambda v: v >= -1, ">= -1 (-1: unlimited)")] = 1
    # A SIGTERM'd worker (a pod ending, a spot reclaim) checkpoints at its current step and the
    # group restarts from there (app.preemption, cluster.preemption); Ray Train restarts it
    # anyway this long after the SIGTERM, checkpoint or not. Within Kubernetes'
    # terminationGracePeriodSeconds (30 s by default; the manifests say 60), with the time of a
    # step and a checkpoint to spare. A preemption is not one of max_failures.
    preemption_grace_s: Annotated[float, _must(lambda v: v > 0, "> 0")] = 25.0

    @property
    def elastic(self) -> bool:
        """True for ``num_workers: [min, max]``."""
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        """The largest group: what a fixed group always has, the size an elastic one grows to."""
        return self.num_workers[1] if self.elastic else self.num_workers


def _is_ip_address(value: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


class MetricsConfig(_Section):
    # base port: a worker serves on port + local rank (a port in use: a free one instead, logged
    # and registered in the file-SD entry); 0 disables
    port: Annotated[int, _must(lambda v: 0 <= v <= 65535, "in [0, 65535]")] = 9450
    # The address the endpoints listen on. They are unauthenticated and expose the run name, the
    # node, rank, loss, lr, throughput and checkpoint times. null: all interfaces (0.0.0.0)
    # inside a Kubernetes pod (KUBERNETES_SERVICE_HOST set: Prometheus scrapes the pod IP),
    # loopback (127.0.0.1) elsewhere; set 0.0.0.0 for a Prometheus on another machine.
    bind_address: Annotated[str, _must(_is_ip_address, "an IP address (0.0.0.0: all interfaces, "
                                                        "127.0.0.1: this machine only) or null")] | None = None


class TrackingConfig(_Section):
    # Experiment tracking (app.tracking), rank 0, both off by default. MLflow: a tracking server
    # URI (http://mlflow:5000) or a local store (file:///path, sqlite:///mlflow.db); params = the
    # resolved config, metrics per step and epoch, artifacts = results.json, the plots and the
    # best checkpoint's location; a resumed run continues its MLflow run.
    mlflow_uri: str | None = None
    mlflow_experiment: str = "tsn"
    # TensorBoard event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR`).
    tensorboard: bool = False
    # Step metrics go to the trackers every this many steps (epoch metrics always).
    log_every_n_steps: Count = 10


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check_across_sections(self) -> Config:
        # Runs only when every section passed its own checks.
        if self.loader.flow_source == "dali":
            if self.loader.device != "gpu":
                raise ValueError("loader.flow_source: 'dali' runs fn.optical_flow on the GPU; it needs "
                                 "loader.device=gpu (on CPU use the flow computed at packing: 'packed')")
            if self.model.modality != FLOW:
                raise ValueError(f"loader.flow_source: 'dali' computes plain optical flow only (model.modality "
                                 f"flow), not {self.model.modality!r}; warped flow is computed at packing")
        return self


# --- pydantic's errors as the messages users see ----------------------------------------------

_EXPECTED = {  # pydantic's strict-mode type errors -> what the YAML value should have been
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true/false",
    "string_type": "a string",
    "tuple_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
}


def _locate(loc: tuple) -> tuple[type[BaseModel], int]:
    """The deepest section class along ``loc`` and how many loc parts lead to it: ``loc[i]`` (if
    any) is a key of that section, ``loc[i + 1:]`` item indices inside the key's value."""
    cls, i = Config, 0
    while i < len(loc):
        field = cls.model_fields.get(loc[i]) if isinstance(loc[i], str) else None
        inner = field.annotation if field is not None else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            break
        cls, i = inner, i + 1
    return cls, i


def _type_name(annotation) -> str:
    """``float | None`` / ``tuple[float, ...] | None``: an annotation without its validators."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation is type(None):
        return "None"
    return annotation.__name__ if typing.get_origin(annotation) is None else str(annotation)


def _value_at(data, keys: tuple):
    for key in keys:
        data = data[key]
    return data


def _position(data, keys: tuple) -> int:
    """Where the last of ``keys`` was written in its mapping of ``data`` (the error order users
    expect: the first bad key they wrote)."""
    if not keys:
        return 0
    try:
        return list(_value_at(data, keys[:-1])).index(keys[-1])
    except (KeyError, TypeError, IndexError, ValueError):
        return len(Config.model_fields) + 10**6


def _loc(error: dict) -> tuple:
    # A non-string YAML key (invalid_key) comes as the key's str() or int(); the error's input is the key.
    loc = tuple(error["loc"])
    return loc[:-1] + (error["input"],) if error["type"] == "invalid_key" else loc


def _order(error: dict, data: dict) -> tuple:
    # By section as written; in it type errors (keys as written) before value rules (which see
    # typed values; fields in declaration order), then list items.
    loc = _loc(error)
    items = tuple(p if isinstance(p, int) else 0 for p in loc[2:])
    if error["type"] != "value_error":
        return _position(data, loc[:1]), False, _position(data, loc[:2]), items
    section, i = _locate(loc)
    fields = list(section.model_fields)
    return _position(data, loc[:1]), True, fields.index(loc[i]) if i < len(loc) else len(fields), items


def _message(error: dict, data: dict) -> str:
    """One pydantic error as ``<dotted key path>: <what is wrong>``."""
    loc, kind = _loc(error), error["type"]
    section, i = _locate(loc)
    path = ".".join(str(p) for p in loc[: i + 1]) + "".join(f"[{p}]" for p in loc[i + 1:])
    if kind in ("extra_forbidden", "invalid_key"):  # invalid_key: a non-string YAML key
        return f"{path}: unknown key; known keys here: {', '.join(section.model_fields)}"
    if kind == "value_error":  # a value rule (field) or a check across the fields of a section
        text = str(error["ctx"]["error"])
        if i < len(loc):
            return f"{path}: {text}"
        return f"{path}.{text}" if path else text
    if kind == "finite_number":  # also inside an optional value or a list: name the item
        return f"{path}: must be a finite number, got {error['input']!r}"
    field = section.model_fields.get(loc[i]) if i < len(loc) else None
    if field is not None and type(None) in typing.get_args(field.annotation):
        key_path = ".".join(str(p) for p in loc[: i + 1])  # an optional value is named as a whole
        return f"{key_path}: expected {_type_name(field.annotation)}, got {_value_at(data, loc[: i + 1])!r}"
    if kind in _EXPECTED:
        return f"{path}: expected {_EXPECTED[kind]}, got {error['input']!r}"
    return f"{path}: {error['msg']}"


# --- loading, overrides, saving ---------------------------------------------------------------

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
    """Validate a plain mapping of sections (YAML data, a checkpoint's config) after applying
    ``a.b=value`` overrides; a ConfigError names ``source`` (when given) and the first bad key."""
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
        return Config.model_validate(data)
    except ValidationError as e:
        first = min(e.errors(include_url=False), key=lambda error: _order(error, data))
        message = _message(first, data)
        raise ConfigError(f"{source}: {message}" if source else message) from None


def _check_duplicate_keys(node, path, keys: tuple = ()) -> None:
    """Fail on a key written twice in one mapping of a YAML file (PyYAML keeps the last one
    silently, so the value the user reads first would not be the one used); names the dotted key
    and both lines (1-based)."""
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None:
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(f"{path}:{line}: {'.'.join((*keys, key))}: key given twice (first on line "
                                      f"{seen[key]}); keep one")
                seen[key] = line
            _check_duplicate_keys(value_node, path, (*keys, str(key)))
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, path, keys)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (None: the embedded defaults) and apply ``a.b=value`` overrides."""
    data = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        text = p.read_text()
        try:
            _check_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    return config_from_dict(data, overrides, str(path) if path else None)


def config_to_dict(cfg: Config) -> dict:
    """``{section: {key: value}}`` of plain YAML/JSON values (tuples as lists), in field order."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg.model_dump())


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
