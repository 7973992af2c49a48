"""TSN good practices: cross-modality init, weight loading, Partial BN, parameter groups."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights in tests

import pytest
import torch
import torchvision
from torch import nn

from tsn.backbones import TinyCNN, build_backbone, load_backbone_weights
from tsn.bninception import BNInception, load_pretrained
from tsn.model import TSN
from tsn.practices import (
    batchnorm_layers,
    cross_modality_init_,
    cross_modality_weight,
    find_first_conv,
    freeze_bn_except_first_,
    init_from_rgb_checkpoint,
    param_groups,
)


def tiny_tsn(modality="rgb", num_classes=6, snippet_length=None, **kwargs):
    if snippet_length is None:
        snippet_length = 1 if modality == "rgb" else 5
    return TSN(num_classes, 3, modality, snippet_length, backbone="tiny", **kwargs)


def mean_replicated(w3, n):
    """Reference: every one of the n input channels gets the mean of the 3 RGB kernels."""
    m = (w3[:, 0] + w3[:, 1] + w3[:, 2]) / 3
    return torch.stack([m] * n, dim=1)


# ------------------------------------------------------------------- cross-modality init


def test_cross_modality_weight_is_mean_replicated():
    w = torch.randn(16, 3, 3, 3)
    new = cross_modality_weight(w, 10)
    assert new.shape == (16, 10, 3, 3)
    torch.testing.assert_close(new, mean_replicated(w, 10))
    for c in range(10):
        assert torch.equal(new[:, c], new[:, 0])  # identical over the new channels
    with pytest.raises(ValueError, match="3, kh, kw"):
        cross_modality_weight(torch.randn(16, 2, 3, 3), 10)


def test_cross_modality_init_on_conv_and_on_model():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 5, stride=2, padding=2)
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    assert cross_modality_init_(conv, 15) is conv
    assert conv.in_channels == 15 and conv.weight.shape == (8, 15, 5, 5)
    torch.testing.assert_close(conv.weight.detach(), mean_replicated(w, 15), rtol=0, atol=0)
    assert torch.equal(conv.bias, b)  # bias copied
    assert conv(torch.randn(1, 15, 10, 10)).shape == (1, 8, 5, 5)

    net = TinyCNN(3)
    w = net.conv1.weight.detach().clone()
    cross_modality_init_(net, 10)
    torch.testing.assert_close(net.conv1.weight.detach(), mean_replicated(w, 10), rtol=0, atol=0)
    assert net(torch.randn(2, 10, 16, 16)).shape == (2, 32)


def test_build_backbone_adapts_first_conv_of_the_3_channel_model():
    """The motion backbone is the RGB one with its first conv cross-modality initialised."""
    torch.manual_seed(1)
    rgb, _ = build_backbone("tiny", 3)
    torch.manual_seed(1)
    flow, _ = build_backbone("tiny", 10)
    expected = mean_replicated(rgb.conv1.weight.detach(), 10)
    torch.testing.assert_close(flow.conv1.weight.detach(), expected)
    assert torch.equal(flow.conv1.bias, rgb.conv1.bias)
    assert torch.equal(flow.conv2.weight, rgb.conv2.weight)


def test_find_first_conv():
    assert find_first_conv(tiny_tsn())[0] == "backbone.conv1"
    assert find_first_conv(BNInception())[0] == "conv1_7x7_s2"
    assert find_first_conv(build_backbone("resnet18", 3)[0])[0] == "conv1"
    # timm's pretrained_cfg names the stem: used instead of guessing from module order.
    name, conv = find_first_conv(build_backbone("mobilenetv3_small_050", 10)[0])
    assert name == "conv_stem" and conv.in_channels == 10


def test_init_from_rgb_checkpoint_copies_everything_but_first_conv():
    torch.manual_seed(0)
    rgb = tiny_tsn("rgb", num_classes=6)
    rgb.backbone.bn2.running_mean.uniform_()  # non-default buffers, to see them copied
    flow = tiny_tsn("flow", num_classes=6)
    left = init_from_rgb_checkpoint(flow, rgb.state_dict())
    assert left == []
    src, dst = rgb.state_dict(), flow.state_dict()
    expected = mean_replicated(src["backbone.conv1.weight"], 10)
    torch.testing.assert_close(dst["backbone.conv1.weight"], expected, rtol=0, atol=0)
    for key in src:
        if key != "backbone.conv1.weight":
            assert torch.equal(dst[key], src[key]), key  # includes conv1 bias, BN stats, fc


def test_init_from_rgb_checkpoint_other_class_count_keeps_fc_and_accepts_ddp_prefix():
    torch.manual_seed(0)
    rgb = tiny_tsn("rgb", num_classes=6)
    diff = tiny_tsn("rgb_diff", num_classes=4)
    fc_before = diff.fc.weight.detach().clone()
    ddp_state = {f"module.{k}": v for k, v in rgb.state_dict().items()}
    left = init_from_rgb_checkpoint(diff, ddp_state)
    assert sorted(left) == ["fc.bias", "fc.weight"]
    assert torch.equal(diff.fc.weight, fc_before)
    assert diff.backbone.conv1.weight.shape[1] == 15
    assert torch.equal(diff.backbone.conv2.weight, rgb.backbone.conv2.weight)


def test_init_from_rgb_checkpoint_other_backbone_fails_clearly():
    rgb = TSN(6, 3, "rgb", 1, backbone="resnet18")
    flow = tiny_tsn("flow")
    before = flow.backbone.conv2.weight.detach().clone()
    match = r"(?s)missing \(7\): backbone\.conv1\.bias.*unexpected \(95\)"
    with pytest.raises(ValueError, match=match):
        init_from_rgb_checkpoint(flow, rgb.state_dict())
    assert torch.equal(flow.backbone.conv2.weight, before)  # nothing loaded


# -------------------------------------------------------------------------- weight files


def test_load_backbone_weights_into_flow_model(tmp_path):
    torch.manual_seed(0)
    imagenet = TinyCNN(3)
    imagenet.bn1.running_var.uniform_(0.5, 2.0)
    state = dict(imagenet.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 32), torch.randn(1000)  # classifier
    path = tmp_path / "tiny_imagenet.pth"
    torch.save(state, path)

    flow = tiny_tsn("flow")  # 10-channel first conv
    assert load_backbone_weights(flow.backbone, path) == []
    got, ref = flow.backbone.state_dict(), imagenet.state_dict()
    expected = mean_replicated(ref["conv1.weight"], 10)
    torch.testing.assert_close(got["conv1.weight"], expected, rtol=0, atol=0)
    for key in ref:
        if key != "conv1.weight":
            assert torch.equal(got[key], ref[key]), key


def test_load_backbone_weights_reports_bad_files(tmp_path):
    state = TinyCNN(3).state_dict()
    state["conv2.weight"] = torch.randn(32, 16, 5, 5)  # wrong shape
    del state["bn2.bias"]  # missing
    state["extra.weight"] = torch.zeros(1)  # unexpected
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    net = TinyCNN(3)
    with pytest.raises(ValueError) as err:
        load_backbone_weights(net, path)
    msg = str(err.value)
    assert "missing (1): bn2.bias" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "conv2.weight (32, 16, 5, 5)->(32, 16, 3, 3)" in msg
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(net, tmp_path / "nope.pth")


def test_load_torchvision_resnet18_file_into_timm_flow_backbone(tmp_path):
    """torchvision ResNet files use timm's names; their fc is dropped."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_tv.pth"
    torch.save({"state_dict": tv.state_dict()}, path)  # wrapped, as many checkpoints are
    backbone, _ = build_backbone("resnet18", 10)
    assert load_backbone_weights(backbone, path) == []
    ref, got = tv.state_dict(), backbone.state_dict()
    expected = mean_replicated(ref["conv1.weight"], 10)
    torch.testing.assert_close(got["conv1.weight"], expected, rtol=0, atol=0)
    for key in got:
        if key != "conv1.weight":
            assert torch.equal(got[key], ref[key]), key


