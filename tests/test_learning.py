"""Proof that the whole training path learns, and that RGB difference sees motion that RGB cannot.

Dataset and recipe: `experiments/motion_set.py` (4 classes, 100 videos each, 64x64 px, 160 val
videos): ``move_left`` / ``move_right`` have the same distribution in every single frame, so an
RGB TSN with average consensus cannot tell them apart; ``shape_circle`` / ``shape_square`` differ
in appearance.

Both models (tiny CNN, 48 px, K = 3, from scratch) train through ``app.worker.train`` on CPU
and are scored with the val protocol (centre crop) on the last epoch's weights (no model
selection on the evaluated videos). Assertions, on 160 val videos (80 of them motion):

* RGB-diff top-1 >= chance + 0.3 = 0.55. P(>= 88 of 160 correct | p = 0.25) < 1e-15.
* RGB-diff accuracy on the two motion classes >= 0.75 and >= RGB's + 0.25. RGB's expected value
  there is <= 0.5 (a coin between left and right); its std on 80 videos is <= 0.056.

Horizontal flip: the train-time flip turns a ``move_left`` video into a ``move_right`` one while
keeping its label, which makes direction unlearnable; the test turns it off (``augment.flip``
when the config has it, else by zeroing the flip draw of the data path). For the same reason the
10-crop test protocol (5 of its views flipped) averages direction away: its numbers (written to
results.json by train) are reported, not asserted.

Measured on the 2-core CI machine: see the module's printed summary (``pytest -s``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import motion_set  # noqa: E402  (the dataset and the recipe, shared with experiments/temporal_shift.py)


@pytest.fixture(scope="module")
def motion_dataset(tmp_path_factory):
    return motion_set.make_motion_dataset(tmp_path_factory.mktemp("motion"))


def _disable_flip(monkeypatch) -> list[str]:
    """Config overrides (or a data-path patch) that turn the train-time horizontal flip off."""
    from app.config import AugmentConfig

    if "flip" in AugmentConfig.model_fields:
        return ["augment.flip=false"]
    from dataloading.planning import sampling

    column = sampling.AUG_DRAWS.index("flip") - len(sampling.AUG_DRAWS)
    original = sampling.batch_draws

    def no_flip(*args, **kwargs):
        draws = original(*args, **kwargs)
        draws[:, column] = 0  # pick(0, 2) == 0: not flipped
        return draws

    monkeypatch.setattr(sampling, "batch_draws", no_flip)
    return []


@pytest.mark.slow
def test_rgb_diff_learns_motion_that_rgb_cannot_see(motion_dataset, tmp_path, monkeypatch):
    torch.set_num_threads(2)
    extra = _disable_flip(monkeypatch)
    rgb = motion_set.train_and_score(motion_dataset, tmp_path / "rgb", [*extra, "model.modality=rgb",
                                                                       "model.snippet_length=1"])
    diff = motion_set.train_and_score(motion_dataset, tmp_path / "rgb_diff", [*extra, "model.modality=rgb_diff",
                                                                              "model.snippet_length=5"])
    for name, r in (("rgb", rgb), ("rgb_diff", diff)):
        print(f"[learning] {name}: val top1 {r['top1']:.3f}, motion classes {r['motion_accuracy']:.3f}, "
              f"per class {r['per_class']}, {r['seconds']:.1f}s; 10-crop protocol top1 "
              f"{r['test_protocol_top1']:.3f} {r['test_protocol_per_class']}")
    assert diff["num_val_videos"] == rgb["num_val_videos"] == 160
    assert diff["top1"] >= 0.25 + 0.3, diff
    assert diff["motion_accuracy"] >= 0.75, diff
    assert diff["motion_accuracy"] >= rgb["motion_accuracy"] + 0.25, (rgb, diff)

