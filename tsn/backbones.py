"""Snippet backbones: ConvNets mapping one stacked snippet to a pooled feature vector.

``build_backbone(name, in_channels)`` returns ``(module, feature_dim)``; the module maps
``(N, in_channels, H, W)`` float images to ``(N, feature_dim)`` globally pooled features (no
classifier: TSN adds its own dropout + fc).

Every backbone is built with 3 input channels first and, when ``in_channels != 3``, its first
conv is then adapted with the cross-modality rule (RGB kernels averaged, replicated over the
new channels).  Building this way keeps one code path for RGB and motion nets, and ImageNet
weights for the 3-channel model transfer with ``load_backbone_weights``, which applies the same
rule to the file's first conv.

ImageNet weights (``load_backbone_weights(backbone, "imagenet")``) come the way users get them:
timm backbones through timm's own pretrained mechanism (the Hugging Face Hub cache; honours
``HF_HUB_OFFLINE``, ``HF_HOME``, ``HF_HUB_CACHE``), BN-Inception from the authors' published
file through ``torch.hub.load_state_dict_from_url`` (cached by file name under
``$TORCH_HOME/hub/checkpoints``, its hash checked on download).  Offline (``HF_HUB_OFFLINE``
set) nothing is downloaded: a file missing from the cache is an error naming the file and the
directory it was looked for in.

The input convention of each backbone's weights (channel order, value range, mean, std) is
``weights_preprocessing``: like timm's ``pretrained_cfg``, it belongs to the weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from tsn.bninception import BNInception
from tsn.practices import cross_modality_init_, load_state_dict_cross_modality, read_state_dict

log = logging.getLogger(__name__)

IMAGENET = "imagenet"  # `model.pretrained: imagenet`: the backbone's published ImageNet weights

# The authors' BN-Inception ImageNet weights (tsn-pytorch's model zoo), converted from Caffe:
# BN tensors (1, C), a 1000-class ``fc``; torch.hub checks the sha256 prefix in the name.
BNINCEPTION_IMAGENET_URL = "https://yjxiong.blob.core.windows.net/models/bn_inception-9f5701afb96c8044.pth"

# ImageNet statistics on the 0..1 scale in RGB order: torchvision's and most timm weights'.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TinyCNN(nn.Module):
    """A tiny CNN for fast tests and the embedded default: (N, C, H, W) -> (N, widths[-1]).

    Per width: conv 3x3/2 + BN + ReLU (``conv1``/``bn1``, ``conv2``/``bn2``, ...), then global
    average pooling. 'tiny' is widths (16, 32): at least two BNs so that Partial BN (first BN
    trains, the others are frozen) is observable; the convs keep their bias, like
    BN-Inception's, so the first-conv bias policy is exercised too. 'tiny' sees 7 px per
    feature before the pooling, too little for motion whose direction depends on where in the
    object it happens (rotation, looming: their local patterns average out over the frame);
    'small', widths (16, 32, 64, 128), sees 31 px at ~2x the compute.
    """

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (16, 32)):
        super().__init__()
        self.num_features = widths[-1]
        self.depth = len(widths)
        for i, (c_in, c_out) in enumerate(zip((in_channels, *widths[:-1]), widths), start=1):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, 3, stride=2, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.depth + 1):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return x.mean(dim=(2, 3))


SMALL_CNN_WIDTHS = (16, 32, 64, 128)


def _timm():
    """timm, imported on first use: its import (torchvision with it) takes ~2 s of CPU, which
    a run of the 'tiny' / 'small' / 'bninception' backbones, and every `tsn` command that
    only reads a config, need not pay."""
    import timm

    return timm


def build_backbone(name: str, in_channels: int) -> tuple[nn.Module, int]:
    """Build backbone ``name`` for ``in_channels`` input channels (random init, no download).

    ``name``: 'tiny' (``TinyCNN``), 'bninception' (``BNInception``, 1024-d) or any timm model
    name ('resnet18', 'resnet50', 'mobilenetv3_small_050', ...), created with
    ``pretrained=False, num_classes=0`` so it returns pooled features.
    Returns ``(module, feature_dim)``.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if name in ("tiny", "small"):
        model = TinyCNN(3, SMALL_CNN_WIDTHS if name == "small" else (16, 32))
        dim = model.num_features
    elif name == "bninception":
        model = BNInception(3)
        dim = model.num_features
    elif _timm().is_model(name):
        model = _timm().create_model(name, pretrained=False, num_classes=0, in_chans=3)
        # head_hidden_size is the pooled output size when a pre-logits head sits between the
        # stem features and the (removed) classifier, e.g. MobileNetV3: 1024 vs num_features 288.
        dim = getattr(model, "head_hidden_size", None) or model.num_features
    else:
        raise ValueError(
            f"unknown backbone {name!r}: use 'tiny', 'small', 'bninception' or a timm model name"
        )
    if in_channels != 3:
        cross_modality_init_(model, in_channels)
    return model, dim


