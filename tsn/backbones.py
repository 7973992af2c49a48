"""Snippet backbones: ConvNets mapping one stacked snippet to a pooled feature vector.

``build_backbone(name, in_channels)`` returns ``(module, feature_dim)``; the module maps
``(N, in_channels, H, W)`` float images to ``(N, feature_dim)`` globally pooled features (no
classifier: TSN adds its own dropout + fc).

Every backbone is built with 3 input channels first and, when ``in_channels != 3``, its first
conv is then adapted with the cross-modality rule (RGB kernels averaged, replicated over the
new channels).  Building this way keeps one code path for RGB and motion nets, and ImageNet
weights for the 3-channel model transfer with ``load_backbone_weights``, which applies the same
rule to the file's first conv.
"""

from __future__ import annotations

import os

import timm
import torch
from torch import nn

from tsn.bninception import BNInception
from tsn.practices import cross_modality_init_, load_state_dict_cross_modality, read_state_dict


class TinyCNN(nn.Module):
    """A tiny CNN for fast tests: (N, C, H, W) -> (N, 32).

    conv 3x3/2 (16) + BN + ReLU, conv 3x3/2 (32) + BN + ReLU, global average pool.  Two BNs so
    that Partial BN (first BN trains, the second is frozen) is observable; the convs keep their
    bias, like BN-Inception's, so the first-conv bias policy is exercised too.
    """

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.num_features = 32
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return x.mean(dim=(2, 3))


def build_backbone(name: str, in_channels: int) -> tuple[nn.Module, int]:
    """Build backbone ``name`` for ``in_channels`` input channels (random init, no download).

    ``name``: 'tiny' (``TinyCNN``), 'bninception' (``BNInception``, 1024-d) or any timm model
    name ('resnet18', 'resnet50', 'mobilenetv3_small_050', ...), created with
    ``pretrained=False, num_classes=0`` so it returns pooled features.
    Returns ``(module, feature_dim)``.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if name == "tiny":
        model = TinyCNN(3)
        dim = model.num_features
    elif name == "bninception":
        model = BNInception(3)
        dim = model.num_features
    elif timm.is_model(name):
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=3)
        # head_hidden_size is the pooled output size when a pre-logits head sits between the
        # stem features and the (removed) classifier, e.g. MobileNetV3: 1024 vs num_features 288.
        dim = getattr(model, "head_hidden_size", None) or model.num_features
    else:
        raise ValueError(
            f"unknown backbone {name!r}: use 'tiny', 'bninception' or a timm model name"
        )
    if in_channels != 3:
        cross_modality_init_(model, in_channels)
    return model, dim


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of ImageNet classifiers: ignored when loading a feature extractor."""
    prefixes = ["fc.", "classifier.", "last_linear.", "head.fc."]
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    for c in [classifier] if isinstance(classifier, str) else (classifier or ()):
        prefixes.append(f"{c}.")
    return tuple(dict.fromkeys(prefixes))


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load ImageNet weights from a local ``torch.save``'d state dict into a backbone.

    Accepts timm-format files and torchvision ResNet files (same parameter names as timm's
    ResNets; their ``fc.*`` classifier is dropped).  Checkpoints wrapped as
    ``{'state_dict': ...}`` / ``{'model': ...}`` and ``module.``-prefixed keys are unwrapped.
    Classifier keys (``fc``, ``classifier``, ``head.fc``, timm's ``pretrained_cfg['classifier']``)
    are ignored.  Every other tensor must match in name and shape, except the first conv: a
    3-channel kernel from the file is cross-modality adapted (mean over RGB, replicated) when
    the backbone takes more channels.  Mismatches raise ValueError listing the offending keys
    (torchvision files of non-ResNet families use other names than timm: convert them first).

    Returns the backbone's keys left at their initial value.
    """
    state = read_state_dict(path)
    return load_state_dict_cross_modality(
        backbone, state, optional_prefixes=_classifier_prefixes(backbone)
    )

