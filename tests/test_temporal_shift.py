"""TSM (`tsn.temporal_shift`): the shift itself as exact tensors, TSN equivalence, where it acts
in the network, and the config that turns it on."""

from __future__ import annotations

import pytest
import torch

from tsn.model import TSN
from tsn.temporal_shift import TemporalShift, residual_blocks, temporal_shift


def _snippets(videos: int, segments: int, channels: int) -> torch.Tensor:
    """(videos*segments, channels, 1, 1) with value 100*video + 10*t + c: every entry names its origin."""
    v = torch.arange(videos).view(-1, 1, 1) * 100 + torch.arange(segments).view(1, -1, 1) * 10
    return (v + torch.arange(channels).view(1, 1, -1)).float().view(videos * segments, channels, 1, 1)


# (videos, K, C, fold_div) -> expected[video][t] as channel lists
SHIFTS = [
    # fold 1 of 4: channel 0 from t+1 (0 at the end), channel 1 from t-1 (0 at the start), 2-3 stay
    (1, 3, 4, 4, [[[10, 0, 2, 3], [20, 1, 12, 13], [0, 11, 22, 23]]]),
    # fold 2 of 4: channels 0-1 from t+1, 2-3 from t-1, none stay
    (1, 3, 4, 2, [[[10, 11, 0, 0], [20, 21, 2, 3], [0, 0, 12, 13]]]),
    # fold 8 of 4 channels is 0 channels: TSN
    (1, 2, 4, 8, [[[0, 1, 2, 3], [10, 11, 12, 13]]]),
    # two videos: nothing crosses from one video into the other
    (2, 2, 2, 2, [[[10, 0], [0, 1]], [[110, 0], [0, 101]]]),
    # K = 1 (a single snippet): the shifted channels see only zeros
    (1, 1, 4, 4, [[[0, 0, 2, 3]]]),
    # fold_div 0: no shift at all
    (1, 2, 2, 0, [[[0, 1], [10, 11]]]),
]


@pytest.mark.parametrize("videos,segments,channels,fold_div,expected", SHIFTS)
def test_temporal_shift_moves_exactly_the_folded_channels(videos, segments, channels, fold_div, expected):
    out = temporal_shift(_snippets(videos, segments, channels), segments, fold_div)
    assert out.shape == (videos * segments, channels, 1, 1)
    assert out.view(videos, segments, channels).tolist() == expected


def test_temporal_shift_keeps_the_spatial_map_and_is_differentiable():
    x = torch.randn(2 * 3, 8, 4, 5, requires_grad=True)
    out = temporal_shift(x, 3, 4)
    v, o = x.view(2, 3, 8, 4, 5), out.view(2, 3, 8, 4, 5)
    assert torch.equal(o[:, :2, :2], v[:, 1:, :2]) and torch.equal(o[:, 1:, 2:4], v[:, :2, 2:4])
    assert torch.equal(o[:, :, 4:], v[:, :, 4:])
    out.sum().backward()
    # every input entry reaches the output once, except the ones shifted out at the ends
    assert x.grad.sum().item() == x.numel() - 2 * 2 * 2 * 4 * 5


@pytest.mark.parametrize("shape,segments,fold_div,message", [
    ((6, 8, 2), 3, 8, "expects \\(N\\*K, C, H, W\\)"),
    ((5, 8, 2, 2), 3, 8, "5 snippets is not a multiple of num_segments=3"),
    ((6, 8, 2, 2), 0, 8, "not a multiple of num_segments=0"),
    ((6, 8, 2, 2), 3, 1, "fold_div must be 0 \\(no shift\\) or >= 2, got 1"),
    ((6, 8, 2, 2), 3, -2, "fold_div must be 0"),
])
def test_temporal_shift_refuses_bad_arguments(shape, segments, fold_div, message):
    with pytest.raises(ValueError, match=message):
        temporal_shift(torch.zeros(shape), segments, fold_div)


def _resnet(seed: int = 0, **kwargs) -> TSN:
    torch.manual_seed(seed)
    model = TSN(5, 3, "rgb", 1, backbone="resnet18", dropout=0.0, partial_bn=False, **kwargs).eval()
    # timm zero-initialises each block's last BN, so a fresh residual branch outputs 0 and a shift
    # on it is invisible: give the branches a weight, as training (or ImageNet weights) would.
    for block in residual_blocks(model.backbone):
        block.bn2.weight.data.fill_(1.0)
    return model


