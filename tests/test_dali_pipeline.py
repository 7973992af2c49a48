"""The DALI pipeline against the reference loader (the oracle), on real packed shards."""

import json
from pathlib import Path
from collections import Counter

import numpy as np
import pytest
import torch

from dataloading.format import shards
from dataloading.pipeline import dali_pipeline, dali_planner
from dataloading.planning import augment, sampling
from tools import reference
from dataloading.pipeline.dali_pipeline import META_NAMES, sharded_pipeline
from dataloading.pipeline.dali_planner import batches_per_epoch
from dataloading.pipeline.finish import finish_frames, to_snippets
from dataloading.pipeline.loader import TSNLoader, pipeline_outputs
from dataloading.planning.spec import PipelineSpec
from damage import copy_with_wiped_frames

from test_sampling import CENTER_CASES, TRAIN_CASES  # noqa: E402  (the sampling tables, replayed by the graph)

CROP = augment.CropSpec(input_size=40, resize_short=48)


def spec_for(mode, k=3, l=1, modality="rgb", batch_size=4, seed=7, resize_backend="auto"):
    return PipelineSpec(mode=mode, num_segments=k, snippet_length=l, modality=modality, batch_size=batch_size,
                        crop=CROP, num_threads=1, seed=seed, resize_backend=resize_backend)


def run_epoch(pipe, n_batches, spec, layout="jpeg"):
    """Per batch: (frames, *META_NAMES) as numpy, frames finished like the loader does."""
    out = []
    for _ in range(n_batches):
        b = pipeline_outputs(pipe.run(), spec, layout)
        if spec.resolved_resize_backend == "torch":
            b["frames"] = finish_frames(b["frames"], b["crop"], spec)
        out.append([b[name].numpy() for name in ("frames", *META_NAMES)])
    return out


def samples_by_index(dataset, split):
    tars, _, _ = shards.split_shards(dataset, split)
    by = {}
    for t in tars:
        for s in reference.iter_shard(t):
            by[shards.decode_info(s.members["info"])["sample_index"]] = s
    return by


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("mode,k,l,modality", [
    ("train", 3, 1, "rgb"), ("train", 3, 2, "rgb_diff"), ("val", 5, 1, "rgb"), ("test", 4, 1, "rgb"),
    # the paper's single-snippet baseline: one frame per sample (issue 24)
    ("train", 1, 1, "rgb"), ("val", 1, 1, "rgb"), ("test", 1, 1, "rgb")])
def test_dali_equals_reference_on_jpeg_packs(packed_jpeg, mode, k, l, modality, backend):
    spec = spec_for(mode, k, l, modality, resize_backend=backend)
    tars, idxs, n = shards.split_shards(packed_jpeg, "train")
    pipe = sharded_pipeline(tars, idxs, "jpeg", spec)
    pipe.build()
    by_index = samples_by_index(packed_jpeg, "train")
    checked = 0
    for b, (frames, labels, sidx, fidx, crops, _, _) in enumerate(run_epoch(pipe, batches_per_epoch(n, 1, 4), spec)):
        draws = sampling.batch_draws(spec.seed, 0, 0, 0, b, spec.batch_size, k)
        for r in range(spec.batch_size):
            ref = reference.load_sample(by_index[int(sidx[r])], "jpeg", spec, draws[r])
            np.testing.assert_array_equal(fidx[r], ref[3])  # exact frame indices
            np.testing.assert_array_equal(crops[r], ref[4])  # exact crop box and flip
            assert int(labels[r]) == ref[1]
            assert frames[r].shape == ref[0].shape
            diff = np.abs(frames[r] - ref[0])
            # same pixels up to JPEG IDCT and resize-filter differences (measured ~0.002-0.004;
            # a crop shifted by one position or a missing flip measured 0.06-0.30)
            assert diff.mean() < 0.02, diff.mean()
            checked += 1
    assert checked >= n


def test_train_mode_is_reproducible_from_the_seed(packed_jpeg):
    tars, idxs, n = shards.split_shards(packed_jpeg, "train")

    def first_batches(seed):
        spec = spec_for("train", seed=seed)
        pipe = sharded_pipeline(tars, idxs, "jpeg", spec)
        pipe.build()
        return run_epoch(pipe, 2, spec)

    a, b, c = first_batches(3), first_batches(3), first_batches(4)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(x[4], y[4]) for x, y in zip(a, c))  # other seed, other crops