def test_bninception_load_pretrained_authors_format(tmp_path):
    """Authors' file: BN blobs as (1, C), an fc classifier, no num_batches_tracked."""
    torch.manual_seed(0)
    rgb = BNInception(3)
    for bn in batchnorm_layers(rgb):
        bn.running_mean.normal_()
    state = {k: v for k, v in rgb.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: (v.unsqueeze(0) if "_bn." in k else v) for k, v in state.items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 1024), torch.randn(1000)
    path = tmp_path / "bn_inception.pth"
    torch.save(state, path)

    flow = BNInception(3)
    cross_modality_init_(flow, 10)
    left = load_pretrained(flow, path)
    assert all(k.endswith("num_batches_tracked") for k in left)
    ref, got = rgb.state_dict(), flow.state_dict()
    torch.testing.assert_close(
        got["conv1_7x7_s2.weight"], mean_replicated(ref["conv1_7x7_s2.weight"], 10), rtol=0, atol=0
    )
    for key in ref:
        if key != "conv1_7x7_s2.weight" and not key.endswith("num_batches_tracked"):
            assert torch.equal(got[key], ref[key]), key

    torch.save({"conv1_7x7_s2.weight": torch.zeros(64, 3, 7, 7), "junk": torch.zeros(1)}, path)
    match = r"(?s)missing \(413\): conv1_7x7_s2\.bias.*unexpected \(1\): junk"
    with pytest.raises(ValueError, match=match):
        load_pretrained(BNInception(3), path)


