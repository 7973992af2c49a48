"""Motion modalities end to end on real packed shards: `tsn pack --modalities`, the sample and
manifest contract, rejection of videos whose flow fails, the DALI flow pipeline against the
reference loader, the flow-aware flip, and the missing-modality error."""

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from videos import make_test_video

from app.pipeline import pipeline_spec
from cli import pack as pack_cli
from dataloading.format import shards
from dataloading.planning import augment, sampling
from dataloading.sources import flow
from tools import reference
from dataloading.modality import FLOW_MODALITIES
from dataloading.pack import PackError, pack_dataset
from dataloading.pack.inspect import inspect_dataset, verify_dataset
from dataloading.pipeline.dali_pipeline import META_NAMES, sharded_pipeline
from dataloading.pipeline.dali_planner import batches_per_epoch
from dataloading.pipeline.finish import finish_frames
from dataloading.pipeline.loader import TSNLoader, pipeline_outputs
from dataloading.planning.spec import PipelineSpec
from dataloading.sources.items import VideoItem
from dataloading.sources.video_io import read_video_frames

FLOW_CROP = augment.CropSpec(input_size=40, resize_short=48, scales=(1.0, 0.875, 0.75))


def spec_for(mode, k=3, l=2, modality="flow", batch_size=4, seed=7, resize_backend="auto", flip=True):
    crop = augment.CropSpec(input_size=40, resize_short=48, scales=(1.0, 0.875, 0.75), flip=flip)
    return PipelineSpec(mode=mode, num_segments=k, snippet_length=l, modality=modality, batch_size=batch_size,
                        crop=crop, num_threads=1, seed=seed, resize_backend=resize_backend)


def samples_by_index(dataset, split):
    tars, _, _ = shards.split_shards(dataset, split)
    return {shards.decode_info(s.members["info"])["sample_index"]: s for t in tars for s in reference.iter_shard(t)}


# ---------------------------------------------------------------------------------------------
# packing


def test_pack_writes_flow_entries_and_metadata(packed_flow, synth_dir):
    m = shards.load_manifest(packed_flow)
    assert m["modalities"] == ["rgb", "flow", "warped_flow"] == shards.manifest_modalities(m)
    assert m["flow"]["algorithm"] == "dis" and m["flow"]["bound"] == 20.0
    assert m["num_rejected"] == 0
    options = json.loads((packed_flow / "_options.json").read_text())
    assert (options["modalities"], options["flow_algorithm"], options["flow_bound"]) == (
        ["rgb", "flow", "warped_flow"], "dis", 20.0)
    checked = 0
    for sample in samples_by_index(packed_flow, "train").values():
        info = shards.decode_info(sample.members["info"])
        meta = json.loads(sample.members["json"])
        n, h, w = info["num_frames"], info["height"], info["width"]
        assert list(sample.members) == ["info", "json", "cls", "frames", "offsets", "flow.frames", "flow.offsets",
                                        "warped_flow.frames", "warped_flow.offsets"]
        assert meta["modalities"] == ["rgb", "flow", "warped_flow"]
        for mod in FLOW_MODALITIES:
            assert meta[mod]["algorithm"] == "dis" and meta[mod]["bound"] == 20.0
            assert meta[mod]["num_frames"] == n - 1 and meta[mod]["order"] == "x0,y0,x1,y1,..."
            offsets = shards.decode_offsets(sample.members[f"{mod}.offsets"])
            assert len(offsets) == 2 * (n - 1) + 1 and offsets[-1] == len(sample.members[f"{mod}.frames"])
        assert 0 <= meta["warped_flow"]["homography_fallbacks"] <= n - 1
        if checked < 3:
            # the stored planes are the flow of the stored frames, x then y, up to JPEG loss
            src = read_video_frames(meta["source"], 48)
            expected = list(flow.video_flow(src, "dis", 20, ("flow",)))
            stored = reference.decode_flow(sample, "flow", np.arange(n - 1))
            assert len(expected) == len(stored) == n - 1
            for e, s in zip(expected, stored):
                assert s.shape == (h, w, 2) and s.dtype == np.uint8
                for c in (0, 1):
                    assert np.abs(s[..., c].astype(int) - e["flow"][c]).mean() < 1.5
            checked += 1
    assert checked == 3
    assert verify_dataset(packed_flow)["ok"]
    summary = inspect_dataset(packed_flow)
    assert summary["modalities"] == ["rgb", "flow", "warped_flow"] and summary["flow"]["algorithm"] == "dis"


