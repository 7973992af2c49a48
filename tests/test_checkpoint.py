"""Checkpoints: exact resume, weights_only loading, atomic writes, RNG, cross-modality seeding,
and the local run directory's keep / best policy."""

from __future__ import annotations

import json
import random
from pathlib import Path

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

ROOT = Path(__file__).resolve().parent.parent

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
    hooks.writer.wait()  # written in the background (app.checkpoint_writer)

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
    hooks2.writer.wait()
    index = json.loads((tmp_path / "b" / "checkpoints.json").read_text())
    assert [e["step"] for e in index["checkpoints"]] == [1, 3, 4] and index["best"] == "ckpt-e1-s1.pt"
    assert hooks2.best_checkpoint()["step"] == 1
    # a damaged newest file: resume falls back to the previous one
    (tmp_path / "b" / "checkpoints" / "ckpt-e4-s4.pt").write_bytes(b"truncated")
    assert hooks2.load_latest()["step"] == 3


# ------------------------------------------------------------------ checkpoints in the background (issue 22)


def test_host_copy_shares_no_memory_with_the_live_state():
    model, opt, _ = fresh(0)
    train_step(model, *BATCHES[0], opt)  # momentum buffers exist
    state = ckpt.checkpoint_state(model=model, optimizer=opt, epoch=0, step=1, loader_position=(0, 1), config={})
    copy = ckpt.host_copy(state)
    before = {k: v.clone() for k, v in copy["model"].items()}
    momentum = [v["momentum_buffer"].clone() for v in copy["optimizer"]["state"].values()]
    # state_dict() tensors ARE the parameters: the plain state changes with the next step
    assert any(state["model"][k].data_ptr() == p.data_ptr() for k, p in model.state_dict().items())
    train_step(model, *BATCHES[1], opt)
    assert all(torch.equal(copy["model"][k], before[k]) for k in before)
    assert not all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert all(torch.equal(v["momentum_buffer"], m) for v, m in zip(copy["optimizer"]["state"].values(), momentum))
    assert copy["epoch"] == 0 and copy["loader_position"] == [0, 1] and copy["rng"]["torch"].dtype == torch.uint8


def test_writer_keeps_one_job_in_flight_and_reports_its_error():
    import threading
    import time

    from app.checkpoint_writer import CheckpointWriter

    writer, release, started, order = CheckpointWriter(), threading.Event(), threading.Event(), []

    def slow():
        started.set()
        release.wait(10)
        order.append("slow")

    assert writer.submit(slow) == 0.0
    started.wait(5)
    assert writer.busy
    threading.Timer(0.3, release.set).start()
    waited = writer.submit(lambda: order.append("next"))  # back-pressure: blocks until slow() is done
    assert waited >= 0.25 and order[0] == "slow"
    writer.wait()
    assert order == ["slow", "next"] and not writer.busy

    def broken():
        raise OSError(28, "no space left on device")

    writer.submit(broken)
    time.sleep(0.05)
    with pytest.raises(OSError, match="no space left"):  # at the next checkpoint, not lost
        writer.submit(lambda: order.append("never"))
    writer.close()
    assert "never" not in order


def test_local_checkpoints_are_written_in_the_background_from_the_state_at_save_time(tmp_path, monkeypatch):
    """The loop goes on while the write is in flight, the file holds the state of the moment
    save_checkpoint was called, and the index lists it only once written."""
    import threading

    import app.run_store as run_store
    from app.hooks import LocalHooks

    gate, entered = threading.Event(), threading.Event()
    real_write = run_store.write_checkpoint

    def gated_write(path, state):
        entered.set()
        gate.wait(10)
        return real_write(path, state)

    monkeypatch.setattr(run_store, "write_checkpoint", gated_write)
    cfg = load_config(None, [])
    hooks = LocalHooks(tmp_path, cfg)
    model, opt, _ = fresh(0)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    hooks.save_checkpoint(lambda: ckpt.checkpoint_state(model=model, optimizer=opt, epoch=0, step=1,
                                                        loader_position=(1, 0), config={}), {"step": 1, "val_top1": 0.5})
    entered.wait(5)
    train_step(model, *BATCHES[0], opt)  # training goes on meanwhile
    assert not (tmp_path / "checkpoints.json").exists()  # not listed before it is written
    gate.set()
    best = hooks.best_checkpoint()  # waits for the write in flight
    assert best["step"] == 1 and all(torch.equal(best["model"][k], saved[k]) for k in saved)
    assert json.loads((tmp_path / "checkpoints.json").read_text())["latest"] == "ckpt-e0-s1.pt"
    hooks.close()


def test_a_process_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    """SIGKILL while the background writer is inside torch.save: the index still names the
    previous checkpoint, no torn file carries a checkpoint's name, and a resume takes step 1."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path[:0] = {[str(p) for p in (ROOT, ROOT / "tests")]!r}
        from app.config import load_config
        from app.hooks import LocalHooks
        from test_checkpoint import fresh
        from tsn import checkpoint as ckpt
        hooks = LocalHooks({str(tmp_path)!r}, load_config(None, []))
        model, opt, _ = fresh(0)
        def state(step):
            return lambda: ckpt.checkpoint_state(model=model, optimizer=opt, epoch=step, step=step,
                                                 loader_position=(step + 1, 0), config={{}})
        hooks.save_checkpoint(state(1), {{"step": 1, "val_top1": 0.5}})
        hooks.writer.wait()
        real_save = torch.save
        def stuck_save(obj, f, *a, **k):  # half a file written, then the process dies
            f.write(b"PK" + bytes(4096)); f.flush()
            print("writing", flush=True); time.sleep(600)
        torch.save = stuck_save
        hooks.save_checkpoint(state(2), {{"step": 2, "val_top1": 0.9}})
        print("training goes on", flush=True); time.sleep(600)
    """)
    err = tmp_path / "child.err"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err.open("w"), text=True)
    out = ""  # two threads print: their lines may interleave ("training goes onwriting")
    try:
        for line in proc.stdout:
            out += line
            if "writing" in out and "training goes on" in out:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # save returned while the write was still in flight
    assert "writing" in out and "training goes on" in out, (out, err.read_text()[-3000:])
    from app.hooks import LocalHooks

    index = json.loads((tmp_path / "checkpoints.json").read_text())
    assert [e["step"] for e in index["checkpoints"]] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["ckpt-e1-s1.pt"]
    assert LocalHooks(tmp_path, load_config(None, [])).load_latest()["step"] == 1
