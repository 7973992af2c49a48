"""Fault scenarios of packing and of the packed data read at training time (issue 17, pack side),
each through the CLI (`tsn pack`, `tsn inspect`, `tsn train --local`, `tsn stream`):

* a SIGTERMed / SIGKILLed ``tsn pack --workers N`` leaves no process behind and its caller's
  stdout reaches EOF; the re-run resumes;
* a source cut in half that still decodes (faststart mp4, mkv, AVI) is rejected with a reason; a
  drop-frame AVI whose index lists far more frames than it codes is packed (issue 24);
* bytes changed after packing (JPEG scan data XOR-ed) are named by ``tsn inspect --verify``
  (shard, sample, member) and skipped and counted by training; packs without checksums still
  read, with a note;
* a truncated shard stops training before it starts with one line naming it and the fix; a
  deleted index is rebuilt (in place, or run-locally for a dataset in object storage);
* low: a quoted CSV path holding a newline / U+2028, a rejected video fixed since, a class left
  without training videos, a full disk while packing.

The packed datasets come from the session fixtures of ``conftest.py`` (copied before damaging).
"""

from __future__ import annotations

import fractions
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path

import av
import numpy as np
import pytest
from procs import ROOT
from videos import make_test_video, pattern_frame

from cli import main as cli
from dataloading.format import shards
from tools import reference

# 12 train / 6 val videos of 6 classes; 4 a batch: 3 steps an epoch (as tests/test_train_local.py)
TINY = ["augment.input_size=32", "augment.resize_short=48", "model.backbone=tiny", "model.test_segments=5",
        "train.batch_size_per_worker=4", "train.test_batch_size_per_worker=3", "train.epochs=1"]


def tsn(*argv) -> int:
    """``tsn ARGV`` in this process, through `cli.main.main` (its error handling)."""
    return cli.main([str(a) for a in argv])


def train_local(dataset, run_dir, *extra) -> int:
    sets = []
    for kv in (f"data.shards={dataset}", *TINY, *extra):
        sets += ["--set", kv]
    return tsn("train", "--local", "--run-dir", run_dir, *sets)


