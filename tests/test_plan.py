"""The per-sample plan (`dataloading.planning.plan`) and the modality-table rules it reads."""

import numpy as np
import pytest

from dataloading import modality
from dataloading.planning import augment, plan, sampling
from dataloading.planning.sampling import DRAW_RANGE as D
from dataloading.planning.spec import PipelineSpec

CROP = augment.CropSpec(input_size=40, resize_short=48)


def spec_for(mode, k=3, l=1, modality_name="rgb", flip=True):
    crop = augment.CropSpec(input_size=40, resize_short=48, flip=flip)
    return PipelineSpec(mode=mode, num_segments=k, snippet_length=l, modality=modality_name, crop=crop)


def test_train_plan_is_sampling_and_crop_of_the_draws():
    spec = spec_for("train", k=3, l=2, modality_name="rgb_diff")
    draws = np.array([5 << 27, D - 1, 0, 1 << 29, 3 << 28, D - 1], np.int64)
    p = plan.plan_sample(spec, 30, 48, 64, draws)
    expected = sampling.frame_indices("train", 30, 3, 3, draws[:3]).reshape(-1)  # rgb_diff: L + 1 frames
    np.testing.assert_array_equal(p.frame_indices, expected)
    assert p.frame_indices.shape == (9,) and p.frame_indices.dtype == np.int64
    assert p.crop == augment.train_crop(48, 64, spec.crop, 1 << 29, 3 << 28, D - 1)
    assert p.crop.flip and p.views == ()


@pytest.mark.parametrize("name", ["flow", "warped_flow"])
def test_flow_samples_among_the_flow_frames(name):
    """N RGB frames have N - 1 flow frames: the last snippet ends at flow frame N - 2."""
    spec = spec_for("val", k=4, l=5, modality_name=name)
    p = plan.plan_sample(spec, 12, 48, 64)
    np.testing.assert_array_equal(p.frame_indices, sampling.frame_indices("val", 11, 4, 5).reshape(-1))
    assert p.frame_indices.max() <= 10
    rgb = plan.plan_sample(spec_for("val", k=4), 12, 48, 64)
    np.testing.assert_array_equal(rgb.frame_indices, sampling.frame_indices("val", 12, 4, 1).reshape(-1))


def test_val_plan_needs_no_draws_and_takes_the_centre_crop():
    p = plan.plan_sample(spec_for("val"), 20, 48, 64)
    assert p.crop == augment.center_crop(48, 64, CROP) and not p.crop.flip
    assert p.views == ()
    with pytest.raises(ValueError, match="draws"):
        plan.plan_sample(spec_for("train"), 20, 48, 64)


@pytest.mark.parametrize("flip", [True, False])
def test_test_plan_has_the_test_views(flip):
    spec = spec_for("test", flip=flip)
    p = plan.plan_sample(spec, 20, 256, 340)
    assert p.views == tuple(augment.test_crops(256, 340, spec.crop))
    assert len(p.views) == spec.num_views == (10 if flip else 5)
    assert p.crop == augment.center_crop(256, 340, spec.crop)  # the crop output of test mode
    # every view has the centre crop's size (the graph cuts them with one shape)
    assert {(v.width, v.height) for v in p.views} == {(p.crop.width, p.crop.height)}


def test_crop_row():
    row = plan.crop_row(augment.CropBox(3, 4, 30, 20, True))
    assert row.dtype == np.int64 and row.tolist() == [3, 4, 30, 20, 1]


def test_modality_table_rules_the_plan_reads():
    assert [modality.get(m).frame_count(10) for m in modality.MODALITIES] == [10, 10, 9, 9]
    assert [modality.get(m).is_difference for m in modality.MODALITIES] == [False, True, False, False]
    with pytest.raises(ValueError, match="snippet_length: must be 1 for modality rgb .*single frames"):
        modality.get("rgb").check_snippet_length(2)
