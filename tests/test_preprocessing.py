"""Input preprocessing belongs to the backbone's weights (issue 15): resolved from backbone +
modality (config keys override), applied by every data path (channel order too), recorded in
checkpoints and reused by evaluation; and the RGB-difference paper config."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch

from app.config import ConfigError, config_from_dict, config_to_dict, load_config
from app.pipeline import pipeline_spec
from app.preprocessing import (checkpoint_overrides, preprocessing_of_checkpoint, preprocessing_record,
                               resolve_preprocessing)
from dataloading.pipeline.loader import TSNLoader
from dataloading.planning import augment
from dataloading.planning.preprocessing import Preprocessing
from dataloading.planning.spec import PipelineSpec
from tsn.backbones import weights_preprocessing

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
IMAGENET_MEAN_255 = (255 * 0.485, 255 * 0.456, 255 * 0.406)
IMAGENET_STD_255 = (255 * 0.229, 255 * 0.224, 255 * 0.225)

# (config, overrides, channel order, per-channel mean and std the data path applies, 0..255)
SPEC_CASES = [
    # the authors' BN-Inception: BGR, 0..255 minus [104, 117, 128], std 1 ...
    ("ucf101_rgb.yaml", [], "BGR", (104, 117, 128), (1, 1, 1)),
    # ... RGB differences not normalised (std 1; the mean cancels in a difference) ...
    ("ucf101_rgb_diff.yaml", [], "BGR", (104, 117, 128), (1, 1, 1)),
    # ... flow minus 128, std 1
    ("ucf101_flow.yaml", [], "BGR", (128, 128), (1, 1)),
    ("ucf101_flow.yaml", ["model.modality=warped_flow"], "BGR", (128, 128), (1, 1)),
    # the embedded default (tiny) and timm ResNets: ImageNet statistics, RGB, as before
    ("default.yaml", [], "RGB", IMAGENET_MEAN_255, IMAGENET_STD_255),
    (None, ["model.backbone=resnet18", "model.modality=rgb", "model.snippet_length=1"], "RGB", IMAGENET_MEAN_255,
     IMAGENET_STD_255),
    (None, ["model.modality=flow"], "RGB", (128, 128), (255 * (0.229 + 0.224 + 0.225) / 3,) * 2),
    # timm weights with other statistics: their pretrained_cfg's
    (None, ["model.backbone=inception_v3"], "RGB", (127.5,) * 3, (127.5,) * 3),
    # explicit config keys override the backbone's convention
    ("ucf101_rgb.yaml", ["augment.mean=[0.485, 0.456, 0.406]", "augment.std=[0.229, 0.224, 0.225]",
                         "augment.channel_order=RGB"], "RGB", IMAGENET_MEAN_255, IMAGENET_STD_255),
    ("ucf101_rgb.yaml", ["augment.std=[0.5, 0.5, 0.5]"], "BGR", (104, 117, 128), (127.5,) * 3),
    (None, ["augment.channel_order=BGR"], "BGR", IMAGENET_MEAN_255, IMAGENET_STD_255),
]


@pytest.mark.parametrize("config,overrides,order,mean,std", SPEC_CASES)
def test_pipeline_spec_takes_the_backbones_preprocessing(config, overrides, order, mean, std):
    cfg = load_config(CONFIGS / config if config else None, overrides)
    for mode in ("train", "val", "test"):
        spec = pipeline_spec(cfg, mode)
        assert spec.channel_order == order
        np.testing.assert_allclose(spec.norm_mean_255, mean, rtol=1e-12)
        np.testing.assert_allclose(spec.norm_std_255, std, rtol=1e-12)
    record = preprocessing_record(cfg)
    np.testing.assert_allclose(record["input_mean_255"], mean, rtol=1e-12)
    np.testing.assert_allclose(record["input_std_255"], std, rtol=1e-12)
    assert record["modality"] == cfg.model.modality


def test_weights_preprocessing_table():
    assert weights_preprocessing("bninception") == {
        "channel_order": "BGR", "value_range": 255.0, "mean": [104.0, 117.0, 128.0], "std": [1.0, 1.0, 1.0],
        "source": "bninception: the authors' ImageNet weights (Caffe)"}
    tiny = weights_preprocessing("tiny")
    assert (tiny["channel_order"], tiny["value_range"], tiny["mean"], tiny["std"]) == (
        "RGB", 1.0, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert weights_preprocessing("inception_v3")["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        weights_preprocessing("nope")


@pytest.mark.parametrize("override,match", [
    ("augment.mean=[0.5, 0.5]", r"augment\.mean: must be 3 values"),
    ("augment.std=[0.5, 0, 0.5]", r"augment\.std: must be 3 values > 0"),
    ("augment.channel_order=GBR", r"augment\.channel_order: must be one of RGB, BGR"),
])
def test_bad_preprocessing_keys_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_preprocessing_record_round_trip_and_errors():
    p = Preprocessing("BGR", 255.0, (104, 117, 128), (1, 1, 1), "bninception")
    assert Preprocessing.from_record(p.record("rgb")) == p
    with pytest.raises(ValueError, match=r"ckpt: missing std"):
        Preprocessing.from_record({"channel_order": "BGR", "value_range": 255, "mean": [1, 2, 3]}, "ckpt")
    with pytest.raises(ValueError, match=r"ckpt: channel_order must be one of RGB, BGR"):
        Preprocessing.from_record({**p.record("rgb"), "channel_order": "XYZ"}, "ckpt")
    with pytest.raises(ValueError, match="value_range must be 1"):
        Preprocessing("RGB", 10.0)
    with pytest.raises(ValueError, match="channel_order"):
        PipelineSpec(channel_order="BRG")


def test_checkpoint_preprocessing_is_what_eval_feeds():
    """The record in a checkpoint's meta decides: evaluation's overrides reproduce it even when
    the backbone's default would differ; a checkpoint without a record (older) was fed RGB."""
    cfg = load_config(CONFIGS / "ucf101_rgb.yaml")
    trained = Preprocessing("RGB", 1.0, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "a deliberate choice")
    state = {"config": config_to_dict(cfg), "meta": {"preprocessing": trained.record("rgb")}}
    assert preprocessing_of_checkpoint(state) == trained
    again = config_from_dict(state["config"], checkpoint_overrides(state))
    spec = pipeline_spec(again, "test")
    assert spec.channel_order == "RGB"
    np.testing.assert_allclose(spec.norm_mean_255, (127.5, 102.0, 76.5))
    # user overrides come after the checkpoint's and win
    assert pipeline_spec(config_from_dict(state["config"], checkpoint_overrides(state) + ["augment.channel_order=BGR"]),
                         "test").channel_order == "BGR"
    # a checkpoint written before the record: its config's (explicit ImageNet) statistics, RGB order
    old_config = config_to_dict(cfg)
    old_config["augment"] = {k: v for k, v in old_config["augment"].items() if k != "channel_order"}
    old_config["augment"].update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    old = {"config": old_config, "meta": {}}
    spec = pipeline_spec(config_from_dict(old_config, checkpoint_overrides(old)), "test")
    assert spec.channel_order == "RGB"
    np.testing.assert_allclose(spec.norm_mean_255, IMAGENET_MEAN_255)
    # the run's own resolution is the record the worker stores
    assert preprocessing_of_checkpoint({"meta": {"preprocessing": preprocessing_record(cfg)}}) == \
        resolve_preprocessing(cfg)