def copy_pack(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def first_train_shard(dataset: Path) -> tuple[Path, Path]:
    shard = json.loads((dataset / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    return dataset / shard["path"], dataset / shard["index_path"]


def index_members(idx: Path, sample: int = 0) -> dict[str, tuple[int, int, str]]:
    """{ext: (data offset, size, member name)} of sample number ``sample`` of a DALI index."""
    fields = idx.read_text().splitlines()[1 + sample].split()
    return {fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)}


def xor_scan_data(tar: Path, idx: Path, sample: int = 0, num_bytes: int = 64) -> str:
    """XOR ``num_bytes`` of the entropy-coded data of every JPEG of one sample, in place (the
    file keeps its size; libjpeg still decodes the frames, with damaged pixels). Its key."""
    members = index_members(idx, sample)
    with open(tar, "r+b") as f:
        off, size, _ = members["offsets"]
        f.seek(off)
        offsets = np.frombuffer(f.read(size), "<i4")
        base, _, name = members["frames"]
        for i in range(len(offsets) - 1):
            f.seek(base + offsets[i])
            jpeg = f.read(int(offsets[i + 1] - offsets[i]))
            sos = jpeg.index(b"\xff\xda")  # start of scan; its header length follows
            start = sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big") + 8
            f.seek(base + offsets[i] + start)
            f.write(bytes(b ^ 0x5A for b in jpeg[start:start + num_bytes]))
    return name.split(".")[0]


def strip_checksums(dataset: Path) -> None:
    """Rewrite every shard of ``dataset`` as packs made before checksums were: ``KEY.info``
    back to its 5 fields; indexes and the manifest's sizes updated."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            tar_path = dataset / shard["path"]
            with tarfile.open(tar_path) as tar:
                members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
            with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as out:
                for m, data in members:
                    if m.name.endswith(".info"):
                        data = data[:4 * len(shards.INFO_FIELDS)]
                        m.size = len(data)
                    out.addfile(m, io.BytesIO(data))
            shards.write_dali_index(tar_path, dataset / shard["index_path"])
            shard["num_bytes"] = tar_path.stat().st_size
            shard.pop("sha256", None)  # recorded since, like the checksums
    top = {s["path"]: s["num_bytes"] for split in manifest["splits"].values() for s in split["shards"]}
    for s in manifest["shards"]:
        s["num_bytes"] = top[s["path"]]
        s.pop("sha256", None)
    (dataset / "manifest.json").write_text(json.dumps(manifest))


# --- orphaned processes ----------------------------------------------------------------------


def _marked_processes(marker: str) -> list[int]:
    """Pids of the live processes whose environment holds ``marker`` (inherited from the pack)."""
    needle = f"TSN_FAULT_MARKER={marker}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    with open(f"/proc/{pid}/stat") as st:
                        if st.read().rsplit(")", 1)[1].split()[0] != "Z":  # zombies are gone already
                            found.append(int(pid))
        except OSError:
            continue
    return found


def _wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_pack_leaves_no_process_behind_and_resumes(synth_dir, tmp_path):
    # The 18 videos pack in ~0.4 s on an idle machine, too fast to be killed mid-pack: the same
    # videos 12 times over (symlinked directories) keep the pack busy for seconds.
    copies = 12
    lines = (synth_dir / "labels.csv").read_text().splitlines()
    rows = [lines[0]]
    for c in range(copies):
        (tmp_path / f"copy{c}").symlink_to(synth_dir / "videos", target_is_directory=True)
        rows += [line.replace("videos/", f"copy{c}/", 1) for line in lines[1:]]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    out = tmp_path / "packed"
    argv = [sys.executable, "-m", "cli.main", "pack", "--input", labels, "--out", out,
            "--workers", "2", "--short-side", "48", "--min-frames", "8", "--val-fraction", "0.34",
            "--shard-size", "60k", "--no-progress"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        marker = uuid.uuid4().hex
        proc = subprocess.Popen([str(a) for a in argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "TSN_FAULT_MARKER": marker})
        # the pack, its resource tracker, the forkserver and at least one worker
        assert _wait_until(lambda: len(_marked_processes(marker)) >= 4, 60), proc.communicate(timeout=60)
        time.sleep(0.2)  # workers busy decoding (the whole pack takes seconds)
        assert proc.poll() is None, "the pack finished before it could be killed"
        proc.send_signal(sig)
        try:
            eof = threading.Event()
            threading.Thread(target=lambda: (proc.stdout.read(), eof.set()), daemon=True).start()
            assert eof.wait(10), f"{sig.name}: the caller's stdout is still open 10 s after the kill"
            assert proc.wait(10) == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
            assert _wait_until(lambda: not _marked_processes(marker), 5), \
                f"{sig.name}: processes of the pack still alive: {_marked_processes(marker)}"
        finally:
            for pid in _marked_processes(marker):  # never leak them into the rest of the session
                os.kill(pid, signal.SIGKILL)
        if sig == signal.SIGTERM:
            assert "terminated; run the same command again to resume" in proc.stderr.read().decode()
    done = subprocess.run([str(a) for a in argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 18 * copies
    assert tsn("inspect", out, "--verify", "--no-progress") == 0


# --- truncated but decodable sources -------------------------------------------------------------


def _write_h264(path: Path, fmt: str, num_frames: int = 60, options: dict | None = None) -> Path:
    """An H.264 video of noisy pattern frames (big enough frames that half the file is half the frames)."""
    size = (160, 120)
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            noise = np.random.default_rng(i).integers(0, 128, (size[1], size[0], 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(noise + pattern_frame(i, size) // 2, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_source_cut_in_half_that_still_decodes_is_rejected(tmp_path, capsys):
    whole = [_write_h264(tmp_path / "fast.mp4", "mp4", options={"movflags": "+faststart"}),
             _write_h264(tmp_path / "clip.mkv", "matroska")]
    rows = ["path,label,split"]
    for i, path in enumerate(whole):
        data = path.read_bytes()
        half = path.with_name(f"{path.stem}-half{path.suffix}")
        half.write_bytes(data[:len(data) // 2])
        rows += [f"{path.name},c{i},train", f"{half.name},c{i},train"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    assert tsn("pack", "--input", tmp_path / "labels.csv", "--out", tmp_path / "out", "--short-side", "48",
               "--workers", "2", "--no-progress") == 0
    rejected = {Path(r["path"]).name: r["reason"]
                for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())}
    assert set(rejected) == {"fast-half.mp4", "clip-half.mkv"}, rejected
    for reason in rejected.values():  # 60 frames at 10 fps: 6 s, about half left
        m = re.match(r"its frames stop at (\d+\.\d+) s of the (\d+\.\d+) s its header states \((\d+) frames", reason)
        assert m and 1.5 < float(m[1]) < 4.5 and float(m[2]) == pytest.approx(6.0, abs=0.15), reason
        assert 15 < int(m[3]) < 45, reason
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_samples"] == 2


def _write_drop_frame_avi(path: Path, coded: int = 68, listed: int = 444, fps: int = 30) -> Path:
    """An MJPEG AVI of ``coded`` frames spread over ``listed`` frame periods, as a drop-frame
    capture writes it: the muxer fills each timestamp gap with an empty index entry, so the
    header lists ~``listed`` frames while ``coded`` decode, and they run to its duration."""
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        stream.codec_context.time_base = fractions.Fraction(1, fps)
        for i in range(coded):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, (64, 48)), format="rgb24")
            frame.pts, frame.time_base = round(i * listed / coded), fractions.Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_a_drop_frame_avi_is_packed_and_the_same_file_cut_in_half_is_rejected(tmp_path):
    """Issue 24: a header's frame count is no evidence of truncation (the AVI lists ~440
    frames and codes 68, which play to the end of its duration); a cut is (its frames stop at
    half the duration)."""
    drop = _write_drop_frame_avi(tmp_path / "drop.avi")
    with av.open(str(drop)) as container:
        listed = container.streams.video[0].frames
        coded_at = [p.pos for p in container.demux(video=0) if p.size]
    assert listed > 400 and len(coded_at) == 68  # else this file no longer tests anything
    # cut just before frame 34's chunk (8 bytes: its chunk header): decodes cleanly to 34 frames
    (tmp_path / "drop-half.avi").write_bytes(drop.read_bytes()[:coded_at[34] - 8])
    (tmp_path / "labels.csv").write_text("path,label,split\ndrop.avi,a,train\ndrop-half.avi,a,train\n")
    assert tsn("pack", "--input", tmp_path / "labels.csv", "--out", tmp_path / "out", "--short-side", "48",
               "--no-progress") == 0
    rejected = {Path(r["path"]).name: r["reason"]
                for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())}
    assert set(rejected) == {"drop-half.avi"} and "its frames stop at" in rejected["drop-half.avi"], rejected
    packed = [json.loads(sample.members["json"]) for tar in shards.split_shards(tmp_path / "out", "train")[0]
              for sample in reference.iter_shard(tar)]
    assert [(m["num_frames"], m["source_num_frames_header"]) for m in packed] == [(68, listed)]


# --- silent corruption: checksums ----------------------------------------------------------------


def test_corrupted_jpeg_bytes_are_named_by_verify_and_skipped_by_training(packed_jpeg, tmp_path, capsys, caplog):
    data = copy_pack(packed_jpeg, tmp_path / "data")
    tar, idx = first_train_shard(data)
    key = xor_scan_data(tar, idx)
    rel = tar.relative_to(data).as_posix()

    assert tsn("inspect", data, "--verify", "--no-progress") == 1
    out = capsys.readouterr().out
    assert "verify: 18 samples" in out and "2 bad" in out  # the sample, and its shard by its SHA-256
    assert f"{rel} {key}: member frames (entries 0, 1, 2, 3, 4, ...)" in out and "recorded at pack time" in out

    caplog.set_level(logging.WARNING, logger="dataloading.format.quarantine")
    assert train_local(data, tmp_path / "run") == 0
    skipped = [r.getMessage() for r in caplog.records if "skipping corrupt sample" in r.getMessage()]
    assert len(skipped) == 1 and f"sample {key} in {tar}" in skipped[0] and "member frames" in skipped[0], skipped
    assert json.loads((tmp_path / "run" / "results.json").read_text())["num_val_videos"] == 6


def test_packs_without_checksums_still_verify_and_stream_with_a_note(packed_jpeg, tmp_path, capsys):
    data = copy_pack(packed_jpeg, tmp_path / "old")
    strip_checksums(data)
    assert tsn("inspect", data, "--verify", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "18 samples in" in out and "0 bad" in out
    assert "note: 18 samples have no checksums (packed before per-sample checksums were recorded)" in out
    assert tsn("stream", "--set", f"data.shards={data}", "--set", "augment.input_size=32", "--set",
               "augment.resize_short=48", "--set", "train.batch_size_per_worker=4", "--epochs", "1",
               "--no-progress") == 0


# --- damaged shards at training time --------------------------------------------------------------


def test_truncated_shard_stops_training_before_it_starts_with_one_line(packed_jpeg, tmp_path, capsys):
    data = copy_pack(packed_jpeg, tmp_path / "data")
    tar, _ = first_train_shard(data)
    size = tar.stat().st_size
    with open(tar, "r+b") as f:
        f.truncate(int(size * 0.6))
    assert train_local(data, tmp_path / "run") == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{tar}: {int(size * 0.6)} bytes on disk, manifest lists {size}" in lines[0]
    assert "`tsn pack`" in lines[0] and f"tsn inspect --verify {data}" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_deleted_index_is_rebuilt_and_training_runs(packed_jpeg, tmp_path):
    data = copy_pack(packed_jpeg, tmp_path / "data")
    _, idx = first_train_shard(data)
    expected = idx.read_text()
    idx.unlink()
    assert train_local(data, tmp_path / "run") == 0
    assert idx.read_text() == expected  # rebuilt in place, identical to the packer's


def test_deleted_index_in_object_storage_is_rebuilt_run_locally(packed_jpeg_s3, s3_env, packed_jpeg, tmp_path):
    from dataloading.store import storage

    shard = json.loads((packed_jpeg / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    idx_uri = storage.join(packed_jpeg_s3, shard["index_path"])
    saved = storage.read_bytes(idx_uri)
    storage.delete(idx_uri)
    try:
        tars, idxs, _ = shards.split_shards(packed_jpeg_s3, "train")
        assert Path(idxs[0]).parent == shards.rebuilt_index_dir()
        assert Path(idxs[0]).read_bytes() == saved and idxs[1:] == [storage.join(packed_jpeg_s3, s)
                                                                  for s in _index_paths(packed_jpeg, "train")[1:]]
        assert tsn("stream", "--set", f"data.shards={packed_jpeg_s3}", "--set", "augment.input_size=32", "--set",
                   "augment.resize_short=48", "--set", "train.batch_size_per_worker=4", "--epochs", "1",
                   "--no-progress") == 0
    finally:
        storage.put_bytes(idx_uri, saved)


def _index_paths(dataset: Path, split: str) -> list[str]:
    return [s["index_path"] for s in json.loads((dataset / "manifest.json").read_text())["splits"][split]["shards"]]


# --- low: inputs, rejected-then-fixed, empty classes, a full disk ------------------------------------


@pytest.fixture
def small_inputs(tmp_path) -> Path:
    """6 short videos of 2 classes + labels.csv (path,label) in ``tmp_path / "in"``."""
    d = tmp_path / "in"
    d.mkdir()
    rows = ["path,label"]
    for c in ("a", "b"):
        for i in range(3):
            make_test_video(d / f"{c}{i}.mp4", 20 + i)
            rows.append(f"{c}{i}.mp4,{c}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d


def pack_args(inputs: Path, out: Path, *extra) -> list:
    return ["pack", "--input", inputs / "labels.csv", "--out", out, "--short-side", "32", "--min-frames", "8",
            "--workers", "2", "--no-progress", *extra]


def test_quoted_csv_paths_with_a_newline_or_line_separator_are_kept(small_inputs, tmp_path):
    odd = ["new\nline.mp4", "line\u2028separator.mp4"]
    for name in odd:
        shutil.copy(small_inputs / "a0.mp4", small_inputs / name)
    with open(small_inputs / "labels.csv", "a", newline="") as f:
        f.write("".join(f'"{name}",b\n' for name in odd))
    assert tsn(*pack_args(small_inputs, tmp_path / "out")) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == 8 and manifest["num_rejected"] == 0


def test_rejected_video_is_retried_once_its_file_changed(small_inputs, tmp_path):
    broken = small_inputs / "b2.mp4"
    good = broken.read_bytes()
    broken.write_bytes(good[:200])  # not a decodable video
    out = tmp_path / "out"
    assert tsn(*pack_args(small_inputs, out)) == 0
    assert [json.loads(ln)["path"] for ln in (out / "rejected.jsonl").read_text().splitlines()] == [str(broken)]
    assert tsn(*pack_args(small_inputs, out)) == 0  # unchanged: not tried again
    assert json.loads((out / "manifest.json").read_text())["num_rejected"] == 1
    broken.write_bytes(good)  # fixed
    assert tsn(*pack_args(small_inputs, out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 6 and manifest["num_rejected"] == 0
    assert (out / "rejected.jsonl").read_text() == ""


def test_class_left_without_training_videos_is_named(small_inputs, tmp_path, capsys):
    for i in range(3):  # every video of class b is broken
        (small_inputs / f"b{i}.mp4").write_bytes(b"not a video")
    assert tsn(*pack_args(small_inputs, tmp_path / "out", "--val-fraction", "0.34")) == 0
    out = capsys.readouterr().out
    assert "warning: class 'b' has no training videos" in out and "class 'a'" not in out


def test_full_disk_while_packing_ends_in_one_line_and_keeps_nothing_half_written(small_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "_lock").touch()  # what a pack killed before its options file was written leaves
    # The first shard's partial file is /dev/full: every write to it fails with ENOSPC.
    partial = out / "train" / "train-000000.tar.partial"
    partial.symlink_to("/dev/full")
    assert tsn(*pack_args(small_inputs, out, "--shard-size", "1MB")) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {partial}: No space left on device; free some space")
    assert not partial.exists() and not partial.is_symlink()  # the unfinished shard is gone
    assert not (out / "train" / "train-000000.tar").exists() and not (out / "manifest.json").exists()
    assert tsn(*pack_args(small_inputs, out, "--shard-size", "1MB")) == 0  # space again: it resumes
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 6


@pytest.mark.parametrize("field,value", [("index_path", "/tmp/tsn-escape.idx"), ("index_path", "../outside/x.idx"),
                                         ("path", "../outside/train-000000.tar"), ("path", "C:/x.tar")])
def test_a_manifest_naming_files_outside_its_dataset_is_refused(packed_jpeg, tmp_path, capsys, field, value):
    """Issue 24's fault pass: a manifest entry pointing outside the dataset made `tsn stream`
    read a tar there and write a rebuilt index there (/tmp/evil.idx). Refused in one line."""
    data = copy_pack(packed_jpeg, tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0][field] = value
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert tsn("stream", "--set", f"data.shards={data}", "--set", "augment.input_size=32", "--set",
               "augment.resize_short=48", "--epochs", "1", "--no-progress") == 2
    err = capsys.readouterr().err
    assert f"split 'train' shard 0: {field} {value!r} is not a relative path inside the dataset" in err
    assert not Path("/tmp/tsn-escape.idx").exists() and not (tmp_path / "outside").exists()
    assert tsn("inspect", data, "--no-progress") == 2
    assert "is not a relative path inside the dataset" in capsys.readouterr().err


def test_symlink_loops_and_broken_links_in_a_folder_tree_are_one_line_or_rejected(synth_dir, tmp_path, capsys):
    """Issue 24's fault pass: `tsn pack --folders LOOP` ended in a RuntimeError traceback, and a
    broken or looping video symlink vanished from the count (not packed, not rejected)."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert tsn("pack", "--folders", loop, "--out", tmp_path / "o", "--no-progress") == 2
    assert f"{loop}: a symlink loop (the class-folder root)" in capsys.readouterr().err
    # the same for every other input path (a looping labels CSV was a RuntimeError traceback too)
    for argv, what in ((["--input", loop], "the labels CSV"),
                       (["--kinetics", tmp_path / "none.csv", "--video-root", loop], "--video-root")):
        assert tsn("pack", *argv, "--out", tmp_path / "o", "--no-progress") == 2
        err = capsys.readouterr().err
        assert f"error: {loop}: a symlink loop ({what})" in err and "Traceback" not in err, err
    root = tmp_path / "root" / "walk"
    root.mkdir(parents=True)
    source = next(p for p in sorted(synth_dir.rglob("*")) if p.suffix in (".mp4", ".avi", ".mkv", ".webm"))
    shutil.copy(source, root / f"good{source.suffix}")
    (root / "dangling.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (root / "self.mp4").symlink_to(root / "self.mp4")
    assert tsn("pack", "--folders", root.parent, "--out", tmp_path / "out", "--short-side", "48", "--min-frames", "1",
               "--no-progress") == 0
    rejected = {Path(r["path"]).name for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text()
                                                     .splitlines())}
    assert rejected == {"dangling.mp4", "self.mp4"}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_samples"] == 1


def _rebuild_first_shard(data: Path, edit) -> Path:
    """Rewrite the first train shard of ``data`` through ``edit(members) -> members`` (a list
    of (TarInfo, bytes)), then its index and the manifest's size: a shard crafted by hand."""
    tar_path, idx_path = first_train_shard(data)
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, body in edit(members):
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    shards.write_dali_index(tar_path, idx_path)
    manifest = json.loads((data / "manifest.json").read_text())
    for entry in (manifest["splits"]["train"]["shards"][0], manifest["shards"][0]):
        entry["num_bytes"] = tar_path.stat().st_size
    (data / "manifest.json").write_text(json.dumps(manifest))
    return tar_path


def test_members_with_escaping_names_are_skipped_and_counted_never_written(packed_jpeg, tmp_path, caplog):
    """Issue 24's fault pass: a member `../evil.jpg` added to a shard, or a sample's frames
    renamed `../<key>.frames`, stopped the whole run (`sample ../evil has no member 'info'`).
    Now the foreign member is ignored with a warning, the sample that lost its frames is
    skipped and counted, the rest trains, and nothing is written outside the dataset."""
    data = copy_pack(packed_jpeg, tmp_path / "data")

    def edit(members):
        info, _ = members[0]
        key = shards.split_member_name(info.name)[0]
        out = []
        for m, body in members:
            if m.name == f"{key}.frames":
                m.name = f"../{key}.frames"
            out.append((m, body))
        evil = tarfile.TarInfo("../evil.jpg")
        return [*out[:3], (evil, b"\xff\xd8not a jpeg"), *out[3:]]

    caplog.set_level(logging.WARNING)
    _rebuild_first_shard(data, edit)  # its index written as a missing one is rebuilt (shards.write_dali_index)
    assert any("member group(s) that belong to no sample" in r.getMessage() and "../evil.jpg" in r.getMessage()
               for r in caplog.records)
    assert "../evil" not in first_train_shard(data)[1].read_text()
    from dataloading.format.shard_index import tar_table  # a node-cache copy's table, from its tar headers

    table = tar_table(str(first_train_shard(data)[0]), ("info", "frames", "offsets"))
    assert "../evil" not in table.keys and table.problems and all("no member" in p for p in table.problems.values())
    from dataloading.pack import inspect as ds_inspect

    v = ds_inspect.verify_dataset(data)  # the foreign groups are bad, not samples "without checksums"
    assert v["num_samples_without_checksums"] == 0 and any("evil" in (b["key"] or "") for b in v["bad_samples"])
    caplog.clear()
    assert train_local(data, tmp_path / "run") == 0
    messages = [r.getMessage() for r in caplog.records]
    skipped = [m for m in messages if "skipping corrupt sample" in m]
    assert len(skipped) == 1 and "no member 'frames' in the shard" in skipped[0], skipped
    assert json.loads((tmp_path / "run" / "results.json").read_text())["num_val_videos"] == 6
    assert not (tmp_path / "evil.jpg").exists() and not (data / "evil.jpg").exists()


def test_a_member_without_an_extension_leaves_an_index_the_readers_parse(packed_jpeg, tmp_path):
    data = copy_pack(packed_jpeg, tmp_path / "data")
    _rebuild_first_shard(data, lambda members: [*members, (tarfile.TarInfo("/tmp/evil"), b"x" * 40)])
    _, idx = first_train_shard(data)
    assert "/tmp/evil" not in idx.read_text()
    assert tsn("stream", "--set", f"data.shards={data}", "--set", "augment.input_size=32", "--set",
               "augment.resize_short=48", "--epochs", "1", "--no-progress") == 0


# --- a shard replaced or changed in place, of the same size: found, skipped, repaired ----------------


@pytest.fixture
def twin_inputs(tmp_path) -> Path:
    """6 copies of one video under names of one length, in 2 classes of one-letter names: packed
    one per shard, every shard has the same size (tar pads members to 512 bytes) and is valid
    in itself, so a swap passes every size and checksum check."""
    d = tmp_path / "twins"
    d.mkdir()
    make_test_video(d / "a0.mp4", 12)
    rows = ["path,label"]
    for c in ("a", "b"):
        for i in range(3):
            if (c, i) != ("a", 0):
                shutil.copy(d / "a0.mp4", d / f"{c}{i}.mp4")
            rows.append(f"{c}{i}.mp4,{c}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_suffix(".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def test_a_shard_replaced_by_another_of_the_same_size_is_found_skipped_and_repaired(twin_inputs, tmp_path, capsys,
                                                                                     caplog):
    out = tmp_path / "out"
    assert tsn(*pack_args(twin_inputs, out, "--shard-size", "1KB")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["splits"]["train"]["shards"]
    assert len(train) == 6 and len({s["num_bytes"] for s in train}) == 1 and all(len(s["sha256"]) == 64 for s in train)
    packed = {s["path"]: (out / s["path"]).read_bytes() for s in train}
    tar = [out / s["path"] for s in train]
    idx = [out / s["index_path"] for s in train]
    _swap(tar[0], tar[1])  # tar and index replaced together (a copy of the wrong shard)
    _swap(idx[0], idx[1])
    _swap(tar[2], tar[3])  # only the tars: the indexes no longer describe them
    capsys.readouterr()

    assert tsn("inspect", out, "--verify", "--no-progress") == 1
    text = capsys.readouterr().out
    for i in range(4):
        assert f"train/train-00000{i}.tar : SHA-256" in text, text
    assert "train/train-000000.tar : holds samples of other shards (1 of 1, e.g. 00000001; the manifest puts " \
           "from 00000000 below 00000001 here)" in text, text
    assert "train-000004.tar : SHA" not in text and "repair: run the `tsn pack` command" in text

    # training reads neither: their samples are skipped and counted, each with its reason
    caplog.set_level(logging.WARNING)
    assert tsn("stream", "--set", f"data.shards={out}", "--set", "augment.input_size=32", "--set",
               "augment.resize_short=48", "--set", "train.batch_size_per_worker=2", "--set", "model.num_segments=2",
               "--epochs", "1", "--no-progress") == 0
    messages = [r.getMessage() for r in caplog.records]
    skipped = [m for m in messages if "skipping corrupt sample" in m]
    assert any("train-000000.idx: holds samples the manifest places in other shards" in m for m in messages)
    assert len(skipped) == 4, skipped
    assert sum("belongs to another shard" in m for m in skipped) == 2
    assert sum("the shard does not match its index" in m for m in skipped) == 2

    # the repair: the same pack command with --verify re-packs what changed, and only then the rest
    assert tsn(*pack_args(twin_inputs, out, "--shard-size", "1KB", "--verify")) == 0
    text = capsys.readouterr()
    assert "verify: 6 shards already packed checked" in text.out and "4 had changed and were re-packed" in text.out
    assert "train/train-000000.tar: SHA-256" in text.err and "re-packing it" in text.err
    assert {s["path"]: (out / s["path"]).read_bytes() for s in train} == packed
    assert tsn("inspect", out, "--verify", "--no-progress") == 0


@pytest.mark.parametrize("journaled", ["sha256", "checksums only"])
def test_a_shard_changed_in_place_is_repaired_by_pack_verify(small_inputs, tmp_path, capsys, journaled):
    out = tmp_path / "out"
    assert tsn(*pack_args(small_inputs, out, "--shard-size", "20KB")) == 0
    if journaled == "checksums only":  # a pack journaled before shard digests were recorded
        journal = out / "train" / "_journal.jsonl"
        records = [json.loads(line) for line in journal.read_text().splitlines()]
        journal.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "sha256"}) + "\n" for r in records))
    tar, idx = first_train_shard(out)
    good = tar.read_bytes()
    key = xor_scan_data(tar, idx)  # same size; the JPEGs still decode
    assert tsn(*pack_args(small_inputs, out, "--shard-size", "20KB")) == 0  # a plain resume checks sizes only
    assert tar.read_bytes() != good
    capsys.readouterr()
    assert tsn(*pack_args(small_inputs, out, "--shard-size", "20KB", "--verify")) == 0
    err = capsys.readouterr().err
    reason = "SHA-256" if journaled == "sha256" else f"sample {key}: member frames"
    assert f"{tar}: {reason}" in err and "re-packing it" in err, err
    assert tar.read_bytes() == good
    assert tsn("inspect", out, "--verify", "--no-progress") == 0