def test_second_epoch_uses_its_own_draws(packed_jpeg):
    spec = spec_for("train")
    tars, idxs, n = shards.split_shards(packed_jpeg, "train")
    bpe = batches_per_epoch(n, 1, spec.batch_size)
    pipe = sharded_pipeline(tars, idxs, "jpeg", spec)
    pipe.build()
    by_index = samples_by_index(packed_jpeg, "train")
    epochs = run_epoch(pipe, 2 * bpe, spec)
    for e in (0, 1):
        frames, labels, sidx, fidx, crops, _, _ = epochs[e * bpe]
        draws = sampling.batch_draws(spec.seed, e, 0, 0, 0, spec.batch_size, spec.num_segments)
        for r in range(spec.batch_size):
            ref = reference.load_sample(by_index[int(sidx[r])], "jpeg", spec, draws[r])
            np.testing.assert_array_equal(crops[r], ref[4])


@pytest.mark.parametrize("mode", ["train", "val"])
def test_two_ranks_equal_batches_and_cover_every_sample_once(packed_jpeg, mode):
    manifest = shards.load_manifest(packed_jpeg)
    n = manifest["splits"]["train"]["num_samples"]
    seen, lengths = [], []
    for rank in (0, 1):
        loader = TSNLoader(packed_jpeg, "train", spec_for(mode, batch_size=3), rank=rank, world_size=2)
        batches = list(loader)
        lengths.append((len(loader), len(batches)))
        seen.append([int(i) for b in batches for i in b.sample_index])
    assert lengths[0] == lengths[1] and lengths[0][0] == lengths[0][1] > 0
    assert not set(seen[0]) & set(seen[1])
    if mode == "val":  # partial last batches, padding dropped: exactly once overall
        assert sorted(seen[0] + seen[1]) == list(range(n))
    else:  # drop-last training: equal full batches, no sample twice
        assert all(c == 1 for c in Counter(seen[0] + seen[1]).values())


def test_loader_layout_and_rgb_difference(packed_jpeg):
    rgb = TSNLoader(packed_jpeg, "train", spec_for("val", k=3, l=1, batch_size=2))
    diff = TSNLoader(packed_jpeg, "train", spec_for("val", k=3, l=2, modality="rgb_diff", batch_size=2))
    b_rgb, b_diff = next(iter(rgb)), next(iter(diff))
    assert b_rgb.frames.shape == (2, 3, 1, 3, 40, 40) and b_rgb.frames.dtype == torch.float32
    assert b_diff.frames.shape == (2, 3, 2, 3, 40, 40)
    assert b_diff.frame_indices.shape == (2, 9)
    test = TSNLoader(packed_jpeg, "train", spec_for("test", k=4, batch_size=2))
    assert next(iter(test)).frames.shape == (2, 10, 4, 1, 3, 40, 40)


def test_to_snippets_takes_consecutive_differences():
    spec = spec_for("val", k=2, l=2, modality="rgb_diff")
    frames = torch.arange(1 * 6, dtype=torch.float32).reshape(1, 6, 1, 1, 1).expand(1, 6, 3, 2, 2) ** 2
    out = to_snippets(frames, spec)  # frames 0..5 -> values 0,1,4,9,16,25
    assert out.shape == (1, 2, 2, 3, 2, 2)
    np.testing.assert_array_equal(out[0, :, :, 0, 0, 0].numpy(), [[1, 3], [7, 9]])


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.mark.parametrize("fixture", ["packed_vp9", "packed_mjpeg"])
def test_video_layout_decodes_the_sampled_frames(request, packed_jpeg, fixture):
    """DALI's CPU video decoder returns, at indices i, the frames PyAV decodes at i from the
    same stored video; and they match the JPEG frame pack of the same source within the
    loss of a re-encode."""
    dataset = request.getfixturevalue(fixture)
    manifest = shards.load_manifest(dataset)
    assert manifest["layout"] == "video"
    spec = spec_for("val", k=4)
    tars, idxs, n = shards.split_shards(dataset, "train")
    pipe = sharded_pipeline(tars, idxs, "video", spec, decode_only=True)
    pipe.build()
    stored = samples_by_index(dataset, "train")
    jpeg_by_source = {json.loads(s.members["json"])["source"]: s
                      for s in samples_by_index(packed_jpeg, "train").values()}
    worst_same, worst_cross = 99.0, 99.0
    for _ in range(batches_per_epoch(n, 1, spec.batch_size)):
        out = pipeline_outputs(pipe.run(), spec, "video", decode_only=True)
        frames, sidx, fidx = out["frames"], out["sample_index"], out["frame_indices"]
        for r in range(len(sidx)):
            got = frames[r].numpy()
            sample = stored[int(sidx[r])]
            idx = fidx[r].numpy()
            ref = np.stack(reference.decode_frames(sample, "video", idx))
            assert got.shape == ref.shape
            worst_same = min(worst_same, psnr(got, ref))
            src = jpeg_by_source[json.loads(sample.members["json"])["source"]]
            cross = np.stack(reference.decode_frames(src, "jpeg", idx))
            worst_cross = min(worst_cross, psnr(got, cross))
    assert worst_same > 35.0, worst_same  # same stored stream, two decoders
    assert worst_cross > 24.0, worst_cross  # lossy re-encode vs JPEG frames, same frame numbers