# ------------------------------------------------------------------------------ Partial BN


def bn_snapshot(bn):
    return {k: v.detach().clone() for k, v in bn.state_dict().items()}


def train_one_step(model, modality="rgb"):
    length, c = (1, 3) if modality == "rgb" else (5, 2)
    x = torch.randn(4, 3, length, c, 16, 16) * 3 + 1  # far from the initial BN statistics
    opt = torch.optim.SGD(param_groups(model, lr=0.5, weight_decay=1e-3), momentum=0.9)
    model.train()
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("modality", ["rgb", "flow"])
def test_partial_bn_freezes_all_but_first_bn(modality):
    torch.manual_seed(0)
    model = tiny_tsn(modality, dropout=0.0, partial_bn=True)
    bn1, bn2 = model.backbone.bn1, model.backbone.bn2
    model.eval()
    model.train()  # train() must not undo the freeze
    assert bn1.training and not bn2.training and model.training
    assert bn1.weight.requires_grad and not bn2.weight.requires_grad and not bn2.bias.requires_grad
    before1, before2 = bn_snapshot(bn1), bn_snapshot(bn2)
    train_one_step(model, modality)
    after1, after2 = bn_snapshot(bn1), bn_snapshot(bn2)
    for key in before2:  # running_mean/var, num_batches_tracked, weight, bias all unchanged
        assert torch.equal(after2[key], before2[key]), key
    assert not torch.equal(after1["running_mean"], before1["running_mean"])
    assert not torch.equal(after1["running_var"], before1["running_var"])
    assert not torch.equal(after1["weight"], before1["weight"])  # first BN's affine still trains


def test_partial_bn_off_trains_every_bn():
    torch.manual_seed(0)
    model = tiny_tsn("rgb", dropout=0.0, partial_bn=False)
    bns = batchnorm_layers(model)
    before = [bn_snapshot(bn) for bn in bns]
    train_one_step(model)
    for bn, snap in zip(bns, before):
        assert bn.training
        for key in ("running_mean", "running_var", "weight", "bias"):
            assert not torch.equal(bn.state_dict()[key], snap[key]), key


def test_partial_bn_on_bninception_keeps_only_conv1_bn():
    model = TSN(5, 3, "flow", 5, backbone="bninception")
    bns = batchnorm_layers(model.backbone)
    # conv1, conv2 x2, 8 blocks with 7 convs, the 2 reduction blocks (3c, 4e) with 5
    assert len(bns) == 3 + 8 * 7 + 2 * 5 and bns[0] is model.backbone.conv1_7x7_s2_bn
    assert bns[0].weight.requires_grad and bns[0].training
    assert not any(bn.weight.requires_grad or bn.training for bn in bns[1:])