def test_rgb_diff_paper_config_is_the_authors():
    """The authors' RGB-difference stream: scales (1, .875, .75), first-conv lr (1, 2), K = 7,
    BN-Inception."""
    cfg = load_config(CONFIGS / "ucf101_rgb_diff.yaml")
    assert cfg.augment.scales == (1.0, 0.875, 0.75)
    assert cfg.optim.first_conv_lr_mult == (1.0, 2.0)
    assert (cfg.model.backbone, cfg.model.modality, cfg.model.num_segments, cfg.model.snippet_length) == (
        "bninception", "rgb_diff", 7, 5)
    # the project's own choice for motion streams stays an option
    from tsn.practices import default_first_conv_lr_mult
    assert default_first_conv_lr_mult("rgb_diff") == (5.0, 10.0)


# ------------------------------------------------------------------ the data path applies it


def loader_spec(mode, order, mean, std, backend, modality="rgb", l=1):
    return PipelineSpec(mode=mode, num_segments=2, snippet_length=l, modality=modality, batch_size=2,
                        crop=augment.CropSpec(input_size=40, resize_short=48, flip=True), num_threads=1, seed=3, resize_backend=backend, mean=mean, std=std, channel_order=order)


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_bgr_input_is_the_rgb_input_with_channels_reversed(packed_jpeg, mode, backend):
    """Both resize backends (torch finishing, the DALI graph) feed BGR when asked: the same
    batch as RGB with the colour axis reversed (mean / std given in the order fed)."""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    rgb = next(iter(TSNLoader(packed_jpeg, "train", loader_spec(mode, "RGB", mean, std, backend))))
    bgr = next(iter(TSNLoader(packed_jpeg, "train", loader_spec(mode, "BGR", mean[::-1], std[::-1], backend))))
    assert torch.equal(rgb.sample_index, bgr.sample_index)
    assert (rgb.frames[..., 0, :, :] - rgb.frames[..., 2, :, :]).abs().mean() > 0.05  # the channels differ
    # DALI's resize rounds a handful of pixels (4 of 19,200 measured) one 8-bit step apart when the
    # channel sits elsewhere in the pixel; torch's is exact
    step = 1.0 / (255 * min(std))
    atol = 1e-5 if backend == "torch" else 1.01 * step
    torch.testing.assert_close(bgr.frames, rgb.frames.flip(-3), rtol=0, atol=atol)
    assert (bgr.frames - rgb.frames.flip(-3)).abs().gt(1e-5).float().mean() < 0.001


