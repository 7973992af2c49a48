"""The per-sample plan: which frames of a sample are read, which box of them is cropped, whether
the sample is mirrored, and (test mode) the test views, as pure functions of the sample's size
and its integer draws.

It composes TSN segment sampling (`dataloading.planning.sampling`) and the crop geometry
(`dataloading.planning.augment`) once, for every data path that must agree on a sample bit for bit:

* the DALI graph, whose planner (`dali_planner.SamplePlanner`) calls `plan_sample` once per
  sample on DALI's thread (so it stays a handful of integer operations, no per-frame Python);
* the reference loader (`tools.reference`), the oracle the graph is tested against;
* the torch finishing step (`finish.finish_frames`), which cuts the test views of whole frames
  with `augment.test_crops`, the geometry `SamplePlan.views` is made of.

What a flipped sample does to its flow (x -> 255 - x) is the flow format's rule,
`dataloading.sources.flow.flip_x`; the plan says whether the sample is flipped (``crop.flip``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dataloading import modality
from dataloading.planning import augment, sampling

if TYPE_CHECKING:
    from dataloading.planning.spec import PipelineSpec


@dataclass(frozen=True)
class SamplePlan:
    """One sample's plan, in stored-frame pixels.

    ``frame_indices``: (K * frames_per_snippet,) int64, snippet-major, indices of the
    modality's frames (flow: flow frames, ``[0, num_frames - 2]``). ``crop``: train, the
    multi-scale corner crop and the sample's flip; val/test, the centre crop (no flip).
    ``views``: test mode, the test views (`augment.test_crops`: 4 corners + centre, then the
    same mirrored); empty otherwise.
    """

    frame_indices: np.ndarray
    crop: augment.CropBox
    views: tuple[augment.CropBox, ...] = ()


def plan_sample(spec: PipelineSpec, num_frames: int, height: int, width: int, draws=None) -> SamplePlan:
    """The plan of one sample of ``num_frames`` RGB frames of ``height`` x ``width`` (its info
    member) for ``spec`` (mode, num_segments, snippet_length, modality, crop).

    ``draws``: the sample's row of `sampling.batch_draws`, int64 (K + len(AUG_DRAWS),): K
    segment draws, then scale pair, crop position, flip. Train mode needs it; val/test ignore
    it (None allowed). Flow modalities sample among the ``num_frames - 1`` flow frames.
    """
    row = modality.get(spec.modality)
    K = spec.num_segments
    n = row.frame_count(num_frames)
    segment_draws = None if draws is None else draws[:K]
    indices = sampling.frame_indices(spec.mode, n, K, row.frames_per_snippet(spec.snippet_length),
                                     segment_draws).reshape(-1)
    if spec.mode == "train":
        aug = draws[K:K + len(sampling.AUG_DRAWS)]
        box = augment.train_crop(height, width, spec.crop, *(int(d) for d in aug))
    else:
        box = augment.center_crop(height, width, spec.crop)
    views = tuple(augment.test_crops(height, width, spec.crop)) if spec.mode == "test" else ()
    return SamplePlan(indices, box, views)


def crop_row(box: augment.CropBox) -> np.ndarray:
    """The crop output of every data path: (5,) int64 = x, y, w, h, flip."""
    return np.array([box.x, box.y, box.width, box.height, int(box.flip)], np.int64)
