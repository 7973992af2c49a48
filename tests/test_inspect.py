"""Tests of dataloading.pack.inspect and its command (cli.pack, `tsn inspect`): summary, file checks, --verify. Tiny videos."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from videos import make_test_video

from cli import pack as pack_cli
from dataloading.format import shards
from dataloading.pack import inspect as ds_inspect
from dataloading.pack import pack_dataset
from dataloading.sources.items import VideoItem

CLASSES = ["a", "b"]
PACK_KW = dict(short_side=32, min_frames=16, shard_size_bytes=80_000, workers=2, progress=False)


def make_items(root: Path) -> list[VideoItem]:
    items = []
    for label, name in enumerate(CLASSES):
        for i in range(3):
            path = make_test_video(root / f"{name}{i}.mp4", 18 + i)
            items.append(VideoItem(str(path), label, name, "val" if i == 2 else "train"))
    (root / "empty.mp4").write_bytes(b"")
    items.append(VideoItem(str(root / "empty.mp4"), 0, "a", "train"))
    items.append(VideoItem(str(make_test_video(root / "short.mp4", 5)), 1, "b", "train"))
    return items


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return make_items(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def packed(items, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "jpeg"
    pack_dataset(items, CLASSES, out, **PACK_KW)
    return out


@pytest.fixture(scope="module")
def packed_mjpeg(items, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "mjpeg"
    pack_dataset(items, CLASSES, out, codec="mjpeg", **PACK_KW)
    return out


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tsn")
    pack_cli.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", *argv])
    return args.func(args)


def member_location(dataset: Path, shard: dict, key: str, ext: str) -> tuple[int, int]:
    """(data offset, size) of member KEY.ext, from the shard's DALI index."""
    for line in (dataset / shard["index_path"]).read_text().splitlines()[1:]:
        fields = line.split()
        for e, offset, size, name in zip(fields[0::4], fields[1::4], fields[2::4], fields[3::4]):
            if name == f"{key}.{ext}":
                return int(offset), int(size)
    raise KeyError(f"{key}.{ext}")


def patch_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_summary(packed):
    s = ds_inspect.inspect_dataset(packed)
    assert s["ok"] and s["problems"] == []
    assert (s["layout"], s["codec"], s["short_side"], s["jpeg_quality"]) == ("jpeg", "jpeg", 32, 90)
    assert s["classes"] == CLASSES and s["num_samples"] == 6 and s["num_rejected"] == 2
    assert s["splits"]["train"]["class_counts"] == {"a": 2, "b": 2}
    assert s["splits"]["val"]["class_counts"] == {"a": 1, "b": 1}
    assert s["splits"]["train"]["num_frames"] == 18 + 19 + 18 + 19
    m = shards.load_manifest(packed)
    assert s["num_bytes"] == sum(sh["num_bytes"] for sh in m["shards"])
    assert s["splits"]["train"]["num_shards"] == len(m["splits"]["train"]["shards"])
    assert {Path(r["path"]).name for r in s["rejected_examples"]} == {"empty.mp4", "short.mp4"}
    assert s["rejected_reasons"] == {"empty file": 1, "only N decoded frames, need >= N": 1}


def test_cli_human_and_json(packed, capsys):
    assert cli(str(packed)) == 0
    out = capsys.readouterr().out
    assert "layout jpeg, codec jpeg" in out and "2 classes, 6 samples" in out
    assert "empty.mp4: empty file (0 bytes)" in out and "only 5 decoded frames" in out
    assert "every listed shard and index present" in out
    lines = out.splitlines()
    assert any(line.split() == ["a", "2", "1"] for line in lines)  # class table: train, val counts
    assert cli(str(packed), "--json") == 0
    s = json.loads(capsys.readouterr().out)
    assert s["num_samples"] == 6 and s["ok"]


