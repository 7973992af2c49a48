"""`tsn predict` and `tsn export`: predict's scores equal `tsn eval`'s on the same frames (rgb and
flow, test protocol with flipped views), fusion, unreadable videos, --fast, JSON output, and the
TorchScript export against the eager model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from app import predict
from app.build import build_model
from app.config import config_from_dict, config_to_dict
from app.evaluate import evaluate_checkpoint
from app.export import load_exported
from app.run_store import load_scores, write_checkpoint
from cli import main as cli
from dataloading.format import shards
from tools import reference
from tsn.checkpoint import checkpoint_state

SMALL = ["model.backbone=tiny", "model.test_segments=5", "model.num_segments=3", "augment.input_size=32",
         "augment.resize_short=48", "augment.flip=true", "train.test_batch_size_per_worker=3", "run.seed=0"]


def make_checkpoint(path, packed, modality: str, snippet_length: int, seed: int = 0, classes=None, extra=()):
    """A TSN with random weights (fc scaled up so classes differ clearly) saved as tsn train does."""
    cfg = config_from_dict({}, [f"data.shards={packed}", f"model.modality={modality}",
                                f"model.snippet_length={snippet_length}", *SMALL, *extra])
    classes = classes or shards.load_manifest(packed)["classes"]
    torch.manual_seed(seed)
    model = build_model(cfg, len(classes), fresh=False)
    torch.nn.init.normal_(model.fc.weight, std=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = checkpoint_state(model=model, optimizer=opt, epoch=0, step=0, loader_position=(1, 0),
                             config=config_to_dict(cfg), meta={"class_names": list(classes)})
    write_checkpoint(path, state)
    return path


@pytest.fixture(scope="module")
def rgb_ckpt(packed_flow, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "rgb.pt", packed_flow, "rgb", 1)


@pytest.fixture(scope="module")
def flow_ckpt(packed_flow, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "flow.pt", packed_flow, "flow", 2, seed=1)


def packed_frames(packed, split: str, modality: str) -> dict[int, np.ndarray]:
    """sample_index -> every stored frame of the sample (RGB (N, H, W, 3) or flow (N-1, H, W, 2)),
    decoded from the shards."""
    manifest = shards.load_manifest(packed)
    out = {}
    for tar in shards.split_shards(packed, split)[0]:
        for sample in reference.iter_shard(tar):
            info = shards.decode_info(sample.members["info"])
            if modality == "rgb":
                frames = reference.decode_frames(sample, manifest["layout"], np.arange(info["num_frames"]))
            else:
                frames = reference.decode_flow(sample, modality, np.arange(info["num_frames"] - 1))
            out[info["sample_index"]] = np.stack(frames)
    return out


@pytest.mark.parametrize("kind", ["rgb", "flow"])
def test_predict_scores_equal_eval_scores_on_the_same_frames(kind, rgb_ckpt, flow_ckpt, packed_flow, tmp_path):
    """The strongest check: the packed frames of each val video through predict's clip path give
    `tsn eval`'s per-video scores (same sampling, same 10 views incl. the flow x-flip, same
    finishing, same consensus)."""
    ckpt = rgb_ckpt if kind == "rgb" else flow_ckpt
    evaluate_checkpoint(str(ckpt), split="val", out=str(tmp_path / "scores.npz"))
    ev = load_scores(tmp_path / "scores.npz")
    stream = predict.load_stream(str(ckpt))
    assert stream.spec.mode == "test" and stream.spec.num_segments == 5 and stream.spec.num_views == 10
    frames = packed_frames(packed_flow, "val", kind)
    assert sorted(frames) == sorted(ev["sample_index"].tolist())
    for i, s in zip(ev["sample_index"], ev["scores"]):
        got = predict.clip_scores(stream, frames[int(i)])
        np.testing.assert_allclose(got, s, rtol=1e-4, atol=1e-4)
    assert np.ptp(ev["scores"], axis=1).min() > 0.01  # the scores tell classes apart: a real comparison


def test_flow_of_a_video_is_the_packers(packed_flow, synth_dir):
    """predict's flow is the packer's extractor output on the decoded frames, whole or pair by pair."""
    from dataloading.sources import flow

    video = sorted(synth_dir.rglob("*.mp4"))[0]
    v = predict.VideoFrames(str(video), 48, None)
    rgb = v.frames(range(v.num_frames))
    assert rgb.shape == (v.num_frames, v.height, v.width, 3)
    for modality in ("flow", "warped_flow"):
        got = predict.flow_frames(rgb, modality, "dis", 20.0)
        want = np.stack([np.stack(item[modality], axis=-1)
                         for item in flow.video_flow(rgb, "dis", 20.0, (modality,))])
        assert got.shape == (len(rgb) - 1, *rgb.shape[1:3], 2) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        for i in (0, 7, len(rgb) - 2):
            np.testing.assert_array_equal(predict.flow_pair(rgb[i], rgb[i + 1], modality, "dis", 20.0), want[i])
    small = rgb[:6, :16, :16]  # the paper's TV-L1 too (tiny: it is slow)
    want = np.stack([np.stack(item["flow"], axis=-1) for item in flow.video_flow(small, "tvl1", 20.0)])
    np.testing.assert_array_equal(predict.flow_pair(small[3], small[4], "flow", "tvl1", 20.0), want[3])


def test_long_videos_are_decoded_again_for_the_sampled_frames_only(rgb_ckpt, flow_ckpt, synth_dir, monkeypatch):
    video = str(sorted(synth_dir.rglob("*.mp4"))[1])
    streams = [predict.load_stream(str(rgb_ckpt)), predict.load_stream(str(flow_ckpt))]
    held = predict.video_stream_scores(video, streams)
    monkeypatch.setattr(predict, "MAX_HELD_FRAME_BYTES", 0)
    v = predict.VideoFrames(video, 48, None)
    assert v._held is None
    v.fetch([3, 1])
    assert sorted(v._picked) == [1, 3]
    again = predict.video_stream_scores(video, streams)
    for a, b in zip(held, again):
        np.testing.assert_array_equal(a, b)


def source_videos(synth_dir, packed, split="val"):
    """The source files of a split's videos, by sample_index (from the shards' json members)."""
    out = {}
    for tar in shards.split_shards(packed, split)[0]:
        for sample in reference.iter_shard(tar):
            meta = json.loads(sample.members["json"])
            out[meta["sample_index"]] = meta["source"]
    return out


def test_cli_predict_on_video_files_fusion_errors_and_json(rgb_ckpt, flow_ckpt, packed_flow, synth_dir, tmp_path,
                                                           capsys):
    videos = source_videos(synth_dir, packed_flow)
    first, second = (videos[i] for i in sorted(videos)[:2])
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    missing = tmp_path / "missing.mp4"

    # One stream, table output; the unreadable and the missing video each get an error line.
    code = cli.main(["predict", first, str(bad), second, str(missing), "--checkpoint", str(rgb_ckpt), "--top-k", "3"])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"error: {bad}:" in err and f"error: {missing}: file not found" in err
    assert "2 of 4 videos could not be predicted" in err
    assert first in out and second in out and out.count("  1. ") == 2 and "  4. " not in out

    # JSON, two streams: fused scores are tsn fuse's 1 : 1.5 average of the single-stream scores.
    def run_json(*ckpts, extra=()):
        argv = ["predict", first, second, "--json", "--top-k", "6", *extra]
        for c in ckpts:
            argv += ["--checkpoint", str(c)]
        assert cli.main(argv) == 0
        return json.loads(capsys.readouterr().out)

    def score_vectors(doc):
        return [np.array([t["score"] for t in sorted(v["top_k"], key=lambda t: t["index"])]) for v in doc["videos"]]

    a, b, fused = run_json(rgb_ckpt), run_json(flow_ckpt), run_json(rgb_ckpt, flow_ckpt)
    assert [v["video"] for v in fused["videos"]] == [first, second]
    top = fused["videos"][0]["top_k"]
    assert len(top) == 6 and [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert abs(sum(t["probability"] for t in top) - 1.0) < 1e-6
    for sa, sb, sf in zip(score_vectors(a), score_vectors(b), score_vectors(fused)):
        np.testing.assert_allclose(sf, (sa + 1.5 * sb) / 2.5, rtol=1e-5, atol=1e-5)
    w = run_json(rgb_ckpt, flow_ckpt, extra=["--weights", "1", "0"])
    for sa, sw in zip(score_vectors(a), score_vectors(w)):
        np.testing.assert_allclose(sw, sa, rtol=1e-5, atol=1e-5)


def test_predict_on_files_is_close_to_eval_on_the_pack(rgb_ckpt, packed_flow, synth_dir, tmp_path):
    """From the source files the only difference to `tsn eval` is the pack's JPEG round trip."""
    evaluate_checkpoint(str(rgb_ckpt), split="val", out=str(tmp_path / "scores.npz"))
    ev = load_scores(tmp_path / "scores.npz")
    videos = source_videos(synth_dir, packed_flow)
    stream = predict.load_stream(str(rgb_ckpt))
    preds = predict.predict_videos([videos[int(i)] for i in ev["sample_index"]], [stream])
    got = np.stack([p.scores for p in preds])
    spread = np.ptp(ev["scores"], axis=1).mean()
    assert np.abs(got - ev["scores"]).max() < 0.1 * spread
    assert (got.argmax(1) == ev["scores"].argmax(1)).mean() >= 0.8


