"""Synthetic labelled action-video dataset: the project's embedded default dataset.

No real dataset can be downloaded, so demos, tests and the motion benchmark use videos
generated here. The catalogue (`CLASS_NAMES`, fixed order; ``num_classes`` takes a prefix):

=================  =====================================================================
``move_left``      the "motion object" (an L shape) translates leftwards, wrapping around
``move_right``     ... rightwards
``approach``       the motion object grows (looming; log-size sawtooth, see below)
``recede``         ... shrinks
``rotate_cw``      the motion object rotates clockwise (as seen on screen)
``rotate_ccw``     ... counter-clockwise
``shape_circle``   a circle with small random jitter motion
``shape_square``   a square, jitter
``shape_triangle`` a triangle, jitter
``shape_cross``    a plus-shaped cross, jitter
=================  =====================================================================

The pairs (move_left, move_right), (approach, recede), (rotate_cw, rotate_ccw) form
`MOTION_CLASSES`: within a pair every *single frame* has the same distribution, at every
frame index, so only motion over time tells them apart (how: `tools.synth.plan`).

Distractors, per video: a periodic textured background (smooth noise, blobs or stripes,
with static grain), optionally scrolling; a camera pan on a fraction of videos; a small second
object moving on its own; the object colour from a shared `PALETTE` plus jitter; random object
size. The four ``shape_*`` classes are separable by appearance alone, so an appearance-only
model tops out at about (4 + 6/2) / 10 = 70 % on the full catalogue; the motion pairs need
motion.

One module per concern: `spec` (the catalogue, `SynthSpec`), `plan` (every random choice of one
video, no pixels), `render` (the pixels), `dataset` (videos on disk, label files, resuming).
The CLI is `cli.synth`.
"""

from tools.synth.dataset import generate_dataset, video_relpath, write_video
from tools.synth.plan import VideoPlan, object_track, video_plan
from tools.synth.render import iter_frames, render_video
from tools.synth.spec import CLASS_NAMES, MOTION_CLASSES, SYNTH_VERSION, SynthSpec

__all__ = [
    "CLASS_NAMES",
    "MOTION_CLASSES",
    "SYNTH_VERSION",
    "SynthSpec",
    "VideoPlan",
    "generate_dataset",
    "iter_frames",
    "object_track",
    "render_video",
    "video_plan",
    "video_relpath",
    "write_video",
]