def weights_preprocessing(name: str) -> dict:
    """The input convention of backbone ``name``'s ImageNet weights, as plain data:
    ``{channel_order, value_range, mean, std, source}`` (meaning: `dataloading.planning.preprocessing`;
    ``mean`` / ``std`` per colour channel in ``channel_order``, in ``value_range`` units).

    * 'bninception': the authors' weights (Caffe): BGR, 0..255 minus [104, 117, 128], std 1;
    * a timm model name: its ``pretrained_cfg`` mean / std (0..1, RGB);
    * 'tiny' (no published weights): ImageNet statistics, RGB, as it has always been fed.

    Flow and RGB difference derive theirs from it (the data path's rule: flow minus 128 over
    the mean std, i.e. std 1 for BN-Inception; RGB differences scaled by 1 / std).
    """
    if name == "bninception":
        return {"channel_order": "BGR", "value_range": 255.0, "mean": [104.0, 117.0, 128.0],
                "std": [1.0, 1.0, 1.0], "source": "bninception: the authors' ImageNet weights (Caffe)"}
    if name in ("tiny", "small"):
        return {"channel_order": "RGB", "value_range": 1.0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "source": f"{name}: no published weights, ImageNet statistics"}
    timm = _timm()
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}: use 'tiny', 'small', 'bninception' or a timm model name")
    cfg = timm.models.get_pretrained_cfg(name) if hasattr(timm.models, "get_pretrained_cfg") else None
    mean = tuple(getattr(cfg, "mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(cfg, "std", None) or IMAGENET_STD)
    tag = getattr(cfg, "tag", None)
    return {"channel_order": "RGB", "value_range": 1.0, "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "source": f"timm {name}{'.' + tag if tag and '.' not in name else ''} pretrained_cfg"}


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of ImageNet classifiers: ignored when loading a feature extractor."""
    prefixes = ["fc.", "classifier.", "last_linear.", "head.fc."]
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    for c in [classifier] if isinstance(classifier, str) else (classifier or ()):
        prefixes.append(f"{c}.")
    return tuple(dict.fromkeys(prefixes))


def load_backbone_weights(backbone: nn.Module, source: str | os.PathLike) -> list[str]:
    """Load ImageNet weights into a backbone: ``source`` is ``"imagenet"`` (the published
    weights: `imagenet_state_dict`) or a local ``torch.save``'d state dict file.

    Accepts timm-format files, torchvision ResNet files (same parameter names as timm's
    ResNets; their ``fc.*`` classifier is dropped) and the authors' BN-Inception file (BN
    tensors stored as (1, C) are flattened).  Checkpoints wrapped as ``{'state_dict': ...}`` /
    ``{'model': ...}`` and ``module.``-prefixed keys are unwrapped.  Classifier keys (``fc``,
    ``classifier``, ``last_linear``, ``head.fc``, timm's ``pretrained_cfg['classifier']``) are
    ignored.  Every other tensor must match in name and shape, except the first conv: a
    3-channel kernel from the file is cross-modality adapted (mean over RGB, replicated) when
    the backbone takes more channels.  Mismatches raise ValueError listing the offending keys
    (torchvision files of non-ResNet families use other names than timm: convert them first).

    Returns the backbone's keys left at their initial value.
    """
    if str(source) == IMAGENET:
        state, where = imagenet_state_dict(backbone)
    else:
        state, where = read_state_dict(source), str(source)
    try:
        return load_state_dict_cross_modality(backbone, state, optional_prefixes=_classifier_prefixes(backbone))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` as the Hub reads it, at call time (torch.hub has no switch of its own)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hf_hub_cache_dir() -> Path:
    """The Hugging Face Hub cache, from the environment at call time: ``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def torch_hub_checkpoint_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` caches ``url``: ``<hub dir>/checkpoints/<file
    name>``, the hub dir being ``$TORCH_HOME/hub`` (default ``$XDG_CACHE_HOME/torch/hub``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def _from_torch_hub(url: str, what: str) -> tuple[dict, str]:
    path = torch_hub_checkpoint_path(url)
    if not path.is_file() and _offline():
        raise FileNotFoundError(
            f"model.pretrained=imagenet: {what} weights file {path.name} is not in the torch.hub cache: "
            f"looked for {path} (TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}); HF_HUB_OFFLINE is set, "
            f"so it is not downloaded from {url}. Put the file there, or set model.pretrained to a local file")
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as e:  # network, hash mismatch, unreadable file
        raise RuntimeError(f"model.pretrained=imagenet: {what} weights from {url} (cache {path}): {e}") from e
    return state, str(path)


def _from_timm(backbone: nn.Module) -> tuple[dict, str]:
    """A fresh 3-channel copy of the timm model with ``pretrained=True`` (timm's Hub loader, the
    cache from `hf_hub_cache_dir`), as a state dict."""
    cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if not arch:
        raise ValueError(f"{type(backbone).__name__} has no timm pretrained_cfg: no published ImageNet weights")
    name = f"{arch}.{tag}" if tag else arch
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        if not cfg.get("url"):
            raise ValueError(f"timm {name} has no published weights (no hf_hub_id or url in its pretrained_cfg)")
        state, where = _from_torch_hub(cfg["url"], f"timm {name}")
        return state, where
    cache = hf_hub_cache_dir()
    repo, _, revision = hub_id.partition("@")
    files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not any(isinstance(try_to_load_from_cache(repo, f, cache_dir=str(cache), revision=revision or None), str)
                   for f in files):
            folder = cache / f"models--{repo.replace('/', '--')}"
            raise FileNotFoundError(
                f"model.pretrained=imagenet: timm {name} weights ({' or '.join(files)} of Hugging Face repo {repo}) "
                f"are not in the Hugging Face cache: looked in {folder} (HF_HUB_CACHE / HF_HOME); HF_HUB_OFFLINE "
                f"is set, so nothing is downloaded. Fetch them once online, or set model.pretrained to a local file")
    try:
        model = _timm().create_model(name, pretrained=True, num_classes=0, in_chans=3, cache_dir=str(cache))
    except Exception as e:  # network, missing revision, unreadable file
        raise RuntimeError(f"model.pretrained=imagenet: timm {name} weights from Hugging Face repo {repo} "
                           f"(cache {cache}): {e}") from e
    return model.state_dict(), f"timm {name} ({repo}, cache {cache})"


def imagenet_state_dict(backbone: nn.Module) -> tuple[dict, str]:
    """The published ImageNet weights of ``backbone`` as a state dict, and where they came from:
    BN-Inception: the authors' file (`BNINCEPTION_IMAGENET_URL`) through torch.hub's cache;
    timm models: timm's pretrained mechanism (Hugging Face Hub cache). The tiny CNN has none."""
    if isinstance(backbone, BNInception):
        return _from_torch_hub(BNINCEPTION_IMAGENET_URL, "BN-Inception (the authors')")
    if isinstance(backbone, TinyCNN):
        raise ValueError("model.pretrained=imagenet: backbones 'tiny' and 'small' have no published ImageNet weights; "
                         "use a local file or null")
    return _from_timm(backbone)
