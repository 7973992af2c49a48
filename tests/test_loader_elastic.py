"""Exact data accounting across resizes, at the loader: the training loader reads each rank's
chunk of the epoch's order (`dataloading.planning.order`), pads with masked entries, and its `state`
lets any world size finish an epoch with every sample used exactly once."""

from collections import Counter

import numpy as np
import pytest
import torch

from dataloading.format import shards
from dataloading.pipeline.loader import TSNLoader
from dataloading.planning import augment, order
from dataloading.planning.spec import PipelineSpec
from damage import copy_with_wiped_frames
from tools import reference

CROP = augment.CropSpec(input_size=40, resize_short=48)


def spec_for(batch_size=2, mode="train", seed=5):
    return PipelineSpec(mode=mode, num_segments=3, snippet_length=1, batch_size=batch_size, crop=CROP,
                        num_threads=1, seed=seed)


def run_ranks(dataset, spec, world_size, *, epoch=0, batch=0, remaining=None, steps=None):
    """Every rank's batches of (the rest of) ``epoch`` (the first ``steps`` of them when given)
    and the state after them (the same on every rank)."""
    out, states, lengths = [], [], set()
    for rank in range(world_size):
        loader = TSNLoader(dataset, "train", spec, rank=rank, world_size=world_size, start_epoch=epoch,
                           start_batch=batch, remaining=remaining)
        lengths.add(len(loader))
        it = iter(loader)
        got = [b for _, b in zip(range(steps if steps is not None else 10**9), it)]
        out.append(got)
        states.append(loader.state)
        loader.close()
    assert len(lengths) == 1 and all(s == states[0] for s in states)
    return out, states[0], lengths.pop()


def real_samples(batches):
    """{sample_index: crop row} of the real entries, and the multiset of sample indices."""
    crops, seen = {}, []
    for b in batches:
        for i, ok, crop in zip(b.sample_index.tolist(), b.real.tolist(), b.crop.tolist()):
            if ok:
                seen.append(i)
                crops[i] = crop
    return crops, Counter(seen)