def test_rgb_only_pack_is_unchanged(packed_jpeg):
    m = shards.load_manifest(packed_jpeg)
    assert m["modalities"] == ["rgb"] and m["flow"] is None
    sample = next(iter(samples_by_index(packed_jpeg, "train").values()))
    assert list(sample.members) == ["info", "json", "cls", "frames", "offsets"]
    legacy = {k: v for k, v in m.items() if k not in ("modalities", "flow")}  # a pack made before flow
    assert shards.manifest_modalities(legacy) == ["rgb"]


@pytest.fixture(scope="module")
def flow_videos(tmp_path_factory):
    """3 good 64x48 videos and one of 8x6 pixels, whose frames are too small for optical flow."""
    root = tmp_path_factory.mktemp("flow-videos")
    items = []
    for i, name in enumerate(["a", "b", "c"]):
        items.append(VideoItem(str(make_test_video(root / f"{name}.mp4", 12 + i)), i % 2, ["jump", "run"][i % 2],
                               "train"))
    items.append(VideoItem(str(make_test_video(root / "tiny.mp4", 12, (8, 6))), 0, "jump", "train"))
    return root, items


def test_video_whose_flow_fails_is_rejected_and_counted(flow_videos, tmp_path):
    _, items = flow_videos
    manifest = pack_dataset(items, ["jump", "run"], tmp_path / "out", short_side=None, min_frames=8, workers=2,
                            progress=False, modalities=("rgb", "flow"), flow_algorithm="farneback")
    assert manifest["num_samples"] == 3 and manifest["num_rejected"] == 1
    assert manifest["modalities"] == ["rgb", "flow"]
    rejected = [json.loads(line) for line in (tmp_path / "out/rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and rejected[0]["path"].endswith("tiny.mp4")
    assert rejected[0]["reason"].startswith("flow extraction failed: frames of 8x6 are too small for optical flow")
    # the same video packs fine without flow
    rgb = pack_dataset(items, ["jump", "run"], tmp_path / "rgb", short_side=None, min_frames=8, workers=1,
                       progress=False)
    assert rgb["num_samples"] == 4 and rgb["num_rejected"] == 0


def test_unexpected_flow_error_in_a_worker_rejects_only_that_video(flow_videos, tmp_path, monkeypatch):
    _, items = flow_videos
    real_push = flow.FlowExtractor.push

    def push(self, frame):  # fails on the 14-frame video only (c.mp4, its 14th frame)
        self.count = getattr(self, "count", 0) + 1
        if self.count == 14:
            raise RuntimeError("simulated OpenCV failure")
        return real_push(self, frame)

    monkeypatch.setattr(flow.FlowExtractor, "push", push)
    # Workers come from a forkserver (a clean process), which would not see the patch: run the
    # same pool machinery on threads in this process instead.
    import concurrent.futures

    from dataloading import procpool

    monkeypatch.setattr(procpool, "new_pool",
                        lambda workers, preload=(): concurrent.futures.ThreadPoolExecutor(workers))
    manifest = pack_dataset(items[:3], ["jump", "run"], tmp_path / "out", short_side=32, min_frames=8, workers=2,
                            progress=False, modalities=("rgb", "warped_flow"), flow_algorithm="dis")
    assert manifest["num_samples"] == 2 and manifest["num_rejected"] == 1
    rejected = json.loads((tmp_path / "out/rejected.jsonl").read_text())
    assert rejected["path"].endswith("c.mp4") and "simulated OpenCV failure" in rejected["reason"]


def test_flow_on_video_layout(flow_videos, tmp_path):
    _, items = flow_videos
    out = tmp_path / "vp9"
    manifest = pack_dataset(items[:2], ["jump", "run"], out, codec="vp9", short_side=32, min_frames=8, workers=1,
                            progress=False, modalities=("rgb", "flow"), flow_algorithm="dis")
    assert manifest["layout"] == "video" and manifest["num_samples"] == 2
    assert verify_dataset(out)["ok"]
    loader = TSNLoader(out, "train", spec_for("val", k=2, l=2, batch_size=2))
    batch = next(iter(loader))
    assert batch.frames.shape == (2, 2, 2, 2, 40, 40)


@pytest.mark.parametrize("kw,match", [
    (dict(modalities=("flow",)), "must include rgb"),
    (dict(modalities=("rgb", "depth")), "unknown modalities"),
    (dict(modalities=("rgb", "flow", "flow")), "listed twice"),
    (dict(modalities=("rgb", "flow"), flow_algorithm="raft"), "unknown flow algorithm 'raft'"),
    (dict(modalities=("rgb", "flow"), flow_bound=0), "flow bound must be > 0"),
    (dict(modalities=("rgb", "flow"), min_frames=1), "min_frames must be >= 2"),
])
def test_bad_flow_options(flow_videos, tmp_path, kw, match):
    _, items = flow_videos
    with pytest.raises(PackError, match=match):
        pack_dataset(items, ["jump", "run"], tmp_path / "out", **{"progress": False, "min_frames": 8, **kw})
    assert not (tmp_path / "out").exists()


def test_resume_guards_modalities_and_accepts_legacy_options(flow_videos, tmp_path):
    _, items = flow_videos
    kw = dict(short_side=32, min_frames=8, workers=1, progress=False)
    out = tmp_path / "out"
    pack_dataset(items[:3], ["jump", "run"], out, **kw)
    # an _options.json written before motion modalities existed resumes as rgb-only
    options = json.loads((out / "_options.json").read_text())
    legacy = {k: v for k, v in options.items() if k not in ("modalities", "flow_algorithm", "flow_bound")}
    (out / "_options.json").write_text(json.dumps(legacy))
    assert pack_dataset(items[:3], ["jump", "run"], out, **kw)["num_samples"] == 3
    with pytest.raises(PackError, match=r"modalities: \['rgb'\] -> \['rgb', 'flow'\]"):
        pack_dataset(items[:3], ["jump", "run"], out, modalities=("rgb", "flow"), **kw)
    flow_out = tmp_path / "flow"
    pack_dataset(items[:3], ["jump", "run"], flow_out, modalities=("rgb", "flow"), flow_algorithm="dis", **kw)
    with pytest.raises(PackError, match="flow_algorithm: 'dis' -> 'farneback'"):
        pack_dataset(items[:3], ["jump", "run"], flow_out, modalities=("rgb", "flow"), flow_algorithm="farneback",
                     **kw)
    # an rgb-only pack does not depend on the (unused) flow options
    assert pack_dataset(items[:3], ["jump", "run"], out, flow_algorithm="farneback", **kw)["num_samples"] == 3


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tsn")
    pack_cli.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pack", *argv])
    return args.func(args)


def test_cli_modalities(flow_videos, tmp_path, capsys):
    root, items = flow_videos
    csv = root / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"{n}.mp4,{c}\n" for n, c in (("a", "jump"), ("b", "run"), ("c", "jump"))))
    (root / "classes.txt").write_text("jump\nrun\n")
    out = tmp_path / "out"
    assert cli("--input", str(csv), "--out", str(out), "--short-side", "32", "--min-frames", "8", "--workers", "1",
               "--no-progress", "--modalities", "rgb,flow,warped_flow", "--flow-algorithm", "farneback",
               "--flow-bound", "15") == 0
    captured = capsys.readouterr()
    assert "modalities rgb, flow, warped_flow, flow farneback bound 15" in captured.out
    m = shards.load_manifest(out)
    assert m["modalities"] == ["rgb", "flow", "warped_flow"] and m["flow"]["bound"] == 15.0
    with pytest.raises(SystemExit):
        cli("--input", str(csv), "--out", str(tmp_path / "x"), "--modalities", "rgb,depth")
    assert "invalid modalities 'rgb,depth'" in capsys.readouterr().err
    assert cli("--input", str(csv), "--out", str(tmp_path / "y"), "--no-progress", "--modalities", "flow") == 2
    assert "must include rgb" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# DALI pipeline vs the reference loader


