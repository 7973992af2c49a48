"""How pixels become model input: the input convention of a backbone's weights.

ImageNet weights were trained on inputs prepared one particular way, and a network only sees
what it was trained on when it is fed the same way (timm keeps this in each model's
``pretrained_cfg``; the authors' BN-Inception in its Caffe prototxt). A `Preprocessing` holds
it for the three colour channels:

* ``channel_order``: the order of the colour channels fed to the model, ``RGB`` or ``BGR``
  (the authors' BN-Inception, converted from Caffe, expects BGR);
* ``value_range``: the pixel scale ``mean`` and ``std`` refer to, 1.0 (pixels in 0..1, timm)
  or 255.0 (pixels in 0..255, the authors' BN-Inception);
* ``mean``, ``std``: per colour channel, in ``channel_order``, in ``value_range`` units.

A colour channel ``c`` of an 8-bit pixel ``p`` becomes ``(p / 255 * value_range - mean[c]) /
std[c]``, i.e. ``(p - mean_255[c]) / std_255[c]`` on the 0..255 scale (`normalisation_255`).
The motion modalities derive theirs from the same statistics, the one rule of the data path:

* ``rgb_diff``: each frame is normalised like RGB, then consecutive frames are subtracted, so
  the mean cancels and the differences are scaled by 1 / std (BN-Inception, std 1: the
  differences are not normalised, as in the authors' code);
* ``flow`` / ``warped_flow``: x and y planes minus 128 (zero flow, `FLOW_MEAN_255`),
  divided by the mean of the colour std on the 0..255 scale (BN-Inception: minus 128, std 1,
  the authors' flow convention; ImageNet statistics: 255 x 0.226), in x, y order whatever the
  colour order.

The resolved preprocessing of a run is recorded in its checkpoints (`record`), so evaluation
and prediction feed the network as training did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dataloading import modality as modalities

CHANNEL_ORDERS = ("RGB", "BGR")
VALUE_RANGES = (1.0, 255.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The authors' flow mean (Caffe / BN-Inception): 128 on the 0..255 scale; zero flow quantises
# to exactly 128 (`dataloading.sources.flow.quantize`).
FLOW_MEAN_255 = 128.0


def check_channel_order(order: str) -> str:
    if order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {', '.join(CHANNEL_ORDERS)}, got {order!r}")
    return order


def normalisation_255(mean_01: Sequence[float], std_01: Sequence[float], is_flow: bool
                      ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per input channel on the 0..255 scale, from the colour statistics on the
    0..1 scale: colour ``255 * mean``, ``255 * std`` (3 values); flow (x, y) 128 and
    ``255 * mean(std)`` (2 values). The one normalisation rule of every data path."""
    if is_flow:
        return (FLOW_MEAN_255,) * 2, (255.0 * sum(std_01) / len(std_01),) * 2
    return tuple(255.0 * m for m in mean_01), tuple(255.0 * s for s in std_01)


@dataclass(frozen=True)
class Preprocessing:
    """A backbone's input convention (module docstring). ``source`` says where it came from."""

    channel_order: str = "RGB"
    value_range: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = ""

    def __post_init__(self):
        check_channel_order(self.channel_order)
        if float(self.value_range) not in VALUE_RANGES:
            raise ValueError(f"value_range must be 1 (pixels in 0..1) or 255 (0..255), got {self.value_range}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3:
                raise ValueError(f"{name} needs one value per colour channel (3), got {list(values)}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {list(self.std)}")
        object.__setattr__(self, "value_range", float(self.value_range))

    @property
    def mean_01(self) -> tuple[float, ...]:
        """``mean`` on the 0..1 pixel scale (what `PipelineSpec.mean` holds)."""
        return tuple(m / self.value_range for m in self.mean)

    @property
    def std_01(self) -> tuple[float, ...]:
        return tuple(s / self.value_range for s in self.std)

    def with_overrides(self, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       channel_order: str | None = None) -> Preprocessing:
        """This convention with explicit replacements: ``mean`` / ``std`` on the 0..1 scale (as
        the config's ``augment.mean`` / ``augment.std``), ``channel_order``. None keeps a value;
        with any override the result is on the 0..1 scale."""
        if mean is None and std is None and channel_order is None:
            return self
        changed = [n for n, v in (("mean", mean), ("std", std), ("channel_order", channel_order)) if v is not None]
        return Preprocessing(channel_order=channel_order or self.channel_order, value_range=1.0,
                             mean=tuple(mean) if mean is not None else self.mean_01,
                             std=tuple(std) if std is not None else self.std_01,
                             source=f"{self.source}; {', '.join(changed)} from the config".lstrip("; "))

    def input_normalisation(self, modality_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per input channel of one frame of ``modality_name`` on the 0..255 scale
        (3 colour channels in ``channel_order``, or flow x, y)."""
        return normalisation_255(self.mean_01, self.std_01, modalities.get(modality_name).is_flow)

    def record(self, modality_name: str) -> dict:
        """A plain, JSON-able record of this convention for ``modality_name`` (checkpoint meta):
        the convention plus what the data path applies per input channel (``input_mean_255``,
        ``input_std_255``: informative; `from_record` reads the convention)."""
        mean_255, std_255 = self.input_normalisation(modality_name)
        return {"channel_order": self.channel_order, "value_range": self.value_range, "mean": list(self.mean),
                "std": list(self.std), "source": self.source, "modality": modality_name,
                "input_mean_255": list(mean_255), "input_std_255": list(std_255)}

    @classmethod
    def from_record(cls, record: Mapping, where: str = "preprocessing record") -> Preprocessing:
        """The `Preprocessing` of a `record` (a checkpoint's ``meta['preprocessing']``);
        ValueError naming ``where`` and the key when it is incomplete or invalid."""
        if not isinstance(record, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(record).__name__}")
        missing = [k for k in ("channel_order", "value_range", "mean", "std") if k not in record]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        try:
            return cls(channel_order=record["channel_order"], value_range=float(record["value_range"]),
                       mean=tuple(record["mean"]), std=tuple(record["std"]), source=str(record.get("source", "")))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