def test_bninception_rgb_diff_is_bgr_differences_on_the_255_scale(packed_jpeg):
    """RGB difference with the BN-Inception convention: differences of BGR frames in 0..255, not
    normalised = the ImageNet-normalised RGB differences times 255 x std, channels reversed."""
    bn = Preprocessing(**weights_preprocessing("bninception"))
    imagenet = loader_spec("val", "RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "torch", "rgb_diff", 2)
    ours = loader_spec("val", bn.channel_order, bn.mean_01, bn.std_01, "torch", "rgb_diff", 2)
    a = next(iter(TSNLoader(packed_jpeg, "train", imagenet))).frames  # (B, K, L, C, H, W)
    b = next(iter(TSNLoader(packed_jpeg, "train", ours))).frames
    scale = torch.tensor([255 * 0.229, 255 * 0.224, 255 * 0.225]).view(3, 1, 1)
    torch.testing.assert_close(b, (a * scale).flip(-3), rtol=1e-5, atol=1e-3)
    assert b.abs().max() > 20  # 0..255 differences, not divided by ~58


def test_reference_loader_feeds_bgr_too(packed_jpeg):
    """The oracle follows the channel order like the loader (same batch, same values)."""
    from dataloading.format import shards
    from tools import reference

    mean, std = (0.3, 0.4, 0.5), (0.3, 0.25, 0.2)
    spec = loader_spec("val", "BGR", mean, std, "torch")
    batch = next(iter(TSNLoader(packed_jpeg, "train", spec)))
    tars, _, _ = shards.split_shards(packed_jpeg, "train")
    by_index = {shards.decode_info(s.members["info"])["sample_index"]: s
                for t in tars for s in reference.iter_shard(t)}
    for r in range(2):
        frames, *_ = reference.load_sample(by_index[int(batch.sample_index[r])], "jpeg", spec, None)
        got = batch.frames[r].reshape(frames.shape).numpy()
        assert np.abs(got - frames).mean() < 0.02  # resize backends differ by rounding only
        assert np.abs(got - frames[:, ::-1]).mean() > 0.05  # the channel order matters


def test_training_records_its_preprocessing_in_every_checkpoint(packed_jpeg, tmp_path):
    """`app.worker.train` stores the resolved preprocessing in the checkpoint meta (the config
    override included), which is what `tsn eval` / `tsn predict` feed the network with."""
    from app import worker
    from tsn.checkpoint import load_checkpoint

    cfg = load_config(None, [f"data.shards={packed_jpeg}", "augment.input_size=32", "augment.resize_short=48",
                             "model.test_segments=2", "train.batch_size_per_worker=6", "train.epochs=1",
                             "train.test_batch_size_per_worker=6", "train.log_every_n_steps=0",
                             "augment.channel_order=BGR"])
    worker.train(cfg, tmp_path / "run")
    paths = sorted((tmp_path / "run").rglob("*.pt"))
    assert paths
    for path in paths:
        state = load_checkpoint(path)
        assert state["meta"]["preprocessing"] == preprocessing_record(cfg)
        assert preprocessing_of_checkpoint(state).channel_order == "BGR"
