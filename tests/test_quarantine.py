"""The corrupt-sample checks and registry (`dataloading.format.quarantine`); the loader's use of them
is tested end to end in test_dali_pipeline / test_flow_data / test_loader_elastic."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from dataloading.format import quarantine, shards


def first_shard(dataset):
    tars, idxs, _ = shards.split_shards(dataset, "train")
    return tars[0], idxs[0]


def test_iter_samples_reads_every_sample_in_index_order(packed_jpeg):
    tar, idx = first_shard(packed_jpeg)
    samples = list(quarantine.iter_samples(tar))
    index_keys = [shards.split_member_name(ln.split()[3])[0] for ln in Path(idx).read_text().splitlines()[1:]]
    assert [key for key, _ in samples] == index_keys
    assert all({"info", "frames", "offsets"} <= members.keys() for _, members in samples)


def test_check_sample_names_what_does_not_read(packed_jpeg, packed_flow):
    _, members = next(quarantine.iter_samples(first_shard(packed_jpeg)[0]))
    assert quarantine.check_sample(members, "jpeg") is None
    assert "does not decode as JPEG" in quarantine.check_sample({**members, "frames": b"\0" * len(members["frames"])},
                                                                "jpeg")
    assert "offset table" in quarantine.check_sample({**members, "frames": members["frames"][:-1]}, "jpeg")
    assert "KeyError" in quarantine.check_sample(members, "jpeg", "flow")  # packed without flow
    _, with_flow = next(quarantine.iter_samples(first_shard(packed_flow)[0]))
    assert quarantine.check_sample(with_flow, "jpeg", "flow") is None
    blob = with_flow["warped_flow.frames"]
    reason = quarantine.check_sample({**with_flow, "warped_flow.frames": b"\0" * len(blob)}, "jpeg", "warped_flow")
    assert reason.startswith("warped_flow plane 0") and "JPEG" in reason


def test_the_registry_names_each_corrupt_sample_once(caplog):
    q = quarantine.Quarantine()
    assert q.add("a.tar", "00000001", "bad bytes") and not q.add("a.tar", "00000001", "again")
    assert q.reason("a.tar", "00000001") == "bad bytes" and q.reason("a.tar", "00000002") is None
    assert q.skipped == [{"shard": "a.tar", "key": "00000001", "reason": "bad bytes"}] and len(q) == 1
    assert caplog.text.count("skipping corrupt sample 00000001 in a.tar") == 1


def test_undecodable_names_the_frame_that_does_not_decode(packed_jpeg):
    _, members = next(quarantine.iter_samples(first_shard(packed_jpeg)[0]))
    offsets = shards.decode_offsets(members["offsets"])
    jpegs = [np.frombuffer(shards.frame_from_pack(members["frames"], offsets, i), np.uint8) for i in (0, 1)]
    assert quarantine.undecodable(jpegs, "rgb") is None
    broken = [jpegs[0], np.zeros_like(jpegs[1])]
    assert quarantine.undecodable(broken, "rgb") == "sampled frame 1 does not decode as JPEG"