def test_freeze_bn_except_first_standalone():
    net = TinyCNN(3)
    frozen = freeze_bn_except_first_(net)
    assert frozen == [net.bn2]
    assert not net.bn2.training and not net.bn2.bias.requires_grad and net.bn1.bias.requires_grad


# ------------------------------------------------------------------------ parameter groups


def groups_by_name(groups):
    return {g["name"]: g for g in groups}


def assert_partition(model, groups):
    """Every trainable parameter in exactly one group, frozen ones in none."""
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(grouped) == trainable


@pytest.mark.parametrize(
    "modality, first_w, first_b", [("rgb", 1.0, 2.0), ("flow", 5.0, 10.0), ("rgb_diff", 5.0, 10.0)]
)
def test_param_groups_multipliers_and_decay(modality, first_w, first_b):
    model = tiny_tsn(modality)
    groups = param_groups(model, lr=0.01, weight_decay=5e-4)
    by_name = groups_by_name(groups)
    expected = {  # name: (lr_mult, decay_mult, params)
        "first_conv_weight": (first_w, 1.0, [model.backbone.conv1.weight]),
        "first_conv_bias": (first_b, 0.0, [model.backbone.conv1.bias]),
        "normal_weight": (1.0, 1.0, [model.backbone.conv2.weight, model.fc.weight]),
        "normal_bias": (2.0, 0.0, [model.backbone.conv2.bias, model.fc.bias]),
        "bn": (1.0, 0.0, [model.backbone.bn1.weight, model.backbone.bn1.bias]),  # bn2 frozen
    }
    assert set(by_name) == set(expected)
    for name, (lr_mult, decay_mult, params) in expected.items():
        g = by_name[name]
        assert g["lr_mult"] == lr_mult and g["decay_mult"] == decay_mult
        assert g["lr"] == pytest.approx(0.01 * lr_mult)
        assert g["weight_decay"] == pytest.approx(5e-4 * decay_mult)
        assert [id(p) for p in g["params"]] == [id(p) for p in params], name
    assert_partition(model, groups)
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # accepted as is


def test_param_groups_without_partial_bn_and_with_weighted_consensus():
    model = tiny_tsn("flow", partial_bn=False, consensus="weighted")
    groups = param_groups(model, lr=0.1, weight_decay=1e-4, first_conv_lr_mult=(2.0, 3.0))
    by_name = groups_by_name(groups)
    assert len(by_name["bn"]["params"]) == 4  # both BNs train
    assert by_name["consensus"]["params"] == [model.consensus.logits]
    assert by_name["consensus"]["weight_decay"] == 0.0
    assert by_name["first_conv_weight"]["lr"] == pytest.approx(0.2)
    assert by_name["first_conv_bias"]["lr"] == pytest.approx(0.3)
    assert_partition(model, groups)


def test_param_groups_timm_resnet_partition():
    model = TSN(5, 3, "flow", 5, backbone="resnet18")
    groups = param_groups(model, lr=0.001, weight_decay=5e-4)
    by_name = groups_by_name(groups)
    assert "first_conv_bias" not in by_name  # ResNet's conv1 has no bias: empty group left out
    assert by_name["first_conv_weight"]["params"] == [model.backbone.conv1.weight]
    assert by_name["bn"]["params"] == [model.backbone.bn1.weight, model.backbone.bn1.bias]
    assert_partition(model, groups)


def test_param_groups_errors():
    class Wrapper(nn.Module):  # e.g. DDP: no .modality
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    wrapped = Wrapper(tiny_tsn("flow"))
    with pytest.raises(ValueError, match="modality"):
        param_groups(wrapped, lr=0.1, weight_decay=0.0)
    assert param_groups(wrapped, lr=0.1, weight_decay=0.0, first_conv_lr_mult=(5, 10))

    model = tiny_tsn("rgb")
    model.extra = nn.PReLU()  # a parameterised layer with no policy
    with pytest.raises(ValueError, match="extra.*PReLU"):
        param_groups(model, lr=0.1, weight_decay=0.0)
