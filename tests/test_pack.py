"""Tests of dataloading.sources.video_io, dataloading.pack and cli.pack (`tsn pack`). Tiny videos (64x48, ~2 s)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import tarfile
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from videos import decoded_frame_count, make_audio_only, make_test_video, pattern_frame

from cli import pack as pack_cli
from dataloading import procpool
from dataloading.format import shards
from dataloading.pack import encode, journal, writer
from dataloading.pack import PackError, pack_dataset, parse_size
from dataloading.sources.inputs import read_inputs
from dataloading.sources.items import VideoItem
from dataloading.sources.video_io import VideoError, decode_video, encode_jpeg_frames, encode_video, resized_size

CLASSES = ["jump", "run", "walk"]
SHORT_SIDE = 32  # 64x48 -> 42x32: small frames keep the tests fast
SHARD_BYTES = 100_000  # ~3 samples (25-40 kB each) per shard
PACK_KW = dict(short_side=SHORT_SIDE, min_frames=16, shard_size_bytes=SHARD_BYTES, workers=2, progress=False, seed=0)

# bad inputs -> expected piece of the rejection reason
BAD_VIDEOS = {
    "truncated.mp4": "cannot open: not a media file, or truncated/corrupt",
    "audio_only.mp4": "no video stream (streams: audio)",
    "zero.mp4": "empty file (0 bytes)",
    "text.mp4": "cannot open: not a media file",
    "renamed_json.mp4": "cannot open: not a media file",
    "short.mp4": "only 8 decoded frames, need >= 16",
    "missing.mp4": "file not found",
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """4 good videos per class (20-28 frames; one portrait, one 80x60; the 4th in split val)
    plus one of every bad kind (split train)."""
    root = tmp_path_factory.mktemp("videos")
    rows = ["path,label,split"]
    for c, name in enumerate(CLASSES):
        for i in range(4):
            size = (48, 64) if (c, i) == (0, 1) else (80, 60) if (c, i) == (1, 2) else (64, 48)
            rel = f"{name}/{name}_{i}.mp4"
            (root / name).mkdir(exist_ok=True)
            make_test_video(root / rel, 20 + 2 * i + c, size)
            rows.append(f"{rel},{name},{'val' if i == 3 else 'train'}")
    bad = root / "bad"
    bad.mkdir()
    good = (root / "walk/walk_0.mp4").read_bytes()
    (bad / "truncated.mp4").write_bytes(good[: len(good) // 2])
    make_audio_only(bad / "audio_only.mp4")
    (bad / "zero.mp4").write_bytes(b"")
    (bad / "text.mp4").write_text("this is a text file, not a video\n" * 20)
    (bad / "renamed_json.mp4").write_text(json.dumps({"not": "a video", "list": list(range(50))}))
    make_test_video(bad / "short.mp4", 8)
    rows += [f"bad/{name},run,train" for name in BAD_VIDEOS]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def inputs(videos, **kw):
    return read_inputs(csv_path=videos / "labels.csv", **kw)


@pytest.fixture(scope="module")
def packed(videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "ds"
    items, classes = inputs(videos)
    pack_dataset(items, classes, out, **PACK_KW)
    return out


def read_samples(tar_path) -> list[tuple[str, list[tarfile.TarInfo], dict[str, bytes]]]:
    """(key, members in tar order, {ext: data}) per sample."""
    samples = []
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, ext = shards.split_member_name(m.name)
            if not samples or samples[-1][0] != key:
                samples.append((key, [], {}))
            samples[-1][1].append(m)
            samples[-1][2][ext] = tar.extractfile(m).read()
    return samples


def all_shard_bytes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*/*.tar"))}


def without_time(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created_unix"}


# ---------------------------------------------------------------------------------------------
# video_io


@pytest.mark.parametrize(
    "size,short_side,expected",
    [
        ((64, 48), None, (64, 48)),
        ((63, 47), None, (63, 47)),
        ((64, 48), 32, (42, 32)),  # 42.67 -> nearest even
        ((48, 64), 32, (32, 42)),  # portrait: the width is the short side
        ((320, 240), 256, (342, 256)),  # enlarging: 341.33 -> 342
        ((1920, 1080), 256, (456, 256)),  # 455.1 -> 456
        ((64, 48), 31, (42, 32)),  # odd short side -> nearest even
    ],
)
def test_resized_size(size, short_side, expected):
    assert resized_size(*size, short_side) == expected


def test_decode_counts_frames_and_resizes(videos):
    v = decode_video(videos / "walk/walk_3.mp4", SHORT_SIDE)
    assert v.num_frames == len(v.frames) == 28 == decoded_frame_count(videos / "walk/walk_3.mp4")
    assert (v.width, v.height, v.source_width, v.source_height) == (42, 32, 64, 48)
    assert v.fps == v.source_fps == 10.0
    assert all(f.shape == (32, 42, 3) and f.dtype == np.uint8 for f in v.frames)
    full = decode_video(videos / "walk/walk_3.mp4", None)
    assert full.frames[0].shape == (48, 64, 3)
    # RGB channel order: frame 0 of the pattern has a red gradient along x
    ref = pattern_frame(0, (64, 48)).astype(int)
    assert np.abs(full.frames[0].astype(int) - ref).mean() < 12


def test_decode_counts_decoded_frames_not_header(tmp_path):
    # A truncated AVI keeps its header (claims 30 frames) but holds fewer frames.
    src = make_test_video(tmp_path / "full.avi", 30, codec="mjpeg")
    with av.open(str(src)) as c:
        packet_pos = [p.pos for p in c.demux(video=0) if p.size]
    data = src.read_bytes()
    # cut exactly before frame 15's chunk: decodes cleanly to 15 frames
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: packet_pos[15] - 8])  # 8 = AVI chunk header before the frame data
    v = decode_video(cut, None)
    assert v.header_num_frames == 30
    assert v.num_frames == decoded_frame_count(cut) == 15
    # cut inside frame 15: the decoder raises after 15 good frames -> rejected as truncated
    cut.write_bytes(data[: packet_pos[15] + 100])
    with pytest.raises(VideoError, match="truncated or corrupt after 15 frames"):
        decode_video(cut, None)


def test_decode_fps_resampling(videos):
    path = videos / "walk/walk_0.mp4"  # 22 frames at 10 fps = 2.2 s
    full = decode_video(path, None).frames
    half = decode_video(path, None, fps=5)
    assert half.fps == 5.0 and half.num_frames == 11
    for k, frame in enumerate(half.frames):  # output time k/5 s -> source frame 2k
        assert np.array_equal(frame, full[2 * k])
    double = decode_video(path, None, fps=20)
    assert double.num_frames == 44
    for k, frame in enumerate(double.frames):  # k/20 s -> nearest source frame, ties to the earlier
        assert np.array_equal(frame, full[k // 2])
    third = decode_video(path, None, fps=3.3333333333)  # 0.3 s steps -> 0, 3, 6, ..., 21
    assert third.num_frames == 8
    assert all(np.array_equal(f, full[3 * k]) for k, f in enumerate(third.frames))


def test_decode_nonzero_start_timestamp(tmp_path):
    path = make_test_video(tmp_path / "late.mp4", 20, start_frame=35)  # first frame at 3.5 s
    with av.open(str(path)) as c:
        assert next(c.decode(video=0)).time == pytest.approx(3.5)
    full = decode_video(path, None)
    assert full.num_frames == 20
    half = decode_video(path, None, fps=5)
    assert half.num_frames == 10 and all(np.array_equal(f, full.frames[2 * k]) for k, f in enumerate(half.frames))


@pytest.mark.parametrize("name,reason", list(BAD_VIDEOS.items())[:-2] + [("missing.mp4", "file not found")])
def test_decode_errors(videos, name, reason):
    with pytest.raises(VideoError, match=reason.split(" (")[0]) as e:
        decode_video(videos / "bad" / name, 32)
    assert e.value.path == str(videos / "bad" / name) and str(e.value).startswith(str(videos / "bad" / name))


def test_encode_jpeg_frames_roundtrip():
    frames = [pattern_frame(i, (64, 48)) for i in range(3)]
    jpegs = encode_jpeg_frames(frames, quality=95)
    for frame, jpeg in zip(frames, jpegs):
        assert jpeg[:2] == b"\xff\xd8"
        decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.abs(decoded.astype(int) - frame).mean() < 6  # RGB order kept


@pytest.mark.parametrize("pack_type", [bytes, memoryview, lambda b: np.frombuffer(b, np.uint8)])
def test_frame_from_pack_slices_entries_and_rejects_offsets_outside_the_pack(pack_type):
    blob = pack_type(b"aaBBBc")
    offsets = np.array([0, 2, 5, 6, 9], np.int32)  # the last entry runs past the 6-byte pack
    assert [bytes(shards.frame_from_pack(blob, offsets, i)) for i in range(3)] == [b"aa", b"BBB", b"c"]
    with pytest.raises(ValueError, match=r"entry 3 spans bytes \[6, 9\) of a 6-byte pack"):
        shards.frame_from_pack(blob, offsets, 3)


@pytest.mark.parametrize("codec,container_name", [("h264", "mp4"), ("vp9", "webm"), ("mjpeg", "avi")])
def test_encode_video(codec, container_name):
    frames = [pattern_frame(i, (64, 48)) for i in range(20)]
    data, n = encode_video(frames, 10.0, codec, gop=8)
    assert n == 20
    with av.open(io.BytesIO(data)) as c:
        assert container_name in c.format.name
        stream = c.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (64, 48)
        packets = [p for p in c.demux(stream) if p.size]
    keyframes = [i for i, p in enumerate(packets) if p.is_keyframe]
    if codec == "mjpeg":
        assert keyframes == list(range(20))
    else:
        assert keyframes == [0, 8, 16]  # exactly every gop frames
        assert [p.pts for p in packets] == sorted(p.pts for p in packets)  # no B-frames: no reordering
    with av.open(io.BytesIO(data)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert np.mean([np.abs(d.astype(int) - f).mean() for d, f in zip(decoded, frames)]) < 10


def test_encode_video_rejects_odd_size():
    with pytest.raises(ValueError, match="even frame size"):
        encode_video([np.zeros((47, 64, 3), np.uint8)], 10, "h264", 8)


# ---------------------------------------------------------------------------------------------
# pack: output contents


def test_manifest(packed, videos):
    m = shards.load_manifest(packed)
    items, classes = inputs(videos)
    good = [it for it in items if "/bad/" not in it.path]
    assert m["format_version"] == 1
    options = ("layout", "codec", "short_side", "jpeg_quality", "min_frames", "fps")
    assert [m[k] for k in options] == ["jpeg", "jpeg", 32, 90, 16, None]
    assert m["classes"] == CLASSES and m["num_classes"] == 3
    assert m["num_samples"] == len(good) == 12
    assert m["num_rejected"] == len(BAD_VIDEOS)
    assert set(m["splits"]) == {"train", "val"}
    assert m["splits"]["val"]["class_counts"] == {"jump": 1, "run": 1, "walk": 1}
    assert m["splits"]["train"]["class_counts"] == {"jump": 3, "run": 3, "walk": 3}
    total_frames = sum(decoded_frame_count(it.path) for it in good)
    assert sum(s["num_frames"] for s in m["splits"].values()) == total_frames
    assert sum(s["duration_seconds"] for s in m["splits"].values()) == pytest.approx(total_frames / 10)
    flat = []
    for split, s in m["splits"].items():
        assert s["num_samples"] == sum(sh["num_samples"] for sh in s["shards"])
        assert s["num_bytes"] == sum(sh["num_bytes"] for sh in s["shards"])
        for i, sh in enumerate(s["shards"]):
            assert sh["path"] == f"{split}/{split}-{i:06d}.tar" and sh["index_path"] == f"{split}/{split}-{i:06d}.idx"
            assert (packed / sh["path"]).stat().st_size == sh["num_bytes"]
            flat.append({**sh, "split": split})
    assert m["shards"] == flat
    total_bytes = sum(sh["num_bytes"] for sh in flat)
    assert m["bytes_per_video"] == pytest.approx(total_bytes / 12)
    assert m["bytes_per_hour_of_video"] == pytest.approx(total_bytes / (total_frames / 10 / 3600))
    tars, idxs, n = shards.split_shards(packed, "train")
    assert n == 9 and len(tars) == len(idxs) == len(m["splits"]["train"]["shards"])
    assert all(os.path.isfile(t) for t in tars + idxs)
    # only the final files remain
    names = {p.name for p in packed.rglob("*")}
    assert not [n for n in names if n.endswith((".partial", ".tmp"))]


def test_rejections_logged_with_reasons(packed, videos):
    lines = [json.loads(line) for line in (packed / "rejected.jsonl").read_text().splitlines()]
    by_name = {Path(r["path"]).name: r for r in lines}
    assert set(by_name) == set(BAD_VIDEOS)
    for name, reason in BAD_VIDEOS.items():
        assert reason in by_name[name]["reason"], by_name[name]
        assert by_name[name]["split"] == "train" and by_name[name]["path"] == str(videos / "bad" / name)


def test_shards_follow_the_sample_contract(packed, videos):
    m = shards.load_manifest(packed)
    items, _ = inputs(videos)
    split_of = {it.path: it.split for it in items}
    seen_sources = set()
    for split, s in m["splits"].items():
        sample_index = 0
        for sh in s["shards"]:
            with open(packed / sh["path"], "rb") as f:
                header = f.read(512)
            assert header[257:263] == b"ustar\x00"  # POSIX ustar, not GNU / pax
            samples = read_samples(packed / sh["path"])
            assert len(samples) == sh["num_samples"]
            for key, members, data in samples:
                assert key == f"{sample_index:08d}"
                exts = [shards.split_member_name(mb.name)[1] for mb in members]
                assert exts == ["info", "json", "cls", "frames", "offsets"]
                assert all(mb.mtime == 0 and mb.uid == 0 and mb.isfile() for mb in members)
                info = shards.decode_info(data["info"])
                meta = json.loads(data["json"])
                assert info["sample_index"] == sample_index == meta["sample_index"]
                for field in ("num_frames", "label", "height", "width"):
                    assert meta[field] == info[field]
                assert data["cls"] == str(info["label"]).encode()
                assert CLASSES[info["label"]] == meta["class_name"] == Path(meta["source"]).parent.name
                assert split_of[meta["source"]] == split and meta["source"] not in seen_sources
                seen_sources.add(meta["source"])
                src_frames = decoded_frame_count(meta["source"])
                assert info["num_frames"] == src_frames == meta["source_num_decoded_frames"]
                assert meta["source_num_frames_header"] == src_frames  # these test files' headers are honest
                assert (meta["layout"], meta["codec"], meta["jpeg_quality"], meta["fps"]) == ("jpeg", "jpeg", 90, 10.0)
                portrait = meta["source_width"] < meta["source_height"]
                assert (info["width"], info["height"]) == ((32, 42) if portrait else (42, 32))
                offsets = shards.decode_offsets(data["offsets"])
                assert len(offsets) == info["num_frames"] + 1 and offsets[-1] == len(data["frames"])
                for i in range(info["num_frames"]):
                    jpeg = shards.frame_from_pack(data["frames"], offsets, i)
                    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                    assert img.shape == (info["height"], info["width"], 3)
                sample_index += 1
    assert len(seen_sources) == 12


def test_index_matches_dali_wds2idx(packed, tmp_path):
    from wds2idx import IndexCreator

    for sh in shards.load_manifest(packed)["shards"]:
        ref = tmp_path / "ref.idx"
        with IndexCreator(str(packed / sh["path"]), str(ref), verbose=False) as creator:
            creator.create_index()
        assert (packed / sh["index_path"]).read_text() == ref.read_text()


def test_dali_reader_reads_shards_with_our_index(packed):
    from nvidia.dali import fn, pipeline_def, types

    tars, idxs, n = shards.split_shards(packed, "train")
    expected = [shards.decode_info(d["info"]) for t in tars for _, _, d in read_samples(t)]

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        info, offsets = fn.readers.webdataset(
            paths=tars,
            index_paths=idxs,
            ext=["info", "offsets"],
            dtypes=[types.INT32, types.INT32],
            random_shuffle=False,
            name="reader",
        )
        return info, offsets

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == n
    got = []
    while len(got) < n:
        info, offsets = p.run()
        for k in range(len(info)):
            values = np.array(info[k])
            got.append(dict(zip(shards.INFO_FIELDS, values.tolist())))
            assert len(np.array(offsets[k])) == values[shards.INFO_NUM_FRAMES] + 1
    assert got[:n] == expected


def read_dali_index(idx_path) -> list[list[tuple[str, int, int]]]:
    """Per sample, (ext, data offset, size) of every member, as our DALI index lists them."""
    header, *lines = Path(idx_path).read_text().splitlines()
    assert header.split()[0] == shards.DALI_INDEX_VERSION and int(header.split()[1]) == len(lines)
    samples = []
    for line in lines:
        fields = line.split()
        samples.append([(fields[i], int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)])
    return samples


@pytest.mark.parametrize("dataset", ["packed", "packed_flow"])
def test_webdataset_library_reads_our_shards(dataset, request):
    """The format's interoperability promise: the `webdataset` library reads a packed shard
    as the same samples (keys, members, bytes) as shards.py and its DALI index describe."""
    import webdataset

    root = request.getfixturevalue(dataset)
    manifest = shards.load_manifest(root)
    checked = 0
    for sh in manifest["shards"]:
        tar_bytes = (root / sh["path"]).read_bytes()
        got = list(webdataset.WebDataset(str(root / sh["path"]), shardshuffle=False))
        ours = read_samples(root / sh["path"])
        index = read_dali_index(root / sh["index_path"])
        assert len(got) == len(ours) == len(index) == sh["num_samples"]
        for sample, (key, _, data), indexed in zip(got, ours, index):
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            assert sample["__key__"] == key and members == data
            assert [ext for ext, _, _ in indexed] == list(data)
            assert all(tar_bytes[offset:offset + size] == members[ext] for ext, offset, size in indexed)
            info = shards.decode_info(members["info"])
            assert int(members["cls"]) == info["label"] == json.loads(members["json"])["label"]
            assert key == f"{info['sample_index']:08d}"
            checked += 1
    assert checked == manifest["num_samples"]
    if dataset == "packed_flow":
        assert {"flow.frames", "flow.offsets", "warped_flow.frames", "warped_flow.offsets"} <= set(members)


def test_shard_size_bound(packed, videos, tmp_path):
    m = shards.load_manifest(packed)
    sizes = [sh["num_bytes"] for sh in m["shards"]]
    assert max(sizes) <= SHARD_BYTES and len(m["splits"]["train"]["shards"]) >= 3
    assert any(sh["num_samples"] >= 2 for sh in m["shards"])
    # a bound smaller than any sample: one sample per shard, nothing lost
    items, classes = inputs(videos)
    tiny = pack_dataset(items, classes, tmp_path / "tiny", **{**PACK_KW, "shard_size_bytes": 1000})
    assert all(sh["num_samples"] == 1 for sh in tiny["shards"]) and tiny["num_samples"] == 12


def test_order_is_shuffled_and_deterministic(packed, videos, tmp_path):
    items, classes = inputs(videos)

    def sources(out):
        tars = shards.split_shards(out, "train")[0]
        return [json.loads(d["json"])["source"] for t in tars for _, _, d in read_samples(t)]

    # same seed, other worker count: byte-identical shards
    same = pack_dataset(items, classes, tmp_path / "same", **{**PACK_KW, "workers": 1})
    assert all_shard_bytes(tmp_path / "same") == all_shard_bytes(packed)
    assert without_time(same) == without_time(shards.load_manifest(packed))
    order = sources(packed)
    csv_order = [it.path for it in items if it.split == "train" and it.path in set(order)]
    assert sorted(order) == sorted(csv_order) and order != csv_order  # shuffled across shards
    pack_dataset(items, classes, tmp_path / "seed1", **{**PACK_KW, "seed": 1})
    assert sorted(sources(tmp_path / "seed1")) == sorted(order) and sources(tmp_path / "seed1") != order


# ---------------------------------------------------------------------------------------------
# pack: resuming


def test_resume_after_losing_the_last_shard(packed, videos, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(packed, out)
    journal = out / "train" / "_journal.jsonl"
    lines = journal.read_text().splitlines()
    shard_lines = [i for i, line in enumerate(lines) if json.loads(line)["type"] == "shard"]
    last = json.loads(lines[shard_lines[-1]])
    del lines[shard_lines[-1]]
    journal.write_text("".join(line + "\n" for line in lines) + '{"type": "shard", "pa')  # + a torn line
    (out / last["path"]).unlink()
    (out / last["index_path"]).unlink()
    (out / "train" / "train-000099.tar.partial").write_bytes(b"half a shard")
    last_number = int(Path(last["path"]).stem.split("-")[1])
    prev = out / "train" / f"train-{last_number - 1:06d}.tar"
    prev_mtime = prev.stat().st_mtime_ns
    (out / "manifest.json").unlink()

    items, classes = inputs(videos)
    stats: dict = {}
    manifest = pack_dataset(items, classes, out, **PACK_KW, run_stats=stats)
    assert without_time(manifest) == without_time(shards.load_manifest(packed))
    assert all_shard_bytes(out) == all_shard_bytes(packed)
    assert not (out / "train" / "train-000099.tar.partial").exists()
    assert prev.stat().st_mtime_ns == prev_mtime  # finished shards are kept, not rewritten
    assert stats["packed"] == last["num_samples"] and stats["rejected"] == 0
    assert (out / "rejected.jsonl").read_text() == (packed / "rejected.jsonl").read_text()


def test_resume_after_interrupt(packed, videos, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    items, classes = inputs(videos)
    real_add = writer.ShardWriter.add
    calls = []

    class Crash(Exception):
        pass

    def add_then_crash(self, members, stats):
        calls.append(1)
        if len(calls) == 6:
            raise Crash  # as if Ctrl-C / the machine died mid-shard
        real_add(self, members, stats)

    monkeypatch.setattr(writer.ShardWriter, "add", add_then_crash)
    with pytest.raises(Crash):
        pack_dataset(items, classes, out, **PACK_KW)
    monkeypatch.setattr(writer.ShardWriter, "add", real_add)
    assert not (out / "manifest.json").exists()
    num_train_shards = len(shards.load_manifest(packed)["splits"]["train"]["shards"])
    assert 1 <= len(list((out / "train").glob("*.tar"))) < num_train_shards
    stats: dict = {}
    manifest = pack_dataset(items, classes, out, **PACK_KW, run_stats=stats)
    assert stats["skipped"] > 0
    assert without_time(manifest) == without_time(shards.load_manifest(packed))
    assert all_shard_bytes(out) == all_shard_bytes(packed)


def test_rerun_of_finished_pack_does_nothing(packed, videos, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(packed, out)
    items, classes = inputs(videos)
    stats: dict = {}
    manifest = pack_dataset(items, classes, out, **PACK_KW, run_stats=stats)
    assert (stats["packed"], stats["rejected"], stats["skipped"]) == (0, 0, len(items))
    assert without_time(manifest) == without_time(shards.load_manifest(packed))


def test_options_mismatch_fails_unless_overwrite(packed, videos, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(packed, out)
    items, classes = inputs(videos)
    with pytest.raises(PackError, match=r"different options \(jpeg_quality: 90 -> 80\).*new --out.*--overwrite"):
        pack_dataset(items, classes, out, **{**PACK_KW, "jpeg_quality": 80})
    with pytest.raises(PackError, match="classes differ"):
        pack_dataset(items, classes + ["zzz"], out, **PACK_KW)
    manifest = pack_dataset(items, classes, out, **{**PACK_KW, "jpeg_quality": 80, "overwrite": True})
    assert manifest["jpeg_quality"] == 80 and manifest["num_samples"] == 12
    assert json.loads((out / "_options.json").read_text())["jpeg_quality"] == 80


def test_refuses_a_directory_that_is_not_a_pack(videos, tmp_path):
    items, classes = inputs(videos)
    (tmp_path / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(PackError, match="is not a `tsn pack` output"):
            pack_dataset(items, classes, tmp_path, **PACK_KW, overwrite=overwrite)
    assert (tmp_path / "precious.txt").exists()


def test_second_packer_on_the_same_directory_fails(packed, videos, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(packed, out)
    items, classes = inputs(videos)
    with journal.lock_out_dir(out):  # as if another `tsn pack` were running on it
        with pytest.raises(PackError, match="another `tsn pack` is writing to this directory"):
            pack_dataset(items, classes, out, **PACK_KW)
    assert pack_dataset(items, classes, out, **PACK_KW)["num_samples"] == 12


def test_video_moved_to_another_split_fails(packed, videos, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(packed, out)
    items, classes = inputs(videos)
    moved = [VideoItem(it.path, it.label, it.class_name, "train") for it in items]
    with pytest.raises(PackError, match="is in split 'train' now but was packed into 'val'"):
        pack_dataset(moved, classes, out, **PACK_KW)


# ---------------------------------------------------------------------------------------------
# pack: failures and codecs


def test_worker_crash_and_unexpected_errors_reject_only_that_video(videos, tmp_path, monkeypatch):
    names = ("crash.mp4", "boom.mp4", "crash2.mp4")
    for name in names:
        shutil.copy(videos / "walk/walk_0.mp4", tmp_path / name)
    real = encode.encode_sample

    def flaky(path, opts):
        if "crash" in Path(path).name:
            os.kill(os.getpid(), signal.SIGKILL)  # like a decoder segfault or the OOM killer
        if path.endswith("boom.mp4"):
            raise RuntimeError("boom")
        return real(path, opts)

    monkeypatch.setattr(encode, "encode_sample", flaky)
    # The patch must reach the worker processes: fork them from this process for this test (the
    # packer itself uses a forkserver, whose clean workers would not see it).
    import multiprocessing

    monkeypatch.setattr(procpool, "mp_context", lambda preload=(): multiprocessing.get_context("fork"))
    items, classes = inputs(videos)
    extra = [VideoItem(str(tmp_path / n), 2, "walk", "train") for n in names]
    manifest = pack_dataset(items + extra, classes, tmp_path / "out", **{**PACK_KW, "workers": 3})
    assert manifest["num_samples"] == 12 and manifest["num_rejected"] == len(BAD_VIDEOS) + 3
    rejected = map(json.loads, (tmp_path / "out/rejected.jsonl").read_text().splitlines())
    reasons = {Path(r["path"]).name: r["reason"] for r in rejected}
    assert reasons["crash.mp4"].startswith("the decoding process died")
    assert reasons["crash2.mp4"].startswith("the decoding process died")
    assert reasons["boom.mp4"] == "unexpected error: RuntimeError: boom"


def test_nothing_usable_raises(videos, tmp_path):
    items, classes = inputs(videos)
    bad = [it for it in items if "/bad/" in it.path]
    with pytest.raises(PackError, match=r"nothing usable packed: all 7 input videos were rejected"):
        pack_dataset(bad, classes, tmp_path / "out", **PACK_KW)
    assert len((tmp_path / "out/rejected.jsonl").read_text().splitlines()) == 7
    with pytest.raises(PackError, match="no input videos"):
        pack_dataset([], classes, tmp_path / "out2", **PACK_KW)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"codec": "h265"}, "unknown codec 'h265'"),
        ({"jpeg_quality": 0}, "jpeg_quality must be in 1..100"),
        ({"gop": 0}, "gop must be >= 1"),
        ({"fps": 0}, "fps must be > 0"),
        ({"workers": 0}, "workers must be >= 1"),
        ({"shard_size_bytes": 0}, "shard_size_bytes must be positive"),
    ],
)
def test_bad_options(videos, tmp_path, kw, match):
    items, classes = inputs(videos)
    with pytest.raises(PackError, match=match):
        pack_dataset(items, classes, tmp_path / "out", **{**PACK_KW, **kw})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("codec", ["h264", "vp9", "mjpeg"])
def test_video_codecs(videos, tmp_path, codec):
    items, classes = inputs(videos)
    items = [it for it in items if "/bad/" not in it.path][:6]
    kw = {**PACK_KW, "codec": codec, "gop": 4, "fps": 5, "min_frames": 8}
    m = pack_dataset(items, classes, tmp_path / "out", **kw)
    assert (m["layout"], m["codec"], m["gop"], m["fps"]) == ("video", codec, 4, 5.0)
    for sh in m["shards"]:
        for key, members, data in read_samples(tmp_path / "out" / sh["path"]):
            assert [shards.split_member_name(mb.name)[1] for mb in members] == ["info", "json", "cls", "video"]
            info, meta = shards.decode_info(data["info"]), json.loads(data["json"])
            assert meta["gop"] == (1 if codec == "mjpeg" else 4) and meta["fps"] == 5.0
            assert info["num_frames"] == meta["num_frames"] == decoded_frame_count(io.BytesIO(data["video"]))
            # 10 -> 5 fps: output times k/5 s inside the n/10 s span -> ceil(n / 2) frames
            assert info["num_frames"] == -(-decoded_frame_count(meta["source"]) // 2)
            with av.open(io.BytesIO(data["video"])) as c:
                frame = next(c.decode(video=0))
                assert (frame.width, frame.height) == (info["width"], info["height"])


@pytest.mark.parametrize("codec,size", [("h264", (62, 46)), ("jpeg", (63, 47))])
def test_odd_source_size_kept(tmp_path, codec, size):
    # 4:2:0 video cannot store odd sizes: with short_side=None the video layout drops the last
    # row/column; the JPEG layout keeps the exact source size.
    make_test_video(tmp_path / "odd.mp4", 20, (63, 47), pix_fmt="yuv444p")
    item = VideoItem(str(tmp_path / "odd.mp4"), 0, "a", "train")
    m = pack_dataset([item], ["a"], tmp_path / "out", **{**PACK_KW, "codec": codec, "short_side": None})
    ((_, _, data),) = read_samples(tmp_path / "out" / m["shards"][0]["path"])
    info = shards.decode_info(data["info"])
    assert (info["width"], info["height"]) == size and info["num_frames"] == 20


# ---------------------------------------------------------------------------------------------
# CLI


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tsn")
    pack_cli.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pack", *argv])
    return args.func(args)


def test_cli_packs_with_rejects(videos, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli("--input", str(videos / "labels.csv"), "--out", str(out), "--short-side", "32", "--shard-size", "100kB",
             "--workers", "2")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "19/19" in captured.err and "rejected=7" in captured.err  # the progress bar
    assert "packed 12 videos (train 9, val 3)" in captured.out
    assert "rejected 7 videos" in captured.out and "videos/s" in captured.out and "per hour of video" in captured.out
    assert without_time(shards.load_manifest(out))["num_samples"] == 12
    assert json.loads((out / "_options.json").read_text())["short_side"] == 32


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--input", "{videos}/nope.csv"], "nope.csv: file not found"),
        (["--input", "{videos}/bad_only.csv"], "nothing usable packed"),
        (["--input", "{videos}/labels.csv", "--split-id", "2"], "--split-id applies to --ucf101/--hmdb51"),
        (["--ucf101", "{videos}"], "video_root is required"),
        (["--input", "{videos}/labels.csv", "--gop", "0", "--codec", "h264"], "gop must be >= 1"),
    ],
)
def test_cli_user_errors_exit_2(videos, tmp_path, capsys, argv, match):
    rows = ["path,label"] + [f"bad/{n},run" for n in BAD_VIDEOS]  # every one unusable
    (videos / "bad_only.csv").write_text("\n".join(rows) + "\n")
    argv = [a.format(videos=videos) for a in argv] + ["--out", str(tmp_path / "out"), "--no-progress", "--workers", "1"]
    assert cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv", [["--out", "x"], ["--input", "a.csv", "--out", "x", "--shard-size", "lots"], ["--input", "a.csv"]]
)
def test_cli_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli(*argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1048576", 1048576),
        ("256MB", 256 * 10**6),
        ("256M", 256 * 10**6),
        ("256MiB", 256 * 2**20),
        ("1GiB", 2**30),
        ("1gib", 2**30),
        ("1.5GB", 1_500_000_000),
        ("500k", 500_000),
        ("500K", 500_000),
        ("64KiB", 65536),
        ("2T", 2 * 10**12),
        (" 10 kB ", 10_000),
        ("100B", 100),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "12XB", "-5MB", "0", "0.1", "1.2.3MB", "MB"])
def test_parse_size_errors(text):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)
