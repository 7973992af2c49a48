"""ImageNet weights the way users get them (`model.pretrained: imagenet`), and the authors'
BN-Inception file in training (issue 15).

The same code as online runs offline here: the caches timm (Hugging Face Hub) and torch.hub
would fill are pre-seeded in temporary directories (``HF_HOME`` / ``TORCH_HOME``) with random
weights of the right shapes at the exact paths those libraries look them up; ``HF_HUB_OFFLINE``
keeps everything off the network.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights in tests

from pathlib import Path

import pytest
import torch

from app.build import build_model
from app.config import load_config
from tsn import backbones
from tsn.bninception import BNInception
from tsn.practices import batchnorm_layers

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
AUTHORS_FILE = "bn_inception-9f5701afb96c8044.pth"  # the file name torch.hub caches the URL under


def mean_replicated(w: torch.Tensor, channels: int) -> torch.Tensor:
    return w.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)


@pytest.fixture(scope="module")
def authors_bninception():
    """(reference BNInception, its state dict in the authors' layout): BN tensors (1, C), no
    num_batches_tracked, a 1000-class fc; random weights and statistics."""
    torch.manual_seed(0)
    rgb = BNInception(3)
    for bn in batchnorm_layers(rgb):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    state = {k: (v.unsqueeze(0) if "_bn." in k else v) for k, v in rgb.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 1024), torch.randn(1000)
    return rgb, state


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Empty torch.hub and Hugging Face caches in tmp, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path


def assert_backbone_equals(got: torch.nn.Module, ref: dict, first_conv: str, channels: int):
    """Every tensor of ``ref`` (flattened where (1, C)) in ``got``; the first conv mean-replicated."""
    own = got.state_dict()
    for key, value in ref.items():
        if key not in own:
            continue
        value = value.reshape(own[key].shape) if value.dim() == 2 and value.shape[0] == 1 else value
        if key == f"{first_conv}.weight" and channels != 3:
            value = mean_replicated(value, channels)
        torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)


def test_authors_bninception_file_loads_in_training(tmp_path, authors_bninception):
    """The issue's failure: ucf101_rgb.yaml with model.pretrained = the authors' file raised
    "state dict does not fit BNInception ... (1, 64)->(64,)" in training."""
    _, state = authors_bninception
    path = tmp_path / "bn_inception.pth"
    torch.save(state, path)
    cfg = load_config(CONFIGS / "ucf101_rgb.yaml", [f"model.pretrained={path}"])
    model = build_model(cfg, 101, fresh=True)
    assert_backbone_equals(model.backbone, state, "conv1_7x7_s2", 3)
    assert tuple(model.fc.weight.shape) == (101, 1024)  # the ImageNet classifier is not loaded


def test_one_loader_for_both_entry_points(tmp_path, authors_bninception):
    """`bninception.load_pretrained` and `backbones.load_backbone_weights` load the same file
    into the same weights (one reshaping rule, `practices.squeeze_caffe_vectors`)."""
    from tsn.bninception import load_pretrained

    _, state = authors_bninception
    path = tmp_path / "bn_inception.pth"
    torch.save(state, path)
    a, b = BNInception(3), BNInception(3)
    assert load_pretrained(a, path) == backbones.load_backbone_weights(b, path)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_imagenet_bninception_from_the_torch_hub_cache(offline_caches, authors_bninception):
    """`model.pretrained: imagenet` reads the authors' published file through torch.hub's cache
    ($TORCH_HOME/hub/checkpoints/<file name of the URL>); a flow net gets the first conv
    cross-modality initialised (mean over RGB, 10 channels)."""
    _, state = authors_bninception
    cached = offline_caches / "torch" / "hub" / "checkpoints" / AUTHORS_FILE
    assert backbones.torch_hub_checkpoint_path(backbones.BNINCEPTION_IMAGENET_URL) == cached
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    cfg = load_config(CONFIGS / "ucf101_flow.yaml", ["model.pretrained=imagenet"])
    model = build_model(cfg, 101, fresh=True)
    assert model.backbone.conv1_7x7_s2.in_channels == 10
    assert_backbone_equals(model.backbone, state, "conv1_7x7_s2", 10)


def test_imagenet_bninception_missing_offline_names_file_and_place(offline_caches):
    cfg = load_config(CONFIGS / "ucf101_rgb.yaml", ["model.pretrained=imagenet"])
    expected = offline_caches / "torch" / "hub" / "checkpoints" / AUTHORS_FILE
    with pytest.raises(FileNotFoundError) as err:
        build_model(cfg, 101, fresh=True)
    message = str(err.value)
    assert AUTHORS_FILE in message and str(expected) in message and "HF_HUB_OFFLINE" in message
    assert backbones.BNINCEPTION_IMAGENET_URL in message
    assert not expected.exists()


def seed_hf_cache(cache: Path, repo: str, state: dict, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Write ``state`` where huggingface_hub keeps ``repo``'s model.safetensors at ``main``."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "snapshots" / commit / "model.safetensors"))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_imagenet_timm_backbone_through_timm_and_the_hub_cache(offline_caches):
    """A timm backbone gets timm's pretrained weights (its Hub repo, the default tag) from the
    Hugging Face cache under $HF_HOME/hub; an rgb_diff net (15 channels) mean-replicates them."""
    import timm

    torch.manual_seed(1)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=0)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
    repo = ref.pretrained_cfg["hf_hub_id"]
    assert repo == "timm/resnet18.a1_in1k"
    assert backbones.hf_hub_cache_dir() == offline_caches / "hf" / "hub"
    seed_hf_cache(offline_caches / "hf" / "hub", repo, ref.state_dict())
    cfg = load_config(None, ["model.backbone=resnet18", "model.pretrained=imagenet"])
    assert cfg.model.modality == "rgb_diff"
    model = build_model(cfg, 6, fresh=True)
    assert model.backbone.conv1.in_channels == 15
    assert_backbone_equals(model.backbone, ref.state_dict(), "conv1", 15)


def test_imagenet_timm_missing_offline_names_file_and_place(offline_caches):
    backbone, _ = backbones.build_backbone("resnet18", 3)
    with pytest.raises(FileNotFoundError) as err:
        backbones.load_backbone_weights(backbone, "imagenet")
    message = str(err.value)
    folder = offline_caches / "hf" / "hub" / "models--timm--resnet18.a1_in1k"
    assert "model.safetensors" in message and "timm/resnet18.a1_in1k" in message and str(folder) in message


def test_hf_hub_cache_variable_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert backbones.hf_hub_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backbones.hf_hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"


def test_tiny_has_no_imagenet_weights_and_local_paths_keep_working(offline_caches):
    cfg = load_config(None, ["model.pretrained=imagenet"])
    with pytest.raises(ValueError, match="'tiny' and 'small' have no published ImageNet weights"):
        build_model(cfg, 6, fresh=True)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model(load_config(None, [f"model.pretrained={offline_caches / 'nope.pth'}"]), 6, fresh=True)
    # a resumed run keeps its own weights: nothing is looked up
    build_model(cfg, 6, fresh=False)