def test_epoch_multiset_is_the_same_whatever_the_resizes(packed_jpeg):
    """Uninterrupted W=1 == W=2 for one step then W=3 for the rest == W=2 throughout: every
    training sample exactly once, and each with the same plan (draws keyed by position)."""
    n = shards.load_manifest(packed_jpeg)["splits"]["train"]["num_samples"]
    spec = spec_for()
    one, end1, len1 = run_ranks(packed_jpeg, spec, 1)
    assert end1 == {"epoch": 1, "batch": 0, "remaining": [[0, n]], "num_samples": n}
    assert len1 == -(-n // 2)
    crops1, seen1 = real_samples(one[0])
    assert seen1 == Counter(range(n))

    first, mid, _ = run_ranks(packed_jpeg, spec, 2, steps=1)
    assert mid["epoch"] == 0 and mid["batch"] == 1
    assert order.count(mid["remaining"]) == n - 4  # two ranks x one batch of 2
    rest, end3, len3 = run_ranks(packed_jpeg, spec, 3, epoch=0, batch=mid["batch"], remaining=mid["remaining"])
    assert end3["epoch"] == 1 and len3 == 1 + order.steps(mid["remaining"], 3, 2)
    crops23, seen23 = real_samples([b for r in first + rest for b in r])
    assert seen23 == seen1 and crops23 == crops1

    two, _, _ = run_ranks(packed_jpeg, spec, 2)
    crops2, seen2 = real_samples([b for r in two for b in r])
    assert seen2 == seen1 and crops2 == crops1


def test_training_batches_equal_the_reference_replay(packed_jpeg):
    """The reader lists the rank's chunk in order; the reference loader replays the same
    positions with the same position-keyed draws."""
    spec = spec_for(batch_size=3)
    tars, _, n = shards.split_shards(packed_jpeg, "train")
    chunk = order.split(order.full(n), 2)[1]
    loader = TSNLoader(packed_jpeg, "train", spec, rank=1, world_size=2)
    ours = list(loader)
    ref = list(reference.OrderedLoader(tars, "jpeg", spec, order.positions(chunk)))
    assert len(ours) == len(ref) == order.steps(order.full(n), 2, 3)
    for b, r in zip(ours, ref):
        real = b.real.numpy()
        assert real.sum() == len(r["sample_index"])
        np.testing.assert_array_equal(b.sample_index.numpy()[real], r["sample_index"])
        np.testing.assert_array_equal(b.frame_indices.numpy()[real], r["frame_indices"])  # exact
        np.testing.assert_array_equal(b.crop.numpy()[real], r["crop"])  # exact crop box and flip
        diff = np.abs(b.frames.numpy()[real].reshape(r["frames"].shape) - r["frames"])
        assert diff.mean() < 0.02, diff.mean()  # JPEG IDCT / resize filter differences only
    np.testing.assert_array_equal(np.concatenate([b.position.numpy()[b.real.numpy()] for b in ours]),
                                  order.positions(chunk))


def test_padding_entries_and_an_empty_chunk(packed_jpeg):
    """Two samples left, three ranks, batches of 2: chunks 1, 1, 0; one step each; the padded
    entries repeat a sample of the rank (or the epoch's first) and are marked not real."""
    n = shards.load_manifest(packed_jpeg)["splits"]["train"]["num_samples"]
    left = [(3, 4), (n - 1, n)]
    batches, end, length = run_ranks(packed_jpeg, spec_for(), 3, epoch=2, batch=5, remaining=left)
    assert length == 6 and end == {"epoch": 3, "batch": 0, "remaining": [[0, n]], "num_samples": n}
    assert [[b.real.tolist() for b in r] for r in batches] == [[[True, False]], [[True, False]], [[False, False]]]
    assert [r[0].position.tolist() for r in batches] == [[3, -1], [n - 1, -1], [-1, -1]]
    assert all(r[0].frames.shape[0] == 2 for r in batches)  # whole batches: the padding is decoded
    # the padding entry repeats the rank's own sample
    assert batches[0][0].sample_index[1] == batches[0][0].sample_index[0]


def test_resume_state_is_checked(packed_jpeg):
    n = shards.load_manifest(packed_jpeg)["splits"]["train"]["num_samples"]
    with pytest.raises(ValueError, match="past the epoch"):
        TSNLoader(packed_jpeg, "train", spec_for(), remaining=[(0, n + 1)], start_batch=1)
    with pytest.raises(ValueError, match="only a training loader"):
        TSNLoader(packed_jpeg, "train", spec_for(mode="val"), remaining=[(0, 2)])
    with pytest.raises(ValueError, match="rank 2 not in"):
        TSNLoader(packed_jpeg, "train", spec_for(), rank=2, world_size=2)


def test_a_quarantined_training_sample_becomes_padding(packed_jpeg, tmp_path):
    """A corrupt sample met while training: skipped, counted, its position masked; every other
    sample of the epoch still used exactly once."""
    dataset, _ = copy_with_wiped_frames(packed_jpeg, tmp_path / "copy")  # a sample's frames wiped, the tar intact
    n = shards.load_manifest(dataset)["splits"]["train"]["num_samples"]
    loaders = [TSNLoader(dataset, "train", spec_for(), rank=r, world_size=2) for r in range(2)]
    batches = [list(loader) for loader in loaders]
    skipped = [s for loader in loaders for s in loader.skipped]
    assert len(skipped) >= 1 and all(s["key"] == skipped[0]["key"] for s in skipped)
    _, seen = real_samples([b for r in batches for b in r])
    assert len(seen) == n - 1 and max(seen.values()) == 1
    assert len(batches[0]) == len(batches[1]) == order.steps(order.full(n), 2, 2)  # nothing shifted
    for loader in loaders:
        assert loader.state["remaining"] == [[0, n]] and loader.position == (1, 0)
        loader.close()
