"""TSN model: input layout, shapes per modality, consensus, gradient flow, classifier head."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights in tests

import math

import pytest
import torch
from torch import nn

from tsn.consensus import AvgConsensus, MaxConsensus, WeightedConsensus, build_consensus
from tsn.model import TSN

B, K, HW = 2, 3, 32

# modality -> (snippet_length, channels per frame)
LAYOUTS = {"rgb": (1, 3), "rgb_diff": (5, 3), "flow": (5, 2), "warped_flow": (5, 2)}


def make_input(modality, b=B, k=K, hw=HW):
    length, c = LAYOUTS[modality]
    return torch.randn(b, k, length, c, hw, hw)


def tiny_tsn(modality="rgb", num_classes=7, **kwargs):
    return TSN(num_classes, K, modality, LAYOUTS[modality][0], backbone="tiny", **kwargs)


# ----------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("modality", list(LAYOUTS))
def test_shapes_every_modality(modality):
    torch.manual_seed(0)
    model = tiny_tsn(modality)
    length, c = LAYOUTS[modality]
    assert model.in_channels == length * c  # rgb 3, rgb_diff 15, flow / warped_flow 10
    assert model.backbone.conv1.in_channels == length * c
    x = make_input(modality)
    assert model.forward_features(x).shape == (B, K, 32)
    assert model.forward_snippet_scores(x).shape == (B, K, 7)
    assert model(x).shape == (B, 7)


def test_flow_channels_are_stacked_frame_major():
    """Backbone input is (x0, y0, x1, y1, ...): the frames of a snippet concatenated on C."""
    torch.manual_seed(0)
    model = tiny_tsn("flow").eval()
    x = make_input("flow")
    stacked = torch.cat([x[:, :, t] for t in range(5)], dim=2)  # (B, K, 10, H, W)
    assert torch.equal(stacked[0, 0, 2], x[0, 0, 1, 0])  # channel 2 = x-plane of frame 1
    expected = model.backbone(stacked.reshape(B * K, 10, HW, HW)).reshape(B, K, -1)
    torch.testing.assert_close(model.forward_features(x), expected)


def test_avg_model_accepts_any_number_of_snippets():
    """Test time uses 25 snippets with a net trained on K=3: avg consensus = mean of snippets."""
    torch.manual_seed(0)
    model = tiny_tsn("rgb").eval()
    x = make_input("rgb", k=5)
    with torch.no_grad():
        scores = model.forward_snippet_scores(x)
        assert scores.shape == (B, 5, 7)
        torch.testing.assert_close(model(x), scores.mean(dim=1))


@pytest.mark.parametrize(
    "modality, shape, match",
    [
        ("rgb", (B, K, 3, HW, HW), r"\(B, K, L=1, C=3, H, W\), got \(2, 3, 3, 32, 32\)"),
        ("rgb", (B * K, 1, 3, HW, HW), r"\(B, K, L=1, C=3, H, W\).*5-D"),  # flattened B*K
        ("rgb", (B, K, 5, 3, HW, HW), r"L=1, C=3.*got \(2, 3, 5, 3, 32, 32\)"),
        ("flow", (B, K, 5, 3, HW, HW), r"L=5, C=2.*L=5, C=3"),  # 3 channels for flow
        ("flow", (B, K, 2, 5, HW, HW), r"L=5, C=2.*L=2, C=5"),  # L and C swapped
        ("flow", (B, K, 10, 1, HW, HW), "L=5, C=2"),  # pre-stacked channels
        ("rgb_diff", (B, K, 6, 3, HW, HW), "L=5, C=3"),  # L+1 raw frames instead of L diffs
    ],
)
def test_wrong_layout_raises_clear_error(modality, shape, match):
    model = tiny_tsn(modality)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_integer_input_rejected():
    model = tiny_tsn("rgb")
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(B, K, 1, 3, HW, HW, dtype=torch.uint8))


def test_constructor_validation():
    with pytest.raises(ValueError, match="rgb, rgb_diff, flow, warped_flow"):
        TSN(5, 3, "RGB", 1, backbone="tiny")
    with pytest.raises(ValueError, match="snippet_length: must be 1"):
        TSN(5, 3, "rgb", 5, backbone="tiny")
    with pytest.raises(ValueError, match="dropout"):
        TSN(5, 3, "rgb", 1, backbone="tiny", dropout=1.0)
    with pytest.raises(ValueError, match="unknown backbone"):
        TSN(5, 3, "rgb", 1, backbone="no_such_net")
    with pytest.raises(ValueError, match="avg, max, weighted"):
        TSN(5, 3, "rgb", 1, backbone="tiny", consensus="mean")


# -------------------------------------------------------------------------------- consensus

SCORES = torch.tensor(
    [
        [[1.0, -2.0], [3.0, 0.0], [2.0, 5.0]],
        [[0.0, 1.0], [0.0, 1.0], [3.0, -5.0]],
    ]
)  # (B=2, K=3, C=2)


def test_avg_consensus_values():
    out = build_consensus("avg", 3)(SCORES)
    assert isinstance(build_consensus("avg", 3), AvgConsensus)
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.0], [1.0, -1.0]]))


def test_max_consensus_values():
    assert isinstance(build_consensus("max", 3), MaxConsensus)
    out = build_consensus("max", 3)(SCORES)
    torch.testing.assert_close(out, torch.tensor([[3.0, 5.0], [3.0, 1.0]]))


def test_weighted_consensus_starts_uniform_and_uses_softmax_weights():
    cons = build_consensus("weighted", 3)
    assert isinstance(cons, WeightedConsensus)
    torch.testing.assert_close(cons.weights, torch.full((3,), 1 / 3))
    torch.testing.assert_close(cons(SCORES), SCORES.mean(dim=1))  # uniform 1/K = avg
    with torch.no_grad():
        cons.logits.copy_(torch.log(torch.tensor([1.0, 2.0, 1.0])))  # -> weights 1/4, 1/2, 1/4
    torch.testing.assert_close(cons.weights, torch.tensor([0.25, 0.5, 0.25]))
    expected = torch.tensor(
        [
            [0.25 * 1 + 0.5 * 3 + 0.25 * 2, 0.25 * -2 + 0.5 * 0 + 0.25 * 5],  # 2.25, 0.75
            [0.25 * 0 + 0.5 * 0 + 0.25 * 3, 0.25 * 1 + 0.5 * 1 + 0.25 * -5],  # 0.75, -0.5
        ]
    )
    torch.testing.assert_close(cons(SCORES), expected)


def test_weighted_consensus_gradient_reaches_weights():
    cons = build_consensus("weighted", 3)
    cons(SCORES).sum().backward()
    assert cons.logits.grad is not None and cons.logits.grad.abs().sum() > 0


def test_consensus_errors():
    with pytest.raises(ValueError, match="avg, max, weighted"):
        build_consensus("median", 3)
    with pytest.raises(ValueError, match="K=3"):
        build_consensus("weighted", 3)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"\(B, K, C\)"):
        build_consensus("avg", 3)(torch.randn(2, 5))


# ---------------------------------------------------------------------------- gradient flow


@pytest.mark.parametrize("consensus", ["avg", "max", "weighted"])
def test_gradient_reaches_backbone_through_every_snippet(consensus):
    torch.manual_seed(0)
    model = tiny_tsn("flow", num_classes=11, consensus=consensus, dropout=0.0).train()
    per_snippet_grad = {}

    def keep_feature_grad(module, inputs, output):
        # Backbone output is (B*K, D): its gradient, viewed per snippet, must be nonzero for all.
        def store(grad):
            per_snippet_grad["g"] = grad.reshape(B, K, -1)

        output.register_hook(store)

    model.backbone.register_forward_hook(keep_feature_grad)
    x = make_input("flow").requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 4]))
    loss.backward()
    g = per_snippet_grad["g"]
    for b in range(B):
        for k in range(K):
            assert g[b, k].abs().sum() > 0, f"no gradient through video {b} snippet {k}"
            assert x.grad[b, k].abs().sum() > 0, f"no input gradient for video {b} segment {k}"
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_avg_consensus_gives_each_snippet_equal_share_of_score_gradient():
    """d video_score / d snippet_score = 1/K for avg (the paper's gradient formula)."""
    model = tiny_tsn("rgb", dropout=0.0).eval()
    scores = model.forward_snippet_scores(make_input("rgb")).detach().requires_grad_(True)
    model.consensus(scores)[:, 2].sum().backward()
    expected = torch.zeros_like(scores)
    expected[:, :, 2] = 1 / K
    torch.testing.assert_close(scores.grad, expected)


# ---------------------------------------------------------------------------- head / dropout


@pytest.mark.parametrize(
    "modality, p", [("rgb", 0.8), ("rgb_diff", 0.8), ("flow", 0.7), ("warped_flow", 0.7)]
)
def test_default_dropout_per_modality(modality, p):
    assert tiny_tsn(modality).dropout.p == pytest.approx(p)
    assert tiny_tsn(modality, dropout=0.25).dropout.p == pytest.approx(0.25)


def test_dropout_sits_between_pooling_and_fc():
    torch.manual_seed(0)
    model = tiny_tsn("rgb", num_classes=5, dropout=0.5).train()
    seen = {}
    model.dropout.register_forward_hook(lambda m, i, o: seen.update(drop_in=i[0], drop_out=o))
    model.fc.register_forward_hook(lambda m, i, o: seen.update(fc_in=i[0]))
    x = make_input("rgb", b=8)
    model(x)
    # Input of dropout = pooled per-snippet features (B, K, D), i.e. after global pooling ...
    assert seen["drop_in"].shape == (8, K, 32)
    torch.testing.assert_close(seen["drop_in"], model.forward_features(x))
    # ... and fc consumes exactly the dropout output.
    assert seen["fc_in"] is seen["drop_out"]
    kept = seen["drop_out"] != 0
    assert 0 < kept.float().mean() < 1  # some units dropped, some kept (p = 0.5)
    torch.testing.assert_close(seen["drop_out"][kept], seen["drop_in"][kept] / 0.5)
    # Eval mode: no dropout.
    model.eval()
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(seen["fc_in"], seen["drop_in"])


def test_fc_init_statistics():
    torch.manual_seed(0)
    model = tiny_tsn("rgb", num_classes=1000)  # 32k weights: std estimate within ~1 %
    w = model.fc.weight
    assert w.shape == (1000, 32)
    assert w.std().item() == pytest.approx(0.001, rel=0.05)
    assert abs(w.mean().item()) < 5e-5
    assert torch.count_nonzero(model.fc.bias) == 0


# ---------------------------------------------------------------------------- real backbones


def test_bninception_forward_and_size():
    model = TSN(101, 1, "rgb", 1, backbone="bninception").eval()
    assert model.feature_dim == 1024
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    assert 10.0e6 < n_backbone < 11.0e6  # authors' BN-Inception: ~10.3 M before the fc
    assert model.fc.weight.shape == (101, 1024)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 1, 3, 224, 224))
    assert out.shape == (1, 101)
    assert torch.isfinite(out).all()


