"""Temporal Segment Network (Wang et al., ECCV 2016): shared snippet ConvNet + segmental consensus.

Input layout, for every modality: ``x`` of shape ``(B, K, L, C, H, W)``, float32:
B videos, K segments (one snippet each), L frames per snippet, C channels per frame.

============  ===  =================================  ==========================
modality      C    L                                  backbone input channels
============  ===  =================================  ==========================
rgb           3    1                                  3
rgb_diff      3    snippet_length (L differences)     3 * L   (L=5 -> 15)
flow          2    snippet_length (x, y flow planes)  2 * L   (L=5 -> 10)
warped_flow   2    snippet_length                     2 * L
============  ===  =================================  ==========================

C, L and the default dropout per modality come from the modality table, `dataloading.modality`.
For rgb_diff the data path already delivers the L differences ``frame[t+1] - frame[t]`` (from
L+1 frames).  The L frames of a snippet are stacked along channels, frame-major:
``(f0c0, f0c1, [f0c2,] f1c0, ...)``, i.e. ``x0, y0, x1, y1, ...`` for flow, as in the authors'
code.

Pipeline (timm-like):
  ``forward_features``: backbone on each of the B*K snippets -> pooled features (B, K, D)
    (with ``shift_fold_div``: TSM, channels shifted between the K snippets of a video inside
    every residual block, `tsn.temporal_shift`)
  ``forward_head``: dropout (after global pooling) + fc per snippet -> snippet scores (B, K, N)
  ``consensus``: over K, on class scores before softmax -> video scores (B, N)
``forward(x)`` returns the video scores (logits); ``forward_snippet_scores(x)`` stops before the
consensus, for test-time averaging over views.
"""

from __future__ import annotations

import torch
from torch import nn

from dataloading import modality as modalities
from tsn.backbones import build_backbone
from tsn.consensus import build_consensus
from tsn.practices import freeze_bn_except_first_
from tsn.temporal_shift import TemporalShift


class TSN(nn.Module):
    """Temporal Segment Network.  See the module docstring for the input layout.

    Args:
        num_classes: number of action classes N.
        num_segments: K used in training.  Only the 'weighted' consensus is tied to it (one
            weight per segment); with 'avg' / 'max' any K is accepted (e.g. 25 test snippets).
        modality: 'rgb', 'rgb_diff', 'flow' or 'warped_flow'.
        snippet_length: L, frames per snippet (1 for rgb; 5 in the paper for the others).
        backbone: 'tiny', 'bninception' or a timm model name (see ``build_backbone``).  Built
            with random weights; load ImageNet weights with ``load_backbone_weights(model.backbone,
            path)`` or an RGB TSN with ``init_from_rgb_checkpoint``.
        consensus: 'avg' (paper default), 'max' or 'weighted'.
        dropout: dropout rate after global pooling; None -> 0.8 for rgb / rgb_diff, 0.7 for flow /
            warped_flow (the paper's spatial / temporal values).
        partial_bn: freeze every backbone BatchNorm but the first (statistics and affine
            parameters), also across ``train()`` calls.
        shift_fold_div: TSM (`tsn.temporal_shift`): shift 1/shift_fold_div of the channels
            (each way) between neighbouring segments in every residual block; 0 (default) is TSN.
            ResNet-style backbones only.
        shift_place: 'blockres' (residual branch only, the TSM paper's default) or 'block'.
    """

    def __init__(
        self,
        num_classes: int,
        num_segments: int,
        modality: str,
        snippet_length: int,
        backbone: str = "resnet18",
        consensus: str = "avg",
        dropout: float | None = None,
        partial_bn: bool = True,
        shift_fold_div: int = 0,
        shift_place: str = "blockres",
    ):
        super().__init__()
        row = modalities.get(modality)  # ValueError naming the known modalities
        row.check_snippet_length(snippet_length)
        if num_classes < 1 or num_segments < 1:
            raise ValueError(
                f"num_classes and num_segments must be >= 1, got {num_classes}, {num_segments}"
            )
        if dropout is None:
            dropout = row.default_dropout
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        self.num_classes = num_classes
        self.num_segments = num_segments
        self.modality = modality
        self.snippet_length = snippet_length
        self.partial_bn = partial_bn
        self.channels_per_frame = row.channels_per_frame
        self.in_channels = row.input_channels(snippet_length)

        self.backbone, self.feature_dim = build_backbone(backbone, self.in_channels)
        # TSM: hooks on the backbone's blocks, no parameters (state dict keys stay TSN's).
        self.temporal_shift = (TemporalShift(self.backbone, shift_fold_div, shift_place)
                               if shift_fold_div else None)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        # The paper's N(0, 0.001): near-zero initial scores keep the first gradients flowing
        # into the pretrained backbone small.
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.001)
        nn.init.zeros_(self.fc.bias)
        self.consensus = build_consensus(consensus, num_segments)

        if partial_bn:
            # Now, not only in train(): param_groups() must already see the frozen parameters.
            freeze_bn_except_first_(self.backbone)

    def train(self, mode: bool = True) -> TSN:
        """Set train/eval mode; under Partial BN the frozen BNs stay in eval mode."""
        super().train(mode)
        if self.partial_bn:
            freeze_bn_except_first_(self.backbone)
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        c, l = self.channels_per_frame, self.snippet_length
        expected = f"(B, K, L={l}, C={c}, H, W)"
        if x.dim() != 6:
            raise ValueError(
                f"TSN({self.modality}) expects x of shape {expected}, got {tuple(x.shape)} "
                f"({x.dim()}-D)"
            )
        if x.shape[2] != l or x.shape[3] != c:
            raise ValueError(
                f"TSN({self.modality}, snippet_length={l}) expects x of shape {expected}, "
                f"got {tuple(x.shape)} (L={x.shape[2]}, C={x.shape[3]})"
            )
        if not x.is_floating_point():
            raise TypeError(f"TSN expects a floating-point input, got {x.dtype}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, L, C, H, W) -> pooled backbone features (B, K, D), one row per snippet."""
        self._check_input(x)
        b, k, l, c, h, w = x.shape
        # Frame-major channel stacking: (f0c0, f0c1, ..., f1c0, ...); all B*K snippets go
        # through the shared backbone as one batch, videos major (TSM recovers K from that).
        if self.temporal_shift is not None:
            self.temporal_shift.num_segments = k
        feats = self.backbone(x.reshape(b * k, l * c, h, w))
        return feats.reshape(b, k, -1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K, D) features -> (B, K, num_classes) snippet scores (dropout, then fc)."""
        if features.dim() != 3 or features.shape[2] != self.feature_dim:
            raise ValueError(
                f"forward_head expects features of shape (B, K, {self.feature_dim}), "
                f"got {tuple(features.shape)}"
            )
        return self.fc(self.dropout(features))

    def forward_snippet_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, L, C, H, W) -> per-snippet class scores (B, K, num_classes), before consensus."""
        return self.forward_head(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, L, C, H, W) -> video class scores (B, num_classes): consensus, no softmax."""
        return self.consensus(self.forward_snippet_scores(x))
