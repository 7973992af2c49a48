"""Checkpoints: exact resume, weights_only loading, atomic writes, RNG, cross-modality seeding,
and the local run directory's keep / best policy."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from app.config import config_to_dict, load_config
from app.evaluate import config_of_checkpoint
from app.run_store import write_checkpoint
from tsn import checkpoint as ckpt
from tsn.engine import train_step
from tsn.model import TSN
from tsn.schedule import build_optimizer, build_scheduler

B, K, HW, N = 4, 3, 16, 5


def fresh(seed: int):
    """Model (dropout + partial BN on: RNG and frozen layers matter), optimizer, scheduler."""
    torch.manual_seed(seed)
    model = TSN(N, K, "rgb", 1, backbone="tiny", dropout=0.5, partial_bn=True)
    opt = build_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = build_scheduler(opt, steps_per_epoch=2, lr_steps=[1], lr_gamma=0.5, warmup_epochs=0.5)
    return model, opt, sched


BATCHES = [(torch.randn(B, K, 1, 3, HW, HW, generator=torch.Generator().manual_seed(i)),
            torch.randint(0, N, (B,), generator=torch.Generator().manual_seed(100 + i))) for i in range(4)]


def step(model, opt, sched, i):
    model.train()
    loss, _ = train_step(model, *BATCHES[i], opt, clip_grad_norm=40.0)
    sched.step()
    return loss


def test_resume_gives_the_identical_next_loss(tmp_path):
    model, opt, sched = fresh(0)
    torch.manual_seed(1234)  # the dropout stream
    uninterrupted = [step(model, opt, sched, i) for i in range(4)]

    model, opt, sched = fresh(0)
    torch.manual_seed(1234)
    for i in range(2):
        step(model, opt, sched, i)
    path = write_checkpoint(tmp_path / "c.pt", ckpt.checkpoint_state(
        model=model, optimizer=opt, scheduler=sched, scaler=None, epoch=1, step=2, loader_position=(1, 0),
        config=config_to_dict(load_config(None)), metrics={"train_loss": 1.0}))
    del model, opt, sched
    torch.manual_seed(999)  # a different process state: everything must come from the file
    random.seed(5), np.random.seed(5)

    state = ckpt.load_checkpoint(path)
    model, opt, sched = fresh(7)  # other initial weights, too
    info = ckpt.restore_training(state, model, opt, sched, None)
    assert info == {"epoch": 1, "step": 2, "loader_position": (1, 0), "metrics": {"train_loss": 1.0}}
    resumed = [step(model, opt, sched, i) for i in (2, 3)]
    assert torch.equal(resumed[0], uninterrupted[2]), (resumed[0], uninterrupted[2])
    assert torch.equal(resumed[1], uninterrupted[3])


def test_checkpoint_loads_weights_only_and_holds_plain_data(tmp_path):
    model, opt, sched = fresh(0)
    step(model, opt, sched, 0)
    path = write_checkpoint(tmp_path / "c.pt", ckpt.checkpoint_state(
        model=model, optimizer=opt, scheduler=sched, epoch=0, step=1, loader_position=(0, 1),
        config=config_to_dict(load_config(None))))
    state = torch.load(path, weights_only=True)  # raises if anything but plain data was pickled
    assert state["format_version"] == ckpt.FORMAT_VERSION
    assert not any(k.startswith("module.") for k in state["model"])
    assert state["loader_position"] == [0, 1] and state["scheduler"]["last_epoch"] == 1
    assert load_config(None) == config_of_checkpoint(state)
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


def test_write_is_atomic(tmp_path):
    path = tmp_path / "c.pt"
    write_checkpoint(path, {"model": {"w": torch.ones(2)}, "format_version": 1})
    with pytest.raises(Exception):
        write_checkpoint(path, {"model": {"w": torch.zeros(2)}, "bad": lambda: 0})  # unpicklable
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], torch.ones(2))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        ckpt.load_checkpoint(tmp_path / "bad.pt")
    torch.save({"x": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a tsn checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pt")


def test_rgb_checkpoint_seeds_an_rgb_diff_model(tmp_path):
    model, opt, sched = fresh(0)
    step(model, opt, sched, 0)
    path = write_checkpoint(tmp_path / "rgb.pt", ckpt.checkpoint_state(model=model, optimizer=opt, epoch=0, step=1,
                                                                       loader_position=(0, 1), config={}))
    torch.manual_seed(3)
    diff = TSN(N, K, "rgb_diff", 5, backbone="tiny", dropout=0.5, partial_bn=True)
    left = ckpt.seed_from_rgb_checkpoint(diff, path)
    assert left == []  # same classes: fc copied too
    rgb_w = model.backbone.conv1.weight.detach()
    expected = rgb_w.mean(dim=1, keepdim=True).expand(-1, 15, -1, -1)
    torch.testing.assert_close(diff.backbone.conv1.weight.detach(), expected, rtol=0, atol=0)
    for name in ("backbone.conv2.weight", "backbone.bn1.running_mean", "backbone.bn2.weight", "fc.weight"):
        assert torch.equal(diff.state_dict()[name], model.state_dict()[name]), name
    # other class count: fc left at init, the backbone still seeded
    other = TSN(N + 2, K, "rgb_diff", 5, backbone="tiny")
    assert set(ckpt.seed_from_rgb_checkpoint(other, path)) == {"fc.weight", "fc.bias"}
    with pytest.raises(FileNotFoundError, match="init_from"):
        ckpt.seed_from_rgb_checkpoint(other, tmp_path / "missing.pt")


def test_init_from_config_seeds_a_fresh_model_only(tmp_path):
    from app.build import build_model

    model, opt, _ = fresh(0)
    path = write_checkpoint(tmp_path / "rgb.pt", ckpt.checkpoint_state(model=model, optimizer=opt, epoch=0, step=0,
                                                                       loader_position=(0, 0), config={}))
    cfg = load_config(None, ["model.backbone=tiny", "model.modality=rgb_diff", "model.snippet_length=5",
                             f"model.init_from={path}"])
    seeded = build_model(cfg, N, fresh=True)
    assert torch.equal(seeded.backbone.conv2.weight, model.backbone.conv2.weight)
    resumed = build_model(cfg, N, fresh=False)  # a resumed run keeps its own weights
    assert not torch.equal(resumed.backbone.conv2.weight, model.backbone.conv2.weight)


# ------------------------------------------------------------------ local run directory


def test_local_hooks_keep_last_and_best(tmp_path):
    from app.hooks import LocalHooks

    cfg = load_config(None, ["checkpoint.keep_last=2"])
    hooks = LocalHooks(tmp_path, cfg)
    assert hooks.load_latest() is None and hooks.best_checkpoint() is None
    model, opt, _ = fresh(0)
    top1 = {1: 0.5, 2: 0.9, 3: None, 4: 0.7, 5: 0.9}  # step 3 is mid-epoch (no val metric)

    for s, acc in top1.items():
        def state_fn(s=s):
            return ckpt.checkpoint_state(model=model, optimizer=opt, epoch=s // 2, step=s,
                                         loader_position=(s // 2, s % 2), config={})
        metrics = {"epoch": s // 2, "step": s, **({"val_top1": acc} if acc is not None else {})}
        hooks.save_checkpoint(state_fn, metrics)

    index = json.loads((tmp_path / "checkpoints.json").read_text())
    # last two (steps 4, 5) + the best by val top1 (0.9: steps 2 and 5 tie -> the later, 5)
    assert [e["step"] for e in index["checkpoints"]] == [4, 5]
    assert index["best"] == "ckpt-e2-s5.pt" and index["latest"] == "ckpt-e2-s5.pt"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-e2-s4.pt", "ckpt-e2-s5.pt"]
    assert hooks.load_latest()["step"] == 5 and hooks.best_checkpoint()["step"] == 5

    # a better-than-everything older best survives the keep_last window
    hooks2 = LocalHooks(tmp_path / "b", cfg)
    for s, acc in {1: 0.95, 2: 0.1, 3: 0.2, 4: 0.3}.items():
        hooks2.save_checkpoint(lambda s=s: ckpt.checkpoint_state(model=model, optimizer=opt, epoch=s, step=s,
                                                                loader_position=(s + 1, 0), config={}),
                               {"step": s, "val_top1": acc})
    index = json.loads((tmp_path / "b" / "checkpoints.json").read_text())
    assert [e["step"] for e in index["checkpoints"]] == [1, 3, 4] and index["best"] == "ckpt-e1-s1.pt"
    assert hooks2.best_checkpoint()["step"] == 1
    # a damaged newest file: resume falls back to the previous one
    (tmp_path / "b" / "checkpoints" / "ckpt-e4-s4.pt").write_bytes(b"truncated")
    assert hooks2.load_latest()["step"] == 3