def graph_devices(pipe):
    """{operator schema prefix: set of output devices} of a constructed (unbuilt) pipeline."""
    pipe._build_graph()  # defines the graph without starting a backend (no GPU needed)
    out = {}
    for op in pipe._ops:
        name = op.name.strip("_").rsplit("_", 1)[0] if op.name != "reader" else "reader"
        out.setdefault(name, set()).update(o.device for o in op.outputs)
    return out


@pytest.mark.parametrize("layout,decoder", [("jpeg", "ImageSlice"), ("video", "Video")])
def test_gpu_pipeline_places_decoding_and_augmentation_on_the_gpu(layout, decoder):
    spec = PipelineSpec(mode="train", device="gpu", batch_size=2)
    devices = graph_devices(sharded_pipeline(["x.tar"], ["x.idx"], layout, spec, device_id=0))
    assert devices[decoder] == {"gpu"}  # 'mixed' decoders (nvJPEG / NVDEC) output on the GPU
    assert devices["Resize"] == {"gpu"} and devices["CropMirrorNormalize"] == {"gpu"}
    assert devices["ExternalSource"] == {"cpu"}  # the sample source reads and plans on the CPU
    cpu = graph_devices(sharded_pipeline(["x.tar"], ["x.idx"], layout, spec_for("train", resize_backend="dali")))
    assert cpu[decoder] == {"cpu"} and cpu["Resize"] == {"cpu"}
    # on CPU the default resizes after the graph (torch), so the graph has no Resize
    assert "Resize" not in graph_devices(sharded_pipeline(["x.tar"], ["x.idx"], layout, spec_for("train")))