def test_missing_and_resized_files_are_problems(packed, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(packed, ds)
    m = shards.load_manifest(ds)
    first, second = m["splits"]["train"]["shards"][:2]
    (ds / first["index_path"]).unlink()
    with open(ds / second["path"], "ab") as f:
        f.write(b"\0" * 512)
    (ds / m["splits"]["val"]["shards"][0]["path"]).unlink()
    s = ds_inspect.inspect_dataset(ds)
    assert not s["ok"]
    assert s["problems"] == [
        f"{first['index_path']}: index missing",
        f"{second['path']}: {second['num_bytes'] + 512} bytes on disk, manifest lists {second['num_bytes']}",
        f"{m['splits']['val']['shards'][0]['path']}: shard missing",
    ]
    assert cli(str(ds)) == 1
    assert "PROBLEMS (3)" in capsys.readouterr().out


@pytest.mark.parametrize("fixture", ["packed", "packed_mjpeg"])
def test_verify_ok(request, fixture, capsys):
    ds = request.getfixturevalue(fixture)
    v = ds_inspect.verify_dataset(ds)
    assert v["ok"] and v["bad_samples"] == [] and v["num_samples_checked"] == 6
    assert cli(str(ds), "--verify", "--no-progress") == 0
    assert "verify: 6 samples" in capsys.readouterr().out


def test_verify_reports_bad_samples(packed, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(packed, ds)
    shard = shards.load_manifest(ds)["splits"]["train"]["shards"][0]
    tar = ds / shard["path"]
    keys = [line.split()[3].split(".")[0] for line in (ds / shard["index_path"]).read_text().splitlines()[1:]]
    assert len(keys) >= 2
    # sample 1: destroy the JPEG header of frame 2 (same size, so the tar stays readable)
    offset, _ = member_location(ds, shard, keys[0], "frames")
    offsets_at, offsets_size = member_location(ds, shard, keys[0], "offsets")
    with open(tar, "rb") as f:
        f.seek(offsets_at)
        frame_offsets = np.frombuffer(f.read(offsets_size), "<i4")
    patch_bytes(tar, offset + int(frame_offsets[2]), b"\0" * 16)
    # sample 2: info says another num_frames than json
    info_at, _ = member_location(ds, shard, keys[1], "info")
    json_at, json_size = member_location(ds, shard, keys[1], "json")
    with open(tar, "rb") as f:
        f.seek(json_at)
        num_frames = json.loads(f.read(json_size))["num_frames"]
    patch_bytes(tar, info_at, np.asarray([3], "<i4").tobytes())
    v = ds_inspect.verify_dataset(ds)
    assert not v["ok"]
    changed = v["bad_samples"].pop(0)  # the shard as a whole, by its SHA-256 recorded at pack time
    assert changed["shard"] == shard["path"] and changed["key"] is None
    assert changed["reason"].startswith("SHA-256 ") and "recorded at pack time: the shard changed" in changed["reason"]
    assert v["bad_samples"] == [
        {"shard": shard["path"], "key": keys[0], "reason": "frame 2 is not a decodable JPEG"},
        {"shard": shard["path"], "key": keys[1], "reason": f"info num_frames=3 but json num_frames={num_frames}"},
    ]
    assert cli(str(ds), "--verify", "--no-progress") == 1
    out = capsys.readouterr().out
    assert f"{shard['path']} {keys[0]}: frame 2 is not a decodable JPEG" in out


def test_verify_reports_bad_video_and_index(packed_mjpeg, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(packed_mjpeg, ds)
    shard = shards.load_manifest(ds)["shards"][0]
    key = (ds / shard["index_path"]).read_text().splitlines()[1].split()[3].split(".")[0]
    at, size = member_location(ds, shard, key, "video")
    patch_bytes(ds / shard["path"], at, b"\0" * size)  # the whole container zeroed
    # and an index that no longer matches the tar
    idx = ds / shard["index_path"]
    idx.write_text(idx.read_text().replace(f" {at} ", f" {at + 512} ", 1))
    bad = ds_inspect.verify_dataset(ds)["bad_samples"]
    assert [b["key"] for b in bad] == [None, None, key]
    assert bad[0]["reason"].startswith("SHA-256 ")  # the shard as a whole changed since packing
    assert bad[1]["reason"].startswith("DALI index does not match the tar")
    assert "video" in bad[2]["reason"]


def test_not_a_dataset_exits_2(tmp_path, capsys):
    assert cli(str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a packed dataset" in err


def test_storage_cost_bytes_per_video_and_ratio_to_the_sources(packed, items, tmp_path, capsys):
    packed_items = [it for it in items if Path(it.path).name not in ("empty.mp4", "short.mp4")]
    expected = {}
    for split in ("train", "val"):
        tar_bytes = sum(p.stat().st_size for p in (packed / split).glob("*.tar"))
        source_bytes = sum(Path(it.path).stat().st_size for it in packed_items if it.split == split)
        n = sum(it.split == split for it in packed_items)
        expected[split] = (tar_bytes, source_bytes, n)
    s = ds_inspect.inspect_dataset(packed)
    for split, (tar_bytes, source_bytes, n) in expected.items():
        v = s["splits"][split]
        assert v["bytes_per_video"] == tar_bytes / n
        assert v["source_bytes"] == source_bytes
        assert v["pack_to_source_ratio"] == tar_bytes / source_bytes
    all_tar = sum(t for t, _, _ in expected.values())
    all_source = sum(src for _, src, _ in expected.values())
    assert s["bytes_per_video"] == all_tar / 6
    assert s["source_bytes"] == all_source and s["pack_to_source_ratio"] == all_tar / all_source
    assert cli(str(packed)) == 0
    from dataloading.pack import format_size

    out = capsys.readouterr().out
    assert (f"storage cost: {format_size(all_tar / 6)} per video (train {format_size(expected['train'][0] / 4)}, "
            f"val {format_size(expected['val'][0] / 2)}); source videos {format_size(all_source)} in all, "
            f"{format_size(all_source / 6)} per video: "
            f"pack / source = {all_tar / all_source:.3f}x") in out

    # A pack made before source_bytes was recorded: the sizes of the sources its journals name.
    old = tmp_path / "old"
    shutil.copytree(packed, old)
    m = json.loads((old / "manifest.json").read_text())
    m.pop("source_bytes")
    for v in m["splits"].values():
        v.pop("source_bytes")
    (old / "manifest.json").write_text(json.dumps(m))
    s = ds_inspect.inspect_dataset(old)
    assert s["source_bytes"] == all_source and s["splits"]["val"]["source_bytes"] == expected["val"][1]
    # ... and with a source gone: unknown, said so.
    journal = old / "val" / "_journal.jsonl"
    journal.write_text(journal.read_text().replace(packed_items[2].path, str(tmp_path / "gone.mp4")))
    s = ds_inspect.inspect_dataset(old)
    assert s["splits"]["val"]["source_bytes"] is None and s["source_bytes"] is None
    assert s["pack_to_source_ratio"] is None and s["splits"]["train"]["source_bytes"] == expected["train"][1]
    assert "source videos' bytes unknown" in ds_inspect.format_summary(s)