def run_epoch(pipe, n_batches, spec):
    out = []
    for _ in range(n_batches):
        b = pipeline_outputs(pipe.run(), spec, "jpeg")
        if spec.resolved_resize_backend == "torch":
            b["frames"] = finish_frames(b["frames"], b["crop"], spec)
        out.append([b[name].numpy() for name in ("frames", *META_NAMES)])
    return out


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("modality,mode,k,l", [
    ("flow", "train", 3, 5), ("flow", "val", 3, 2), ("flow", "test", 4, 1), ("warped_flow", "train", 2, 3)])
def test_dali_flow_equals_reference(packed_flow, modality, mode, k, l, backend):
    spec = spec_for(mode, k, l, modality, resize_backend=backend)
    tars, idxs, n = shards.split_shards(packed_flow, "train")
    pipe = sharded_pipeline(tars, idxs, "jpeg", spec)
    pipe.build()
    by_index = samples_by_index(packed_flow, "train")
    checked = flipped = 0
    for b, (frames, labels, sidx, fidx, crops, _, _) in enumerate(run_epoch(pipe, batches_per_epoch(n, 1, 4), spec)):
        draws = sampling.batch_draws(spec.seed, 0, 0, 0, b, spec.batch_size, k)
        for r in range(spec.batch_size):
            sample = by_index[int(sidx[r])]
            ref = reference.load_sample(sample, "jpeg", spec, draws[r])
            n_frames = shards.decode_info(sample.members["info"])["num_frames"]
            # flow frame indices: L consecutive among the N - 1 flow frames
            np.testing.assert_array_equal(fidx[r], ref[3])
            np.testing.assert_array_equal(
                ref[3], sampling.frame_indices(mode, n_frames - 1, k, l, draws[r][:k]).reshape(-1))
            np.testing.assert_array_equal(crops[r], ref[4])
            expected_shape = (k * l, 2, 40, 40) if mode != "test" else (10, k * l, 2, 40, 40)
            assert frames[r].shape == ref[0].shape == expected_shape
            diff = np.abs(frames[r] - ref[0])
            # same planes up to IDCT / resize rounding (measured <= 0.0005; a missing x inversion
            # on a flipped sample measured > 0.5, a crop one position off > 0.05)
            assert diff.mean() < 0.01, diff.mean()
            checked += 1
            flipped += int(crops[r][4])
    assert checked >= n
    if mode == "train":
        assert flipped > 0  # the flow-aware flip was exercised


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_flipped_test_views_invert_x_flow(packed_flow, backend):
    """Test view i + 5 is view i mirrored, with x flow negated: q -> 255 - q, i.e. in normalised
    units v -> -v - 1/s (s = the flow scale), and y flow unchanged."""
    spec = spec_for("test", k=2, l=2, batch_size=2, resize_backend=backend)
    batch = next(iter(TSNLoader(packed_flow, "val", spec)))
    x = batch.frames  # (B, 10, K, L, 2, H, W)
    assert x.shape == (2, 10, 2, 2, 2, 40, 40)
    s = spec.norm_std_255[0]
    tol = 1e-4 if backend == "torch" else 2.0 / s  # the dali backend resizes the inverted planes: rounding
    for i in range(5):
        plain, flipped = x[:, i], x[:, i + 5]
        torch.testing.assert_close(flipped[..., 1, :, :], plain[..., 1, :, :].flip(-1), rtol=0, atol=tol)
        torch.testing.assert_close(flipped[..., 0, :, :], -plain[..., 0, :, :].flip(-1) - 1 / s, rtol=0, atol=tol)
    assert x[:, :, :, :, 0].std() > 0.02  # there is motion to invert (measured ~0.045)