def test_fast_mode_is_the_centre_crop_of_fewer_segments(rgb_ckpt, packed_flow):
    stream = predict.load_stream(str(rgb_ckpt), fast=True)
    frames = next(iter(packed_frames(packed_flow, "val", "rgb").values()))
    x = predict.clip_input(frames, stream.spec)
    assert tuple(x.shape) == (1, 3, 1, 3, 32, 32)
    full = predict.clip_input(frames, predict.load_stream(str(rgb_ckpt)).spec)
    assert tuple(full.shape) == (1, 10, 5, 1, 3, 32, 32)
    assert predict.clip_scores(stream, frames).shape == (6,)


def test_the_single_snippet_baseline_predicts_in_both_modes(packed_flow, tmp_path):
    """K = 1, one frame per sample (the paper's single-snippet baseline; issue 24): the fast
    mode's one centre crop and the test protocol's 10 views of one segment."""
    ckpt = make_checkpoint(tmp_path / "k1.pt", packed_flow, "rgb", 1,
                           extra=["model.num_segments=1", "model.test_segments=1"])
    frames = next(iter(packed_frames(packed_flow, "val", "rgb").values()))
    fast, full = predict.load_stream(str(ckpt), fast=True), predict.load_stream(str(ckpt))
    assert tuple(predict.clip_input(frames, fast.spec).shape) == (1, 1, 1, 3, 32, 32)
    assert tuple(predict.clip_input(frames, full.spec).shape) == (1, 10, 1, 1, 3, 32, 32)
    for stream in (fast, full):
        scores = predict.clip_scores(stream, frames)
        assert scores.shape == (6,) and torch.isfinite(torch.as_tensor(scores)).all()


