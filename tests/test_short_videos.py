"""Test-time sampling of short videos through the real data paths (issue 15): the DALI loader
and the reference loader both sample a clip with fewer frames than K + L - 1 by
`sampling.center_starts`, spreading the 25 test snippets over the frames there are instead of
reading frame 0 every time. (The rule itself: tests/test_sampling.py's table, which
tests/test_dali_pipeline.py also replays through the graph's planner.)"""

import numpy as np

from dataloading.format import shards
from dataloading.pipeline.loader import TSNLoader
from dataloading.planning import augment, sampling
from dataloading.planning.spec import PipelineSpec
from tools import reference

K_TEST = 25


def test_short_clips_spread_their_test_snippets_in_the_loader_and_the_reference(packed_jpeg):
    spec = PipelineSpec(mode="test", num_segments=K_TEST, snippet_length=1, modality="rgb", batch_size=2,
                        crop=augment.CropSpec(input_size=40, resize_short=48), num_threads=1)
    tars, _, _ = shards.split_shards(packed_jpeg, "val")
    samples = {}
    for t in tars:
        for s in reference.iter_shard(t):
            samples[shards.decode_info(s.members["info"])["sample_index"]] = s
    short = 0
    for batch in TSNLoader(packed_jpeg, "val", spec):
        for r in range(len(batch.sample_index)):
            sample = samples[int(batch.sample_index[r])]
            n = shards.decode_info(sample.members["info"])["num_frames"]
            expected = sampling.center_starts(n, K_TEST, 1)
            np.testing.assert_array_equal(batch.frame_indices[r].numpy(), expected)
            _, _, _, ref_indices, _ = reference.load_sample(sample, "jpeg", spec, None)
            np.testing.assert_array_equal(ref_indices, expected)
            if n <= K_TEST:  # a short clip: every one of its frames is read (it read frame 0 x 25 before)
                short += 1
                assert set(expected.tolist()) == set(range(n)), n
    assert short >= 1  # the synthetic clips are 15-30 frames: some are shorter than 25