def test_loader_flow_layout_and_normalisation(packed_flow):
    spec = spec_for("val", k=3, l=2, batch_size=2, flip=False)
    batch = next(iter(TSNLoader(packed_flow, "train", spec)))
    assert batch.frames.shape == (2, 3, 2, 2, 40, 40) and batch.frames.dtype == torch.float32
    assert batch.frame_indices.shape == (2, 6)
    by_index = samples_by_index(packed_flow, "train")
    for r in range(2):
        sample = by_index[int(batch.sample_index[r])]
        q = np.stack(reference.decode_flow(sample, "flow", batch.frame_indices[r].numpy()))  # (6, H, W, 2)
        c = augment.center_crop(q.shape[1], q.shape[2], spec.crop)
        crop = q[:, c.y : c.y + c.height, c.x : c.x + c.width].astype(np.float32)
        # (q - 128) / (255 * mean(std)): zero flow (stored 128) -> exactly 0
        expected_mean = (crop.reshape(6, -1, 2).mean(axis=1) - 128) / (255 * np.mean(spec.std))
        got = batch.frames[r].reshape(6, 2, -1).mean(-1).numpy()
        np.testing.assert_allclose(got, expected_mean, atol=0.02)


def test_missing_modality_is_a_clear_error(packed_jpeg):
    with pytest.raises(ValueError, match=rf"{packed_jpeg}: modality 'flow' needs 'flow' entries.*modalities \['rgb'\] only"):
        TSNLoader(packed_jpeg, "train", spec_for("train", modality="flow"))
    with pytest.raises(ValueError, match="rgb,warped_flow"):
        TSNLoader(packed_jpeg, "train", spec_for("train", modality="warped_flow"))


