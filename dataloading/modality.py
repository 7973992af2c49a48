"""The modality table: everything that differs between TSN's four input modalities, in one place.

The config, the pipeline spec, the model, the practices and the shard format all read this
table; none keeps its own list of modalities or its own rule about them.

=============  ========  ======  ===============  ====================  ========  ==========
modality       channels  stored  frames read per  shard members         dropout   first-conv
               per frame (flow)  snippet of L     (besides info/json)   default   lr (w, b)
=============  ========  ======  ===============  ====================  ========  ==========
rgb            3         no      L (= 1)          frames/offsets|video  0.8       (1, 2)
rgb_diff       3         no      L + 1            frames/offsets|video  0.8       (5, 10)
flow           2         yes     L                flow.frames/offsets   0.7       (5, 10)
warped_flow    2         yes     L                warped_flow.frames/…  0.7       (5, 10)
=============  ========  ======  ===============  ====================  ========  ==========

* ``channels``: C of the model input layout (B, K, L, C, H, W); flow has x and y planes.
* ``frames read per snippet``: RGB difference needs L + 1 consecutive frames for its L
  differences; flow frame i is already the motion from RGB frame i to i + 1.
* ``dropout``: after global pooling, the paper's spatial (0.8) and temporal (0.7) values.
* ``first-conv lr``: (weight, bias) multipliers; the authors' flow setting (5, 10). Their
  PyTorch code gave RGB-difference nets (1, 2); this project applies (5, 10) to every motion
  modality (override with ``optim.first_conv_lr_mult``).
* ``snippet_length`` default: 1 for RGB (a snippet is one frame, fixed), 5 for the others.
"""

from __future__ import annotations

from dataclasses import dataclass

RGB, RGB_DIFF, FLOW, WARPED_FLOW = "rgb", "rgb_diff", "flow", "warped_flow"


@dataclass(frozen=True)
class Modality:
    name: str
    channels_per_frame: int
    is_flow: bool  # stored as quantised x/y planes computed at packing (its own frame pack)
    extra_frames: int  # frames read per snippet beyond L (rgb_diff: 1)
    fixed_snippet_length: int | None  # rgb: always 1
    default_snippet_length: int
    default_dropout: float
    first_conv_lr_mult: tuple[float, float]

    @property
    def is_motion(self) -> bool:
        return self.name != RGB

    @property
    def packed_as(self) -> str:
        """The modality whose pack holds this one's frames: itself for flow, RGB otherwise."""
        return self.name if self.is_flow else RGB

    @property
    def shard_members(self) -> tuple[str, str] | None:
        """The tar member extensions (frames blob, offsets table) of a flow modality; None for
        modalities read from the RGB frames (whose members depend on the layout: `shards`)."""
        return (f"{self.name}.frames", f"{self.name}.offsets") if self.is_flow else None

    @property
    def is_difference(self) -> bool:
        """Its L inputs are the differences of L + 1 consecutive frames (rgb_diff)."""
        return self.extra_frames > 0

    def frame_count(self, num_video_frames: int) -> int:
        """Frames of this modality in a video of ``num_video_frames`` RGB frames: N - 1 for flow
        (flow frame i is the motion from RGB frame i to i + 1), N otherwise. Sampling picks
        snippets among these."""
        return num_video_frames - 1 if self.is_flow else num_video_frames

    def frames_per_snippet(self, snippet_length: int) -> int:
        return snippet_length + self.extra_frames

    def input_channels(self, snippet_length: int) -> int:
        """Backbone input channels: the L frames of a snippet stacked along channels."""
        return self.channels_per_frame * snippet_length

    def check_snippet_length(self, snippet_length: int) -> None:
        if snippet_length < 1:
            raise ValueError(f"snippet_length: must be >= 1, got {snippet_length}")
        if self.fixed_snippet_length is not None and snippet_length != self.fixed_snippet_length:
            raise ValueError(f"snippet_length: must be {self.fixed_snippet_length} for modality {self.name} "
                             f"(its snippets are single frames), got {snippet_length}")


MODALITY_TABLE: dict[str, Modality] = {m.name: m for m in (
    Modality(RGB, 3, False, 0, 1, 1, 0.8, (1.0, 2.0)),
    Modality(RGB_DIFF, 3, False, 1, None, 5, 0.8, (5.0, 10.0)),
    Modality(FLOW, 2, True, 0, None, 5, 0.7, (5.0, 10.0)),
    Modality(WARPED_FLOW, 2, True, 0, None, 5, 0.7, (5.0, 10.0)),
)}

MODALITIES: tuple[str, ...] = tuple(MODALITY_TABLE)
FLOW_MODALITIES: tuple[str, ...] = tuple(n for n, m in MODALITY_TABLE.items() if m.is_flow)
MOTION_MODALITIES: tuple[str, ...] = tuple(n for n, m in MODALITY_TABLE.items() if m.is_motion)
# What `tsn pack --modalities` can store: RGB frames and the flow computed from them.
PACKABLE_MODALITIES: tuple[str, ...] = (RGB, *FLOW_MODALITIES)


def get(name: str) -> Modality:
    """The table row of ``name``; a ValueError naming the known modalities otherwise."""
    try:
        return MODALITY_TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown modality {name!r}; expected one of {', '.join(MODALITIES)}") from None
