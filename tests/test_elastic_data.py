"""Exact data accounting across resizes, in the training loop: the padding rule of the loss,
the step records, the lr schedule after a resize, resume checks, and a 2-worker DDP run
resumed on 1 worker whose step logs hold every training sample exactly once per epoch."""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from app import worker
from app.config import load_config
from crash_hooks import Crash, CrashAtStep
from app.resume import check_resumable, loader_resume, schedule_iteration
from tsn.engine import train_one_epoch, train_step
from tsn.schedule import build_scheduler, lr_factor

B, FEATURES, CLASSES = 4, 6, 3


def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, CLASSES))  # no BatchNorm: padding cannot leak


def padded_batch(real, fill: float, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(B, FEATURES, generator=g)
    label = torch.randint(0, CLASSES, (B,), generator=g)
    real = torch.tensor(real)
    frames[~real], label[~real] = fill, 0  # what the padding holds must not matter
    return SimpleNamespace(frames=frames, label=label, real=real, sample_index=torch.arange(10, 10 + B))


def test_padded_entries_carry_no_weight_and_real_ones_their_full_step_weight():
    real = [True, True, False, False]
    results = []
    for fill in (0.0, 5.0):
        model = linear()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        b = padded_batch(real, fill)
        loss, _ = train_step(model, b.frames, b.label, opt, real=b.real)
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    # reported loss: the mean over the real entries; the gradient: sum over real / B, i.e.
    # the same step as a full batch whose other entries contribute nothing
    model, ref = linear(), linear()
    b = padded_batch(real, 0.0)
    expected = nn.functional.cross_entropy(ref(b.frames[:2]), b.label[:2])
    assert results[0][0].item() == pytest.approx(expected.item(), rel=1e-6)
    (expected * 2 / B).backward()
    with torch.no_grad():
        for p, r in zip(ref.parameters(), results[0][1]):
            torch.testing.assert_close(p - 0.1 * p.grad, r)
    # all real: the plain mean cross-entropy, bit for bit as before
    model_a, model_b = linear(), linear()
    full = padded_batch([True] * B, 0.0)
    la, _ = train_step(model_a, full.frames, full.label, torch.optim.SGD(model_a.parameters(), lr=0.1), real=full.real)
    lb, _ = train_step(model_b, full.frames, full.label, torch.optim.SGD(model_b.parameters(), lr=0.1))
    assert torch.equal(la, lb)


def test_step_records_list_real_samples_and_a_fully_padded_step_is_left_out_of_the_mean():
    model = linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [padded_batch([True] * B, 0.0, 1), padded_batch([True, False, False, False], 0.0, 2),
               padded_batch([False] * B, 0.0, 3)]
    steps = []
    hooks = SimpleNamespace(on_step=steps.append, checkpoint=lambda m: None)
    before = [p.detach().clone() for p in model.parameters()]
    out = train_one_epoch(model, batches, opt, None, "cpu", epoch=0, hooks=hooks)
    assert [s["videos"] for s in steps] == [4, 1, 0] and out["videos"] == 5
    assert [s["sample_index"] for s in steps] == [[10, 11, 12, 13], [10], []]
    assert all(s["world_size"] == 1 and s["global_batch_size"] == B for s in steps)
    assert steps[2]["loss"] == 0.0
    assert out["loss"] == pytest.approx((steps[0]["loss"] + steps[1]["loss"]) / 2)
    assert out["steps"] == 3 and not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_scheduler_restart_continues_in_epochs_with_a_new_base_lr():
    model = linear()
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 0.1, "lr_mult": 1.0}], lr=0.1)
    sched = build_scheduler(opt, steps_per_epoch=6, lr_steps=[2], lr_gamma=0.1, warmup_epochs=1.0)
    for _ in range(4):
        opt.step()
        sched.step()
    sched.restart(13, lr=0.05)  # resized: epoch 2 + 1/6 at the new world size, half the global batch
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * lr_factor(13, steps_per_epoch=6, lr_steps=[2],
                                                                         warmup_epochs=1.0))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)  # past warmup, after the epoch-2 milestone
    opt.step()
    sched.step()
    assert sched.last_epoch == 14 and opt.param_groups[0]["lr"] == pytest.approx(0.005)
    assert sched.state_dict()["base_lrs"] == [0.05]
    with pytest.raises(ValueError, match="iteration"):
        sched.restart(-1)


