"""BN-Inception (Ioffe & Szegedy, 2015), the backbone of the TSN paper, in plain torch.

Layer structure follows the authors' BN-Inception used by TSN (Caffe prototxt, and its PyTorch
port ``BNInception`` in tsn-pytorch's model zoo): conv1 7x7/2 (64) + BN, max pool 3x3/2,
conv2 1x1 (64) + 3x3 (192) each with BN, max pool 3x3/2, then inception blocks 3a, 3b, 3c
(stride 2), 4a-4d, 4e (stride 2), 5a, 5b, global average pool -> 1024-d features.  Every conv
has a bias and is followed by BatchNorm (eps 1e-5) and ReLU.  About 10.3 M parameters.

Input: ``(N, C, H, W)`` float, C = 3 for RGB (more after cross-modality adaptation of
``conv1_7x7_s2``).  Output: pooled features ``(N, 1024)``.  224x224 input gives a 7x7 map
before the pool; H and W must be multiples of 32 and >= 64 (other sizes make the two branches
of the stride-2 blocks disagree in size, as in the Caffe original).
The authors' ImageNet weights expect BGR pixels in [0, 255] minus the mean [104, 117, 128]
(std 1); flow nets subtract 128: the data path applies that convention by itself
(`tsn.backbones.weights_preprocessing`, `app.preprocessing`).

Parameter names are the authors' layer names (``conv1_7x7_s2.weight``,
``conv1_7x7_s2_bn.running_mean``, ``inception_3a_1x1.weight``,
``inception_3a_double_3x3_2_bn.bias``, ...), so their state dicts load without renaming.
Each conv ``X`` is paired with its BN ``X_bn``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tsn.practices import load_state_dict_cross_modality, read_state_dict


class _Block(NamedTuple):
    """Channel plan of one inception block (0 = branch absent)."""

    name: str
    in_ch: int
    c1x1: int  # 1x1 branch
    c3x3_reduce: int  # 1x1 -> 3x3 branch
    c3x3: int
    cdouble_reduce: int  # 1x1 -> 3x3 -> 3x3 branch
    cdouble: int
    pool: str  # 'avg' (3x3/1), 'max' (3x3/1) or 'max_s2' (3x3/2 reduction, no projection)
    pool_proj: int


# From the authors' prototxt.  3c and 4e are the stride-2 reduction blocks: no 1x1 branch, the
# 3x3 convs closing the two conv branches have stride 2, and the pool branch is a plain 3x3/2
# max pool passed through without projection.
_BLOCKS = (
    _Block("3a", 192, 64, 64, 64, 64, 96, "avg", 32),  # -> 256
    _Block("3b", 256, 64, 64, 96, 64, 96, "avg", 64),  # -> 320
    _Block("3c", 320, 0, 128, 160, 64, 96, "max_s2", 0),  # -> 576, /2
    _Block("4a", 576, 224, 64, 96, 96, 128, "avg", 128),  # -> 576
    _Block("4b", 576, 192, 96, 128, 96, 128, "avg", 128),  # -> 576
    _Block("4c", 576, 160, 128, 160, 128, 160, "avg", 128),  # -> 608
    _Block("4d", 608, 96, 128, 192, 160, 192, "avg", 128),  # -> 608
    _Block("4e", 608, 0, 128, 192, 192, 256, "max_s2", 0),  # -> 1056, /2
    _Block("5a", 1056, 352, 192, 320, 160, 224, "avg", 128),  # -> 1024
    _Block("5b", 1024, 352, 192, 320, 192, 224, "max", 128),  # -> 1024
)

FEATURE_DIM = 1024


class BNInception(nn.Module):
    """BN-Inception feature extractor: (N, C, H, W) -> (N, 1024).  See the module docstring."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.num_features = FEATURE_DIM
        # Modules are registered in execution order, so ``modules()`` yields conv1 and its BN
        # first: Partial BN and the first-conv policies rely on that order.
        self._add_conv_bn("conv1_7x7_s2", in_channels, 64, 7, stride=2, padding=3)
        self._add_conv_bn("conv2_3x3_reduce", 64, 64, 1)
        self._add_conv_bn("conv2_3x3", 64, 192, 3, padding=1)
        for b in _BLOCKS:
            p = f"inception_{b.name}"
            stride = 2 if b.pool == "max_s2" else 1
            if b.c1x1:
                self._add_conv_bn(f"{p}_1x1", b.in_ch, b.c1x1, 1)
            self._add_conv_bn(f"{p}_3x3_reduce", b.in_ch, b.c3x3_reduce, 1)
            self._add_conv_bn(f"{p}_3x3", b.c3x3_reduce, b.c3x3, 3, stride=stride, padding=1)
            self._add_conv_bn(f"{p}_double_3x3_reduce", b.in_ch, b.cdouble_reduce, 1)
            self._add_conv_bn(f"{p}_double_3x3_1", b.cdouble_reduce, b.cdouble, 3, padding=1)
            self._add_conv_bn(
                f"{p}_double_3x3_2", b.cdouble, b.cdouble, 3, stride=stride, padding=1
            )
            if b.pool_proj:
                self._add_conv_bn(f"{p}_pool_proj", b.in_ch, b.pool_proj, 1)

    def _add_conv_bn(self, name, cin, cout, k, stride=1, padding=0):
        self.add_module(name, nn.Conv2d(cin, cout, k, stride=stride, padding=padding))
        self.add_module(f"{name}_bn", nn.BatchNorm2d(cout, eps=1e-5))

    def _cbr(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """conv -> BN -> ReLU of the pair registered under ``name``."""
        return F.relu(getattr(self, f"{name}_bn")(getattr(self, name)(x)), inplace=True)

    def _inception(self, b: _Block, x: torch.Tensor) -> torch.Tensor:
        p = f"inception_{b.name}"
        outs = []
        if b.c1x1:
            outs.append(self._cbr(f"{p}_1x1", x))
        outs.append(self._cbr(f"{p}_3x3", self._cbr(f"{p}_3x3_reduce", x)))
        d = self._cbr(f"{p}_double_3x3_reduce", x)
        outs.append(self._cbr(f"{p}_double_3x3_2", self._cbr(f"{p}_double_3x3_1", d)))
        if b.pool == "avg":
            # Caffe AVE pooling counts the zero padding in the divisor.
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
        elif b.pool == "max":
            pooled = F.max_pool2d(x, 3, stride=1, padding=1, ceil_mode=True)
        else:  # max_s2: reduction block, pooled input goes straight to the concat
            pooled = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        outs.append(self._cbr(f"{p}_pool_proj", pooled) if b.pool_proj else pooled)
        return torch.cat(outs, dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before global pooling: (N, C, H, W) -> (N, 1024, H/32, W/32)."""
        h, w = x.shape[-2:]
        if x.dim() != 4 or h % 32 or w % 32 or min(h, w) < 64:
            # Otherwise the stride-2 conv and ceil-mode pool branches of 3c / 4e disagree in
            # size and the concat fails with an obscure message (same in the Caffe original).
            raise ValueError(
                f"BNInception expects (N, C, H, W) with H and W multiples of 32, >= 64 "
                f"(224 in the paper), got {tuple(x.shape)}"
            )
        x = self._cbr("conv1_7x7_s2", x)
        x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        x = self._cbr("conv2_3x3", self._cbr("conv2_3x3_reduce", x))
        x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        for b in _BLOCKS:
            x = self._inception(b, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features: (N, C, H, W) -> (N, 1024)."""
        return F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1)


# Classifier names used by the authors' file (``fc``) and by the pretrainedmodels port
# (``last_linear``): present in ImageNet files, absent from this feature extractor.
CLASSIFIER_PREFIXES = ("fc.", "last_linear.", "classifier.")


def load_pretrained(model: BNInception, path: str | os.PathLike) -> list[str]:
    """Load a local BN-Inception state dict file (``torch.save``'d dict) into ``model``.

    The file is read with ``weights_only=True``.  Keys must be the authors' layer names (see
    the module docstring); classifier keys (``fc.*``, ``last_linear.*``, ``classifier.*``) may
    be present and are ignored.  BN tensors stored as (1, C), as in the authors' converted
    Caffe weights, are flattened to (C,).  If ``conv1_7x7_s2`` of ``model`` has more input
    channels than the file's 3, its weight is cross-modality initialised (mean over RGB,
    replicated).  Any other missing, unexpected or mis-shaped key raises ValueError listing them.

    Returns the keys left at their initial value (only classifier keys can be).
    """
    # The (1, C) BN blobs are flattened by the loader every weight file goes through
    # (`practices.squeeze_caffe_vectors`), the same one training uses (`backbones.load_backbone_weights`).
    return load_state_dict_cross_modality(model, read_state_dict(path), optional_prefixes=CLASSIFIER_PREFIXES)