def test_config_wires_flow_modalities(packed_flow):
    from app.config import load_config

    cfg = load_config(None, ["model.modality=warped_flow", "model.snippet_length=2", "augment.scales=[1, 0.875, 0.75]",
                             f"data.shards={packed_flow}", "augment.input_size=40", "augment.resize_short=48",
                             "augment.flip=true"])
    spec = pipeline_spec(cfg, "train", batch_size=2)
    assert (spec.modality, spec.snippet_length, spec.channels) == ("warped_flow", 2, 2)
    assert spec.norm_mean_255 == (128.0, 128.0)
    assert spec.norm_std_255 == pytest.approx((255 * np.mean(spec.std),) * 2)  # tiny: ImageNet std
    assert spec.crop.scales == (1.0, 0.875, 0.75)
    batch = next(iter(TSNLoader(packed_flow, "train", spec)))
    assert batch.frames.shape == (2, cfg.model.num_segments, 2, 2, 40, 40)
    test = pipeline_spec(cfg, "test", batch_size=1)
    assert next(iter(TSNLoader(packed_flow, "val", test))).frames.shape == (1, 10, 25, 2, 2, 40, 40)


def test_corrupt_flow_member_is_quarantined(packed_flow, tmp_path):
    dataset = tmp_path / "copy"
    shutil.copytree(packed_flow, dataset)
    shard = shards.load_manifest(dataset)["splits"]["train"]["shards"][0]
    line = (dataset / shard["index_path"]).read_text().splitlines()[1].split()
    member = dict(zip(line[0::4], zip(line[1::4], line[2::4])))
    offset, size = (int(v) for v in member["flow.frames"])
    with open(dataset / shard["path"], "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    loader = TSNLoader(dataset, "train", spec_for("val", batch_size=3))
    seen = [int(i) for b in loader for i in b.sample_index]
    assert len(loader.skipped) == 1 and "flow" in loader.skipped[0]["reason"]
    n = shards.load_manifest(dataset)["splits"]["train"]["num_samples"]
    assert len(seen) == len(set(seen)) == n - 1
    # rgb from the same shards is untouched by the corrupt flow member
    rgb = TSNLoader(dataset, "train", PipelineSpec(mode="val", batch_size=3, crop=FLOW_CROP, num_threads=1))
    assert len([i for b in rgb for i in b.sample_index]) == n


# --- flow computed on the fly by DALI (GPU only): everything that runs without a GPU ---------

def dali_flow_spec(mode="train", modality="flow", device="gpu", **kw):
    return PipelineSpec(mode=mode, num_segments=3, snippet_length=2, modality=modality, batch_size=2,
                        device=device, flow_source="dali", **kw)


@pytest.mark.parametrize("layout,decoder", [("jpeg", "Image"), ("video", "Video")])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_dali_flow_source_graph(layout, decoder, mode):
    from test_dali_pipeline import graph_devices

    pipe = sharded_pipeline(["x.tar"], ["x.idx"], layout, dali_flow_spec(mode), device_id=0)
    devices = graph_devices(pipe)
    # one fn.optical_flow per snippet on RGB frames decoded on the GPU (nvJPEG / NVDEC)
    assert sum(op.name.strip("_").startswith("OpticalFlow") for op in pipe._ops) == 3
    assert devices["OpticalFlow"] == {"gpu"} and devices[decoder] == {"gpu"}
    assert devices["CropMirrorNormalize"] == {"gpu"}
    # the packed-flow graph reads the flow planes instead and has no optical-flow operator
    packed = PipelineSpec(mode=mode, num_segments=3, snippet_length=2, modality="flow", batch_size=2, device="gpu")
    assert "OpticalFlow" not in graph_devices(sharded_pipeline(["x.tar"], ["x.idx"], layout, packed,
                                                             device_id=0))


def test_dali_flow_source_reads_the_rgb_entries():
    spec = dali_flow_spec()
    assert spec.dali_flow and spec.stored_modality == "rgb" and spec.channels == 2
    packed = PipelineSpec(modality="flow", snippet_length=2)
    assert not packed.dali_flow and packed.stored_modality == "flow"


@pytest.mark.parametrize("kw,match", [
    (dict(device="cpu"), "needs device 'gpu'"),
    (dict(modality="warped_flow"), "homography estimated at packing"),
    (dict(modality="rgb_diff"), "modality 'flow'"),
])
def test_dali_flow_source_argument_checks(kw, match):
    with pytest.raises(ValueError, match=match):
        dali_flow_spec(**kw)
    with pytest.raises(ValueError, match="flow_source must be one of"):
        PipelineSpec(flow_source="gpu")


@pytest.mark.parametrize("overrides,match", [
    (["loader.flow_source=dali", "model.modality=flow"], "loader.flow_source: 'dali' .* loader.device=gpu"),
    (["loader.flow_source=dali", "loader.device=gpu", "model.modality=warped_flow"], "not 'warped_flow'"),
    (["loader.flow_source=nvof"], "loader.flow_source: must be one of packed, dali"),
])
def test_dali_flow_source_config_checks(overrides, match):
    from app.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
    cfg = load_config(None, ["loader.flow_source=dali", "loader.device=gpu", "model.modality=flow"])
    assert pipeline_spec(cfg, "train").dali_flow


def test_dali_flow_quantisation_matches_the_packed_flow():
    """The graph's upsample + quantise step (run here on CPU) against OpenCV's bilinear upsampling
    and `flow.quantize`, the packer's own quantisation: within one step of 8-bit rounding."""
    import cv2
    from nvidia.dali import fn, pipeline_def

    from dataloading.pipeline.dali_flow import quantized_flow

    rng = np.random.default_rng(3)
    grids = [rng.normal(0, 12, size=(2, 6, 8, 2)).astype(np.float32) for _ in range(2)]  # beyond +-20 too
    grids[1][0] = 0.0  # zero flow must read 128 exactly
    size_hw = (24, 32)

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        g = fn.external_source(source=lambda: grids, batch=True, layout="FHWC")
        h = fn.external_source(source=lambda: [np.array(size_hw[0], np.int32)] * 2, batch=True)
        w = fn.external_source(source=lambda: [np.array(size_hw[1], np.int32)] * 2, batch=True)
        return quantized_flow(g, h, w)

    p = pipe()
    p.build()
    (out,) = p.run()
    for i, grid in enumerate(grids):
        got = np.asarray(out[i])
        assert got.shape == (2, *size_hw, 2) and got.dtype == np.uint8
        up = np.stack([cv2.resize(f, size_hw[::-1], interpolation=cv2.INTER_LINEAR) for f in grid])
        expected = flow.quantize(up)
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
        assert (got == expected).mean() > 0.95
    assert (np.asarray(out[1])[0] == 128).all()
    assert np.asarray(out[0]).min() == 0 and np.asarray(out[0]).max() == 255  # clipped at +-20 px
