"""Finding corrupt samples and cutting them out of the DALI indices (`dataloading.quarantine`);
the loader's use of it is tested end to end in test_dali_pipeline / test_flow_data."""

import shutil
from pathlib import Path

import pytest

from dataloading import quarantine, shards


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


def test_scan_rewrites_the_indices_without_the_corrupt_samples(packed_jpeg, tmp_path):
    """The corrupt sample's shard (one sample each here) is left out, the others keep their
    samples in a run-local index copy; the dataset's own files are not touched."""
    tars, idxs, _ = shards.split_shards(packed_jpeg, "train")
    copy = Path(shutil.copy(tars[0], tmp_path / "s.tar"))
    entries = Path(idxs[0]).read_text().splitlines()[1].split()
    member = dict(zip(entries[0::4], zip(entries[1::4], entries[2::4])))
    offset, size = (int(v) for v in member["frames"])
    with open(copy, "r+b") as f:  # wipe the first sample's frames
        f.seek(offset)
        f.write(b"\0" * size)
    q = quarantine.Quarantine([str(copy), *tars[1:3]], idxs[:3], "jpeg", "rgb")
    new = q.scan()
    bad_key = shards.split_member_name(entries[3])[0]
    assert [(b["shard"], b["key"]) for b in new] == [(str(copy), bad_key)] and q.skipped == new
    assert q.tar_paths == tars[1:3] and len(q.index_paths) == 2
    for kept, original in zip(q.index_paths, idxs[1:3]):
        assert kept != original and Path(kept).read_text() == Path(original).read_text()
    assert q.scan() == [] and len(q.skipped) == 1  # nothing new: the caller must not retry


def test_scan_errors(tmp_path, packed_jpeg):
    tar, idx = first_shard(packed_jpeg)
    n = len(Path(idx).read_text().splitlines()) - 1
    garbage = tmp_path / "g.tar"
    garbage.write_bytes(b"not a tar" * 100)
    with pytest.raises(quarantine.UnreadableShard, match="g.tar"):
        quarantine.Quarantine([str(garbage)], [idx], "jpeg", "rgb").scan()
    q = quarantine.Quarantine([tar], [idx], "jpeg", "flow")  # no flow members: every sample fails
    with pytest.raises(ValueError, match="every sample of this rank's shards is corrupt"):
        q.scan()
    assert q.skipped == [] and n > 0  # nothing quarantined when no shard would be left