@pytest.fixture(scope="module")
def clip():
    return torch.randn(2, 3, 1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_fold_div_zero_is_tsn_exactly(clip):
    tsn, off = _resnet(), _resnet(shift_fold_div=0)
    assert off.temporal_shift is None
    assert list(tsn.state_dict()) == list(off.state_dict())
    with torch.no_grad():
        assert torch.equal(tsn(clip), off(clip))


@pytest.mark.parametrize("place", ["blockres", "block"])
def test_tsm_has_tsns_parameters_and_mixes_neighbouring_segments(clip, place):
    tsn, tsm = _resnet(), _resnet(shift_fold_div=8, shift_place=place)
    # zero parameters: the same state dict, so TSN checkpoints and ImageNet weights load into TSM
    assert {k: v.shape for k, v in tsn.state_dict().items()} == {k: v.shape for k, v in tsm.state_dict().items()}
    tsm.load_state_dict(tsn.state_dict())
    assert len(tsm.temporal_shift.blocks) == 8  # resnet18: 2 blocks in each of 4 stages
    changed = clip.clone()
    changed[:, 1] += 1.0  # only the middle segment of each video
    with torch.no_grad():
        f_tsn, g_tsn = tsn.forward_features(clip), tsn.forward_features(changed)
        f_tsm, g_tsm = tsm.forward_features(clip), tsm.forward_features(changed)
    # TSN: each snippet is seen alone, so the other segments' features do not move
    assert torch.equal(f_tsn[:, [0, 2]], g_tsn[:, [0, 2]])
    # TSM: segments 0 and 2 are neighbours of 1 and see the change
    assert (f_tsm[:, 0] - g_tsm[:, 0]).abs().max() > 1e-3
    assert (f_tsm[:, 2] - g_tsm[:, 2]).abs().max() > 1e-3
    assert not torch.allclose(f_tsn, f_tsm)
    # with the hooks removed the same weights are TSN again
    tsm.temporal_shift.remove()
    with torch.no_grad():
        assert torch.equal(tsm.forward_features(clip), f_tsn)


def test_tsm_runs_any_segment_count_at_test_time():
    tsm = _resnet(shift_fold_div=8)
    x = torch.randn(1, 25, 1, 3, 32, 32)  # the 25 test segments of a K=3 model
    with torch.no_grad():
        assert tsm.forward_snippet_scores(x).shape == (1, 25, 5)
        # the shift follows each call's K: cut into 5 videos of 5, the snippets at the cuts lose
        # their neighbours, so the scores change
        split = tsm.forward_snippet_scores(x.view(5, 5, 1, 3, 32, 32)).view(1, 25, 5)
        whole = tsm.forward_snippet_scores(x)
    assert not torch.allclose(split, whole)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_tsm_traces_for_export(clip):
    tsm = _resnet(shift_fold_div=8)
    with torch.no_grad():
        traced = torch.jit.trace(tsm, clip, check_trace=False)
        probe = torch.randn(3, 3, 1, 3, 32, 32)
        assert torch.allclose(traced(probe), tsm(probe), atol=1e-5)


def test_temporal_shift_needs_a_resnet_backbone():
    with pytest.raises(ValueError, match="ResNet-style backbone.*TinyCNN has no layer1"):
        TSN(5, 3, "rgb", 1, backbone="tiny", shift_fold_div=8)
    with pytest.raises(ValueError, match="place must be one of blockres, block, got 'conv'"):
        TemporalShift(_resnet().backbone, 8, "conv")


@pytest.mark.parametrize("overrides,message", [
    (["model.temporal_shift.fold_div=1"], "model.temporal_shift.fold_div: must be 0 \\(off\\) or >= 2, got 1"),
    (["model.temporal_shift.place=conv"], "model.temporal_shift.place: must be one of blockres, block"),
    (["model.temporal_shift.fold_div=8", "model.backbone=tiny"], "^model.temporal_shift.fold_div=8 with backbone 'tiny': temporal shift needs a ResNet-style timm backbone.*got 'tiny'"),
    (["model.temporal_shift.fold_div=8"], "^model.temporal_shift.fold_div=8 with backbone 'small': .*got 'small'"),
    (["model.temporal_shift.fold_div=8", "model.backbone=bninception"], "got 'bninception'"),
    (["model.temporal_shift.folds=8"], "model.temporal_shift.folds: unknown key"),
])
def test_config_refuses_a_bad_temporal_shift(overrides, message):
    from app.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_builds_tsm_on_a_resnet():
    from app.build import build_model
    from app.config import config_from_dict, config_to_dict, load_config

    cfg = load_config(None, ["model.backbone=resnet50.a1_in1k", "model.temporal_shift.fold_div=8",
                             "model.modality=rgb", "model.snippet_length=1"])
    assert config_from_dict(config_to_dict(cfg)) == cfg  # saved with the run / checkpoint and read back
    cfg = load_config(None, ["model.backbone=resnet18", "model.temporal_shift.fold_div=4",
                             "model.temporal_shift.place=block"])
    model = build_model(cfg, 6, fresh=True)
    assert (model.temporal_shift.fold_div, model.temporal_shift.place) == (4, "block")
    assert build_model(load_config(None, ["model.backbone=resnet18"]), 6, fresh=True).temporal_shift is None
