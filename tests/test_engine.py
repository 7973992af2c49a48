"""Training engine and schedule: loss goes down, exact lr values, clipping, timing, hooks."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tsn.engine import train_one_epoch, train_step
from tsn.model import TSN
from tsn.schedule import build_optimizer, build_scheduler, current_lr, lr_factor, scaled_lr

B, K, HW, N = 4, 3, 16, 5


def tiny(modality="rgb", dropout=0.0, partial_bn=False):
    torch.manual_seed(0)
    return TSN(N, K, modality, 1 if modality == "rgb" else 2, backbone="tiny", dropout=dropout,
               partial_bn=partial_bn)


def batch(seed=0, modality="rgb"):
    g = torch.Generator().manual_seed(seed)
    L = 1 if modality == "rgb" else 2
    return SimpleNamespace(frames=torch.randn(B, K, L, 3, HW, HW, generator=g),
                           label=torch.randint(0, N, (B,), generator=g))


class FakeLoader:
    """A fixed list of batches; ``delay_s`` of sleep in every ``next`` (the data wait)."""

    def __init__(self, batches, delay_s=0.0):
        self.batches, self.delay_s = batches, delay_s

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            if self.delay_s:
                time.sleep(self.delay_s)
            yield b


class Recorder:
    def __init__(self):
        self.steps, self.checkpoints = [], []

    def on_step(self, m):
        self.steps.append(m)

    def checkpoint(self, m):
        self.checkpoints.append(m)


def loss_of(model, b):
    model.train()  # batch statistics: deterministic for a fixed batch
    with torch.no_grad():
        return F.cross_entropy(model(b.frames), b.label).item()


def test_training_decreases_loss_on_a_fixed_batch():
    model, b = tiny(), batch()
    opt = build_optimizer(model, lr=0.05, momentum=0.9, weight_decay=0.0)
    before = loss_of(model, b)
    out = train_one_epoch(model, FakeLoader([b] * 8), opt, None, "cpu", epoch=0)
    after = loss_of(model, b)
    assert after < before - 0.2, (before, after)
    assert out["steps"] == 8 and out["global_step"] == 8 and out["videos"] == 8 * B
    assert out["frames"] == 8 * B * K  # no frame_indices: B x K x L
    assert out["loss"] < before + 1e-6  # mean training loss over the epoch


def test_step_metrics_timing_and_numbering():
    model = tiny()
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=0.0)
    rec = Recorder()
    b = batch()
    b.frame_indices = torch.zeros(B, K * 2, dtype=torch.long)  # a loader's decoded-frame count
    out = train_one_epoch(model, FakeLoader([b] * 3, delay_s=0.05), opt, None, "cpu", epoch=4, hooks=rec,
                          start_step=10)
    assert [m["step"] for m in rec.steps] == [11, 12, 13]  # global, 1-based after the step
    assert {m["epoch"] for m in rec.steps} == {4}
    for m in rec.steps:
        assert set(m) >= {"epoch", "step", "loss", "lr", "videos", "frames", "data_wait_s", "step_s"}
        assert 0.05 <= m["data_wait_s"] < 0.5  # the loader's sleep is measured as data wait
        assert m["step_s"] >= m["data_wait_s"]
        assert m["compute_s"] == pytest.approx(m["step_s"] - m["data_wait_s"])
        assert m["videos"] == B and m["frames"] == B * K * 2
    assert out["data_wait_s"] >= 0.15 and out["global_step"] == 13


def test_mid_epoch_checkpoint_calls_skip_the_last_batch():
    model = tiny()
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=0.0)
    rec = Recorder()
    train_one_epoch(model, FakeLoader([batch()] * 6), opt, None, "cpu", epoch=0, hooks=rec,
                    checkpoint_every_n_steps=2)
    # steps 2 and 4; step 6 is the epoch's last batch (the epoch-end checkpoint covers it)
    assert [c["step"] for c in rec.checkpoints] == [2, 4]
    assert all("train_loss" in c for c in rec.checkpoints)


def test_gradient_clipping_bounds_the_total_norm():
    model, b = tiny(), batch()
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=0.0)
    rec = Recorder()
    max_norm = 1e-3
    train_one_epoch(model, FakeLoader([b]), opt, None, "cpu", epoch=0, clip_grad_norm=max_norm, hooks=rec)
    # the gradients of the last step are still in .grad: after clipping
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert rec.steps[0]["grad_norm"] > max_norm  # it was actually clipped ...
    assert total.item() <= max_norm * (1 + 1e-4)  # ... down to the bound
    # without clipping the same step reports no norm
    loss, norm = train_step(tiny(), b.frames, b.label, build_optimizer(tiny(), lr=0.01, momentum=0.9,
                                                                       weight_decay=0.0))
    assert norm is None and torch.isfinite(loss)


def test_non_finite_loss_stops_training():
    model, b = tiny(), batch()
    b.frames[0, 0, 0, 0, 0, 0] = float("nan")
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=0.0)
    with pytest.raises(FloatingPointError, match="epoch 2, step 1"):
        train_one_epoch(model, FakeLoader([b]), opt, None, "cpu", epoch=2)


# ------------------------------------------------------------------------------- schedule


def test_linear_scaling_rule():
    assert scaled_lr(0.001, 256, 128) == pytest.approx(0.002)
    assert scaled_lr(0.001, 32, 128) == pytest.approx(0.00025)
    assert scaled_lr(0.001, 32, 0) == 0.001  # 0: no scaling
    with pytest.raises(ValueError):
        scaled_lr(0.001, 0, 128)


def test_schedule_values_exact_with_per_group_multipliers():
    """4 steps / epoch, warmup 0.5 epoch (2 iterations), steps at epochs 2 and 3, gamma 0.1."""
    model = tiny("rgb_diff")  # motion net: first conv x5 / x10
    lr = 0.01
    opt = build_optimizer(model, lr=lr, momentum=0.9, weight_decay=5e-4)
    mults = {g["name"]: g["lr_mult"] for g in opt.param_groups}
    assert mults["first_conv_weight"] == 5.0 and mults["first_conv_bias"] == 10.0
    assert mults["normal_bias"] == 2.0 and mults["normal_weight"] == 1.0
    sched = build_scheduler(opt, steps_per_epoch=4, lr_steps=[2, 3], lr_gamma=0.1, warmup_epochs=0.5)
    expected_factor = [0.5, 1, 1, 1, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01]
    seen = []
    for it, f in enumerate(expected_factor):
        seen.append(current_lr(opt))
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(lr * g["lr_mult"] * f, rel=1e-12, abs=0), (it, g["name"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr * f for f in expected_factor], rel=1e-12, abs=0)
    # fractional warmup: ceil(0.25 epoch x 10 steps) = 3 iterations
    assert [lr_factor(i, steps_per_epoch=10, warmup_epochs=0.25) for i in range(4)] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    assert lr_factor(3, steps_per_epoch=30, warmup_epochs=0.1) == 1.0  # 0.1 x 30 is 3 iterations, not 4
    # weight decay per group: none on biases / BN
    decays = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decays["normal_weight"] == pytest.approx(5e-4) and decays["normal_bias"] == 0.0


def test_schedule_inside_training_and_state_round_trip():
    model = tiny()
    opt = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0.0)
    sched = build_scheduler(opt, steps_per_epoch=2, lr_steps=[1], lr_gamma=0.5, warmup_epochs=0)
    rec = Recorder()
    train_one_epoch(model, FakeLoader([batch()] * 2), opt, sched, "cpu", epoch=0, hooks=rec)
    # lr logged after each step's scheduler update: 0.1 for iteration 1, 0.05 from iteration 2 on
    assert [m["lr"] for m in rec.steps] == pytest.approx([0.1, 0.05])
    opt2 = build_optimizer(tiny(), lr=0.1, momentum=0.9, weight_decay=0.0)
    sched2 = build_scheduler(opt2, steps_per_epoch=2, lr_steps=[1], lr_gamma=0.5)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]
