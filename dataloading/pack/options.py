"""What a pack is made with: `PackOptions` (validated), `PackError`, the output file names and
human-readable sizes (`parse_size`, `format_size`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dataloading import modality
from dataloading.format import shards
from dataloading.sources import flow

FORMAT_VERSION = 1
OPTIONS_FILE = "_options.json"
JOURNAL_FILE = "_journal.jsonl"
REJECTED_FILE = "rejected.jsonl"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = "_lock"
# Options missing from an `_options.json` written before they existed, with the value they had.
LEGACY_OPTIONS = {"modalities": [modality.RGB], "flow_algorithm": None, "flow_bound": None}

DEFAULT_SHARD_SIZE_BYTES = 256 * 2**20


def shard_name(split: str, number: int) -> str:
    """A shard's file name without ``.tar``: ``train-000003``."""
    return f"{split}-{number:06d}"


class PackError(ValueError):
    """A user-facing packing failure (bad options, options mismatch, nothing usable)."""


@dataclass(frozen=True)
class PackOptions:
    """The options that determine shard contents; a resumed run must use the same ones."""

    codec: str
    short_side: int | None
    jpeg_quality: int
    gop: int
    fps: float | None
    min_frames: int
    seed: int
    # Motion modalities (`dataloading.sources.flow`), stored beside the RGB frames; the flow options
    # are None when no flow modality is packed (they do not affect an RGB-only pack).
    modalities: tuple[str, ...] = (modality.RGB,)
    flow_algorithm: str | None = None
    flow_bound: float | None = None

    @property
    def layout(self) -> str:
        return shards.CODEC_LAYOUT[self.codec]

    @property
    def flow_modalities(self) -> tuple[str, ...]:
        return tuple(m for m in self.modalities if m in modality.FLOW_MODALITIES)

    def validate(self) -> None:
        if self.codec not in shards.CODEC_LAYOUT:
            raise PackError(f"unknown codec {self.codec!r}; expected one of {', '.join(shards.CODEC_LAYOUT)}")
        if self.short_side is not None and self.short_side < 2:
            raise PackError(
                f"short_side must be >= 2 (or None to keep the source size), got {self.short_side}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise PackError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.gop < 1:
            raise PackError(f"gop must be >= 1, got {self.gop}")
        if self.fps is not None and not self.fps > 0:
            raise PackError(f"fps must be > 0 (or None to keep the source rate), got {self.fps}")
        if self.min_frames < 1:
            raise PackError(f"min_frames must be >= 1, got {self.min_frames}")
        unknown = [m for m in self.modalities if m not in modality.PACKABLE_MODALITIES]
        if unknown or not self.modalities:
            raise PackError(f"unknown modalities {unknown}; expected a list of "
                            f"{', '.join(modality.PACKABLE_MODALITIES)}")
        if len(set(self.modalities)) != len(self.modalities):
            raise PackError(f"modalities listed twice: {list(self.modalities)}")
        if modality.RGB not in self.modalities:
            # info/offsets and the sampling contract are defined on the RGB frames
            raise PackError(f"modalities must include rgb (flow frames are indexed by the RGB frames), "
                            f"got {list(self.modalities)}")
        if self.flow_modalities:
            if self.flow_algorithm not in flow.ALGORITHMS:
                raise PackError(f"unknown flow algorithm {self.flow_algorithm!r}; expected one of "
                                f"{', '.join(flow.ALGORITHMS)}")
            try:
                flow.check_algorithm(self.flow_algorithm)
            except flow.FlowError as e:
                raise PackError(str(e)) from None
            if self.flow_bound is None or not self.flow_bound > 0:
                raise PackError(f"flow bound must be > 0 pixels, got {self.flow_bound}")
            if self.min_frames < 2:
                raise PackError(f"flow needs videos of >= 2 frames: min_frames must be >= 2, got {self.min_frames}")


_SIZE_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _SIZE_UNITS[_p] = _SIZE_UNITS[_p + "b"] = 1000**_i  # decimal, like disk vendors and `ls --si`
    _SIZE_UNITS[_p + "ib"] = 1024**_i
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$")


def parse_size(text: str) -> int:
    """``"256MB"`` -> 256_000_000 bytes. Units (case-insensitive): none or ``B`` = bytes;
    ``k``/``KB`` = 10^3, ``M``/``MB`` = 10^6, ``G``/``GB`` = 10^9, ``T``/``TB`` = 10^12;
    ``KiB``/``MiB``/``GiB``/``TiB`` = powers of 2^10. Fractions allowed (``1.5GB``).
    The result must be a positive whole number of bytes."""
    m = _SIZE_RE.match(str(text).lower())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional unit, e.g. 256MB, 1GiB, 500k, 1048576"
        )
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if value < 1:
        raise ValueError(f"invalid size {text!r}: must be at least 1 byte")
    return int(round(value))


def format_size(num_bytes: float) -> str:
    """Human-readable decimal size: 1234567 -> '1.23 MB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(num_bytes) < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")