def test_bninception_rejects_unsupported_size():
    model = TSN(5, 1, "rgb", 1, backbone="bninception").eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 1, 1, 3, 112, 112))


def test_timm_resnet18_flow_forward():
    torch.manual_seed(0)
    model = TSN(5, 2, "flow", 2, backbone="resnet18").eval()
    assert model.feature_dim == 512
    assert model.backbone.conv1.in_channels == 4
    with torch.no_grad():
        out = model(torch.randn(1, 2, 2, 2, 64, 64))
    assert out.shape == (1, 5)
    assert math.isfinite(out.sum().item())


@pytest.mark.parametrize("name, convs, dim", [("tiny", 2, 32), ("small", 4, 128)])
def test_small_cnn_backbones_by_name(name, convs, dim):
    """'tiny' keeps its two conv/BN stages (the tests' Partial BN and first-conv policies);
    'small' has four (31 px seen per feature: the embedded default's motion classes)."""
    from tsn.backbones import build_backbone

    net, features = build_backbone(name, 3)
    assert features == dim and net.num_features == dim
    assert [n for n, _ in net.named_children()] == [f"{k}{i}" for i in range(1, convs + 1) for k in ("conv", "bn")]
    assert net(torch.randn(2, 3, 56, 56)).shape == (2, dim)
    # a pixel 15 px from the centre reaches the centre feature of 'small', not of 'tiny'
    net.eval()  # batch statistics would spread every pixel's gradient everywhere
    x = torch.zeros(1, 3, 64, 64, requires_grad=True)
    h = x
    for i in range(1, convs + 1):
        h = torch.relu(getattr(net, f"bn{i}")(getattr(net, f"conv{i}")(h)))
    h[0, :, h.shape[2] // 2, h.shape[3] // 2].sum().backward()
    reach = (x.grad[0].abs().sum(0) > 0).nonzero()
    span = int(reach[:, 0].max() - reach[:, 0].min()) + 1
    assert span == (31 if name == "small" else 7)
