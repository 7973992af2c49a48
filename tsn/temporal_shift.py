"""Temporal Shift Module (Lin, Gan, Han, ICCV 2019): TSN plus a zero-parameter shift in time.

Inside every residual block of a ResNet-style backbone, a slice of the channels moves one
segment along the time axis: the first ``C // fold_div`` channels take the NEXT segment's
values ("shift left", zeros at the last segment), the next ``C // fold_div`` take the PREVIOUS
segment's ("shift right", zeros at the first), the rest stay. Sampling, cost and parameters are
TSN's; the backbone's 2D convolutions now mix information of neighbouring segments, which is
what temporal datasets need (mmaction2: TSM-R50 73.18 vs TSN-R50 72.83 top-1 on Kinetics-400
with the same pipeline; the gap is much larger on Something-Something).

Layout: the backbone sees the B*K snippets of a batch as one (B*K, C, H, W) tensor, videos
major (`TSN.forward_features` reshapes (B, K, ...) that way), so the time axis is recovered as
``x.view(B, K, C, H, W)``. ``place``: 'blockres' shifts the input of the block's residual
branch only (before ``conv1``; the identity path keeps the unshifted features: the paper's
recommended "residual shift"), 'block' shifts the block's input for both paths ("in-place").

The shift runs as forward pre-hooks on the existing modules, so the backbone's parameter names
are unchanged: ImageNet weights and TSN checkpoints load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PLACES = ("blockres", "block")
STAGES = ("layer1", "layer2", "layer3", "layer4")  # timm / torchvision ResNet stage names


def temporal_shift(x: torch.Tensor, num_segments: int, fold_div: int) -> torch.Tensor:
    """Shift channel slices of ``x`` (N*K, C, H, W) by one segment along K; same shape out.

    ``out[n, t, :f] = x[n, t+1, :f]`` (0 at t = K-1), ``out[n, t, f:2f] = x[n, t-1, f:2f]``
    (0 at t = 0), the other channels unchanged, with ``f = C // fold_div``. ``fold_div = 0``
    (or ``f = 0``) returns ``x`` itself: TSN.
    """
    if x.dim() != 4:
        raise ValueError(f"temporal_shift expects (N*K, C, H, W), got {tuple(x.shape)}")
    if num_segments < 1 or x.shape[0] % num_segments:
        raise ValueError(f"temporal_shift: {x.shape[0]} snippets is not a multiple of num_segments={num_segments}")
    if fold_div < 0 or fold_div == 1:
        raise ValueError(f"fold_div must be 0 (no shift) or >= 2, got {fold_div}")
    fold = x.shape[1] // fold_div if fold_div else 0
    if fold == 0:
        return x
    nk, c, h, w = x.shape
    v = x.view(nk // num_segments, num_segments, c, h, w)
    # Padding + slicing rather than in-place writes into a zeros tensor: traceable and
    # exportable (TorchScript, ONNX) with no data-dependent shapes.
    left = F.pad(v[:, 1:, :fold], (0, 0, 0, 0, 0, 0, 0, 1))  # t <- t+1, zero at the end
    right = F.pad(v[:, :-1, fold:2 * fold], (0, 0, 0, 0, 0, 0, 1, 0))  # t <- t-1, zero at the start
    return torch.cat((left, right, v[:, :, 2 * fold:]), dim=2).view(nk, c, h, w)


def residual_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The residual blocks of a ResNet-style backbone, in order (stages layer1..layer4).

    ValueError when ``backbone`` has no such stages or a block has no ``conv1`` (TSM needs
    the residual branch's first conv as its place).
    """
    blocks = []
    for stage in STAGES:
        seq = getattr(backbone, stage, None)
        if not isinstance(seq, nn.Sequential):
            raise ValueError(f"temporal shift needs a ResNet-style backbone (stages {', '.join(STAGES)} of residual "
                             f"blocks); {type(backbone).__name__} has no {stage}")
        for block in seq:
            if not isinstance(getattr(block, "conv1", None), nn.Module):
                raise ValueError(f"temporal shift: block {type(block).__name__} of {stage} has no conv1")
            blocks.append(block)
    return blocks


class TemporalShift:
    """Installs the shift on every residual block of ``backbone`` (forward pre-hooks).

    The segment count K is a property of each forward call (K in training, 25 test segments
    at test time), so the owner sets ``num_segments`` before running the backbone
    (`TSN.forward_features` does). Not an ``nn.Module``: it holds no parameters or buffers,
    and the backbone's state dict stays TSN's.
    """

    def __init__(self, backbone: nn.Module, fold_div: int = 8, place: str = "blockres"):
        if place not in PLACES:
            raise ValueError(f"temporal shift place must be one of {', '.join(PLACES)}, got {place!r}")
        if fold_div < 2:
            raise ValueError(f"temporal shift fold_div must be >= 2 (0 disables the shift), got {fold_div}")
        self.fold_div = fold_div
        self.place = place
        self.num_segments = 1
        self.blocks = residual_blocks(backbone)
        self._handles = [(b.conv1 if place == "blockres" else b).register_forward_pre_hook(self._hook)
                         for b in self.blocks]

    def _hook(self, module: nn.Module, args: tuple) -> tuple:
        return (temporal_shift(args[0], self.num_segments, self.fold_div), *args[1:])

    def remove(self) -> None:
        """Uninstall the hooks (the backbone is TSN's again)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def check_backbone(name: str) -> None:
    """ValueError unless ``name`` is a timm ResNet-family model (where TSM is defined).

    A name check (timm's resnet module), so a config fails before any model is built.
    """
    import timm

    if name.split(".")[0] not in timm.list_models(module="resnet"):  # "resnet50.a1_in1k": a tag
        raise ValueError(f"temporal shift needs a ResNet-style timm backbone (e.g. resnet18, resnet50, resnext50_32x4d); "
                         f"got {name!r}")