def planned_in_graph(mode, n, k, l, draws, aug_draws=(0, 0, 0)):
    """The source's plan of one flow sample (`source.SampleSource.load`, as it runs on its
    reading threads before the graph) of ``n`` flow frames (n + 1 RGB frames, 48 x 64) whose
    pack entry e is ``e + 1`` bytes of value ``e % 251``, stored in a real one-sample shard.
    Returns (the payload and META outputs, as numpy), the entries."""
    import io
    import tarfile
    import tempfile

    from dataloading.format.shard_index import ShardIndex
    from dataloading.pipeline import source as source_mod

    spec = PipelineSpec(mode=mode, num_segments=k, snippet_length=l, modality="flow", batch_size=1, num_threads=1,
                        crop=CROP)
    entries = [np.full(e + 1, e % 251, np.uint8) for e in range(2 * n)]
    blob, offsets = shards.encode_frame_pack([e.tobytes() for e in entries])
    members = shards.add_checksums([("info", shards.encode_info(n + 1, 0, 48, 64, 0)), ("flow.frames", blob),
                                    ("flow.offsets", offsets)])
    root = Path(tempfile.mkdtemp())
    with tarfile.open(root / "s.tar", "w") as tar:
        for ext, data in members:
            info = tarfile.TarInfo(f"00000000.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shards.write_dali_index(root / "s.tar", root / "s.idx")
    src = source_mod.SampleSource(spec, "jpeg", source_mod.ShardAccess([str(root / "s.tar")]),
                                  ShardIndex([str(root / "s.idx")], source_mod.index_members(spec, "jpeg")),
                                  lambda i: None, lambda i: None, whole_frames=False)
    row = np.array([*(draws if draws is not None else [0] * k), *aug_draws], np.int64)
    out = src.load(source_mod.Slot(0, 0, 0), row)
    planes, meta = out[:src.planner.num_jpegs], out[src.planner.num_jpegs:]
    return [*(np.asarray(m) for m in meta[:5]), *(np.asarray(p) for p in planes)], entries


@pytest.mark.parametrize("mode,n,k,l,draws,starts", [("train", *case) for case in TRAIN_CASES]
                         + [(m, n, k, l, None, s) for n, k, l, s in CENTER_CASES for m in ("val", "test")])
def test_planner_in_the_graph_samples_every_branch_exactly(mode, n, k, l, draws, starts):
    """The graph's plan replays the sampling tables (TSN.md section 4: average segments,
    sorted starts, all zero, centres with and without room) and cuts exactly the sampled
    flow frames' x and y planes out of the pack."""
    (indices, crop, anchor, shape, frame_size, *planes), entries = planned_in_graph(mode, n, k, l, draws)
    expected = sampling.snippet_indices(starts, l, n).reshape(-1)
    np.testing.assert_array_equal(indices, expected)
    assert len(planes) == 2 * len(expected)
    for j, i in enumerate(expected):
        np.testing.assert_array_equal(planes[2 * j], entries[2 * i])
        np.testing.assert_array_equal(planes[2 * j + 1], entries[2 * i + 1])
    np.testing.assert_array_equal(frame_size, [48, 64])


@pytest.mark.parametrize("aug_draws", [(0, 0, 0), (sampling.DRAW_RANGE - 1, 5 << 27, 1 << 30),
                                       (1 << 29, sampling.DRAW_RANGE - 1, sampling.DRAW_RANGE - 1)])
def test_planner_crop_is_the_multi_scale_corner_crop_of_the_draws(aug_draws):
    (_, crop, anchor, shape, _, *_), _ = planned_in_graph("train", 20, 3, 1, [0, 0, 0], aug_draws)
    box = augment.train_crop(48, 64, CROP, *aug_draws)
    np.testing.assert_array_equal(crop, [box.x, box.y, box.width, box.height, int(box.flip)])
    np.testing.assert_array_equal(anchor, [box.x, box.y])
    np.testing.assert_array_equal(shape, [box.width, box.height])
    (_, crop, *_), _ = planned_in_graph("val", 20, 3, 1, None, aug_draws)
    box = augment.center_crop(48, 64, CROP)
    np.testing.assert_array_equal(crop, [box.x, box.y, box.width, box.height, 0])


def test_planner_cut_argument_is_checked():
    with pytest.raises(ValueError, match="cut must be one of"):
        dali_planner.SamplePlanner(spec_for("train"), "video")  # the video layout cuts nothing: None
    with pytest.raises(ValueError, match="test_views needs mode 'test'"):
        dali_planner.SamplePlanner(spec_for("val"), None, test_views=True)


def test_planner_outputs_the_test_views_the_graph_cuts():
    """With the 'dali' resize backend the graph cuts the test views at the planner's anchors
    (`plan.plan_sample`'s views): the unmirrored ones, each of the centre crop's shape."""
    spec = spec_for("test", k=2, batch_size=2, resize_backend="dali")
    planner = dali_planner.SamplePlanner(spec, None, test_views=True)
    for (n, label, h, w) in [(20, 0, 48, 64), (9, 1, 60, 48)]:
        planned = planner.plan(np.array([n, label, h, w, 0], np.int32), np.zeros(5, np.int64))
        assert len(planned.meta) == planner.NUM_META + 5 and planned.entries is None
        views = augment.test_crops(h, w, CROP)
        assert [planned.meta[planner.NUM_META + v].tolist() for v in range(5)] == [[v.x, v.y] for v in views[:5]]
        assert all((v.width, v.height) == tuple(planned.meta[3]) for v in views)
        assert planned.meta[planner.NUM_META].dtype == np.int32
    assert len(dali_planner.SamplePlanner(spec, None).plan(np.array([20, 0, 48, 64, 0], np.int32), None).meta) \
        == planner.NUM_META


def test_per_frame_outputs_and_finishing_a_sample_from_its_frames(packed_jpeg):
    """With the torch backend the graph hands over one output per sampled frame (no stack /
    pad copies in DALI); a sample finished from its frame list equals it finished from the
    stacked tensor, and the mirrored crop is the mirror image."""
    spec = spec_for("train", k=3)
    assert dali_pipeline.frame_output_names(spec, "jpeg") == ("frame0", "frame1", "frame2")
    assert dali_pipeline.frame_output_names(spec, "video") == ("frames",)
    assert dali_pipeline.frame_output_names(spec_for("train", k=3, resize_backend="dali"), "jpeg") == ("frames",)
    assert dali_pipeline.frame_output_names(spec_for("val", k=2), "jpeg", decode_only=True) == ("frame0", "frame1")
    tars, idxs, n = shards.split_shards(packed_jpeg, "train")
    pipe = sharded_pipeline(tars, idxs, "jpeg", spec)
    pipe.build()
    outputs = pipe.run()
    assert len(outputs) == 3 + len(META_NAMES)
    b = pipeline_outputs(outputs, spec, "jpeg")
    per_frame = [list(f.unbind(0)) for f in b["frames"]]
    torch.testing.assert_close(finish_frames(per_frame, b["crop"], spec), finish_frames(b["frames"], b["crop"], spec),
                               rtol=0, atol=0)
    crop = b["crop"].clone()
    crop[:, 4] = 1 - crop[:, 4]
    torch.testing.assert_close(finish_frames(b["frames"], crop, spec), finish_frames(b["frames"], b["crop"], spec).flip(-1),
                               rtol=0, atol=0)


def test_torch_resize_backend_is_cpu_only():
    with pytest.raises(ValueError, match="resize_backend 'torch'"):
        PipelineSpec(device="gpu", resize_backend="torch")
    assert PipelineSpec(device="gpu").resolved_resize_backend == "dali"


@pytest.mark.parametrize("kwargs,match", [
    (dict(spec=PipelineSpec(device="gpu")), "device_id"),
    (dict(device_id=0), "without a GPU"),
    (dict(shard_id=2, num_shards=2), "shard_id"),
    (dict(layout="h265"), "layout"),
])
def test_pipeline_argument_checks(kwargs, match):
    args = dict(tar_paths=["x.tar"], index_paths=["x.idx"], layout="jpeg", spec=PipelineSpec())
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sharded_pipeline(**args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="eval"), "mode"), (dict(modality="depth"), "modality"), (dict(device="tpu"), "device"),
    (dict(snippet_length=2), "single frames"), (dict(batch_size=0), "batch_size")])