def test_schedule_iteration_of_a_resized_resume():
    assert schedule_iteration(6, 2, None, 12) == 12  # an epoch start
    assert schedule_iteration(6, 1, [(4, 12)], 12) == 6 + 2  # a third of epoch 1 used
    assert schedule_iteration(4, 0, [(0, 1), (5, 6)], 12) == 3  # 10/12 of 4 steps, rounded


def _cfg(packed, *extra):
    return load_config(None, [f"data.shards={packed}", "augment.input_size=32", "augment.resize_short=48",
                              "model.backbone=tiny", "model.test_segments=3", "train.batch_size_per_worker=2",
                              "train.test_batch_size_per_worker=3", "train.log_every_n_steps=0", "optim.lr=0.01",
                              *extra])


def test_resume_checks(packed_jpeg):
    cfg = _cfg(packed_jpeg)
    ckpt = {"meta": {"world_size": 2, "batch_size_per_worker": 2}, "config": {}, "loader_position": [1, 3],
            "loader_state": {"epoch": 1, "batch": 3, "remaining": [[4, 9], [10, 12]], "num_samples": 12}}
    check_resumable(ckpt, cfg, 3, "run")  # another world size: fine
    assert loader_resume(ckpt, "run") == (1, 3, [(4, 9), (10, 12)])
    with pytest.raises(ValueError, match="batch_size_per_worker=4; resuming with 2"):
        check_resumable({**ckpt, "meta": {"world_size": 2, "batch_size_per_worker": 4}}, cfg, 2, "run")
    old = {"meta": {}, "config": {}, "loader_position": [1, 2]}
    with pytest.raises(ValueError, match=r"run: mid-epoch checkpoint \(loader_position \[1, 2\]\) without"):
        check_resumable(old, cfg, 2, "run")
    assert loader_resume({**old, "loader_position": [2, 0]}) == (2, 0, None)  # an old epoch end: fine
    assert loader_resume(None) == (0, 0, None)
    with pytest.raises(ValueError, match="disagrees"):
        loader_resume({**ckpt, "loader_position": [1, 2]})


# --------------------------------------------------------------------- DDP, then resized




def _ddp_until_crash(rank, world_size, port, packed, run_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        cfg = _cfg(packed, "train.epochs=2", "checkpoint.every_n_steps=1")
        try:  # 12 videos / 2 ranks / 2 a batch: 3 steps an epoch; crash at step 5 (epoch 1)
            worker.train(cfg, run_dir, hooks=CrashAtStep(run_dir, cfg, step=5))
        except Crash:
            pass
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_workers_resumed_on_one_use_every_sample_once_per_epoch(packed_jpeg, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    run.mkdir()
    torch.multiprocessing.spawn(_ddp_until_crash, args=(2, port, str(packed_jpeg), str(run)), nprocs=2, join=True)
    index = json.loads((run / "checkpoints.json").read_text())
    assert index["checkpoints"][-1]["loader_position"] == [1, 1] and index["checkpoints"][-1]["step"] == 4
    results = worker.train(_cfg(packed_jpeg, "train.epochs=2", "checkpoint.every_n_steps=1"), run)  # 1 worker
    # epoch 1: one step on 2 ranks (4 samples), the other 8 on 1 rank in 4 steps
    assert results["steps"] == 3 + 1 + 4 and results["world_size"] == 1
    records = [json.loads(line) for r in (0, 1) for line in (run / "steps" / f"rank{r}.jsonl").read_text().splitlines()]
    # what counted: the 2-worker steps up to the checkpoint, then every 1-worker step
    kept = [r for r in records if (r["world_size"] == 2 and r["step"] <= 4) or r["world_size"] == 1]
    for epoch in (0, 1):
        seen = Counter(i for r in kept if r["epoch"] == epoch for i in r["sample_index"])
        assert seen == Counter(range(12)), (epoch, seen)
    assert {(r["world_size"], r["global_batch_size"]) for r in kept} == {(2, 4), (1, 2)}
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [(h["epoch"], h["world_size"], h["global_batch_size"]) for h in history] == [(0, 2, 4), (1, 1, 2)]