def test_short_and_mismatched_inputs_are_clear_errors(rgb_ckpt, flow_ckpt, tmp_path):
    stream = predict.load_stream(str(flow_ckpt))
    with pytest.raises(ValueError, match=r"expected frames \(N, H, W, 2\)"):
        predict.clip_input(np.zeros((5, 48, 64, 3), np.uint8), stream.spec)
    from dataloading.sources.flow import FlowError

    with pytest.raises(FlowError, match="1 frame"):
        predict.flow_frames(np.zeros((1, 48, 64, 3), np.uint8), "flow", "dis", 20.0)
    # A checkpoint whose dataset is not here: class names from its meta, decoding at resize_short.
    other = make_checkpoint(tmp_path / "other.pt", tmp_path / "nowhere", "rgb", 1, classes=[f"c{i}" for i in range(6)])
    alone = predict.load_stream(str(other))
    assert alone.class_names[0] == "c0" and alone.short_side == 48
    with pytest.raises(ValueError, match="different classes"):
        predict.check_streams([predict.load_stream(str(rgb_ckpt)), predict.load_stream(str(other))])


def test_export_torchscript_equals_the_eager_model(rgb_ckpt, flow_ckpt, tmp_path, capsys):
    for ckpt, shape in ((rgb_ckpt, (3, 1, 3, 32, 32)), (flow_ckpt, (3, 2, 2, 32, 32))):
        out = tmp_path / f"{ckpt.stem}.ts"
        assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
        assert "exported" in capsys.readouterr().out
        module, meta = load_exported(str(out))
        assert meta["input_shape"][1:] == list(shape) and len(meta["class_names"]) == 6
        eager = predict.load_stream(str(ckpt)).model
        x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            torch.testing.assert_close(module(x), eager(x), rtol=1e-5, atol=1e-5)
    assert cli.main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