def test_spec_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PipelineSpec(**kwargs)


def test_h264_shards_need_the_gpu_decoder(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"layout": "video", "codec": "h264", "splits": {}}))
    with pytest.raises(ValueError, match="decodes only on GPU"):
        TSNLoader(tmp_path, "train", spec_for("train"))


def test_corrupt_member_is_skipped_counted_and_nothing_else_lost(packed_jpeg, tmp_path, caplog):
    dataset, shard = copy_with_wiped_frames(packed_jpeg, tmp_path / "copy")  # a sample's frames wiped, the tar intact
    n = shards.load_manifest(dataset)["splits"]["train"]["num_samples"]
    loader = TSNLoader(dataset, "train", spec_for("val", batch_size=3))
    seen = [int(i) for b in loader for i in b.sample_index]
    # the source checks the sampled JPEGs against their pack-time checksums before decoding
    assert len(loader.skipped) == 1 and "checksum recorded at pack time" in loader.skipped[0]["reason"]
    assert loader.skipped[0]["shard"].endswith(shard["path"])
    assert len(seen) == len(set(seen)) == n - 1
    assert "skipping corrupt sample" in caplog.text


def test_resumed_loader_sees_exactly_the_same_batches(packed_jpeg):
    """An epoch's data depends only on (seed, epoch, rank): resuming at (epoch, batch) after a
    crash replays the uninterrupted run's batches bit for bit."""
    spec = spec_for("train", batch_size=2)
    full = TSNLoader(packed_jpeg, "train", spec, rank=1, world_size=2)
    epochs = [list(full), list(full)]
    assert full.position == (2, 0) and len(epochs[1]) == len(full) >= 3
    assert [int(i) for b in epochs[0] for i in b.sample_index] != [int(i) for b in epochs[1] for i in b.sample_index]
    resumed = TSNLoader(packed_jpeg, "train", spec, rank=1, world_size=2, start_epoch=1, start_batch=1)
    rest = list(resumed)
    assert len(rest) == len(epochs[1]) - 1 and resumed.position == (2, 0)
    for a, b in zip(epochs[1][1:], rest):
        torch.testing.assert_close(a.frames, b.frames, rtol=0, atol=0)
        assert torch.equal(a.sample_index, b.sample_index) and torch.equal(a.crop, b.crop)


@pytest.mark.parametrize("fixture,modality", [("packed_jpeg", "rgb"), ("packed_vp9", "rgb"), ("packed_flow", "flow")])
@pytest.mark.parametrize("mode", ["train", "val", "test"])
def test_one_frame_per_sample_keeps_its_frame_axis(request, fixture, modality, mode):
    """K = 1, L = 1 (the paper's single-snippet baseline; issue 24: a one-frame sample lost its
    frame axis and every training step crashed) from every layout, in every mode."""
    spec = spec_for(mode, k=1, modality=modality, batch_size=2)
    batch = next(iter(TSNLoader(request.getfixturevalue(fixture), "train", spec)))
    channels = 2 if modality == "flow" else 3
    views = (spec.num_views,) if mode == "test" else ()
    assert tuple(batch.frames.shape) == (2, *views, 1, 1, channels, CROP.input_size, CROP.input_size)
    assert tuple(batch.frame_indices.shape[-1:]) == (1,) and torch.isfinite(batch.frames).all()
