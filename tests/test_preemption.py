"""Stopping on request (`app.preemption`) without Ray: the loop checkpoints at the step the
request arrived, ends with TrainingStopped, and the resumed run redoes nothing; every rank of a
DDP group stops at the same step though one rank was asked; SIGTERM to `tsn train --local`
exits 143 after the checkpoint. The Ray job's SIGTERM and notice paths: tests/test_elastic.py."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest
import torch

from app import worker
from app.config import load_config
from app.hooks import LocalHooks
from app.preemption import EXIT_CODE, STOP, install_sigterm_handler
from procs import free_port, start_tsn
from tsn.checkpoint import load_checkpoint
from tsn.engine import TrainingStopped

# 12 train videos, 2 a batch: 6 steps an epoch on 1 rank, 3 on 2
SETS = ["augment.input_size=32", "augment.resize_short=48", "model.backbone=tiny", "model.test_segments=3",
        "train.batch_size_per_worker=2", "train.test_batch_size_per_worker=3", "train.log_every_n_steps=0",
        "optim.lr=0.01", "model.dropout=0.5", "train.epochs=2"]


def _cfg(packed, *extra):
    return load_config(None, [f"data.shards={packed}", *SETS, *extra])


class AskAtStep(LocalHooks):
    """`LocalHooks` whose process is asked to stop once step ``step`` is done (as a SIGTERM
    arriving during that step would), on rank ``rank`` only."""

    def __init__(self, run_dir, cfg, step, rank=0):
        super().__init__(run_dir, cfg)
        self.ask_step, self.ask_rank = step, rank

    def on_step(self, metrics):
        super().on_step(metrics)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if metrics["step"] == self.ask_step and rank == self.ask_rank:
            STOP.request("test request")


def _steps(run, rank=0):
    return [json.loads(line) for line in (run / "steps" / f"rank{rank}.jsonl").read_text().splitlines()]


def test_a_stop_checkpoints_at_its_step_and_the_resumed_run_equals_an_uninterrupted_one(packed_jpeg, tmp_path):
    cfg = _cfg(packed_jpeg)
    worker.train(cfg, tmp_path / "a")
    with pytest.raises(TrainingStopped) as stopped:
        worker.train(cfg, tmp_path / "b", hooks=AskAtStep(tmp_path / "b", cfg, step=8))
    assert (stopped.value.epoch, stopped.value.step, stopped.value.reason) == (1, 8, "test request (rank 0)")
    index = json.loads((tmp_path / "b" / "checkpoints.json").read_text())
    assert index["checkpoints"][-1]["step"] == 8 and index["checkpoints"][-1]["loader_position"] == [1, 2]
    event = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()][-1]
    assert event["event"] == "stopped" and event["step"] == 8 and event["ranks"] == [0] and event["stop_s"] >= 0
    STOP.clear()  # a new process
    resumed = worker.train(cfg, tmp_path / "b")
    assert resumed["steps"] == 12
    assert [r["step"] for r in _steps(tmp_path / "b")] == list(range(1, 13))  # no step done twice
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "ckpt-e1-s12.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "ckpt-e1-s12.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_a_stop_in_an_epochs_last_step_is_taken_at_its_end_checkpoint(packed_jpeg, tmp_path):
    cfg = _cfg(packed_jpeg)
    with pytest.raises(TrainingStopped) as stopped:
        worker.train(cfg, tmp_path / "r", hooks=AskAtStep(tmp_path / "r", cfg, step=6))
    assert (stopped.value.epoch, stopped.value.step) == (0, 6)
    index = json.loads((tmp_path / "r" / "checkpoints.json").read_text())
    assert [(e["step"], e["loader_position"]) for e in index["checkpoints"]] == [(6, [1, 0])]
    assert "val_top1" in index["checkpoints"][-1]["metrics"]  # the epoch end's, validated


def _ddp_stop(rank, world_size, port, packed, run_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        cfg = _cfg(packed)
        try:  # 3 steps an epoch on 2 ranks; only rank 1 is asked, after step 4
            worker.train(cfg, run_dir, hooks=AskAtStep(run_dir, cfg, step=4, rank=1))
            raise AssertionError("rank %d did not stop" % rank)
        except TrainingStopped as e:
            assert e.step == 4 and e.reason == "test request (rank 1)", e
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_stops_at_the_step_one_rank_was_asked_and_no_sample_is_lost(packed_jpeg, tmp_path):
    port = free_port()
    run = tmp_path / "run"
    run.mkdir()
    torch.multiprocessing.spawn(_ddp_stop, args=(2, port, str(packed_jpeg), str(run)), nprocs=2, join=True)
    index = json.loads((run / "checkpoints.json").read_text())
    assert index["checkpoints"][-1]["step"] == 4 and index["checkpoints"][-1]["loader_position"] == [1, 1]
    results = worker.train(_cfg(packed_jpeg), run)  # resumed on 1 worker: the rest of epoch 1
    records = [r for rank in (0, 1) for r in _steps(run, rank)]
    assert max(r["step"] for r in records if r["world_size"] == 2) == 4  # nothing after the stop
    seen = Counter(i for r in records if r["epoch"] == 1 for i in r["sample_index"])
    assert seen == Counter(range(12)), seen  # every sample of the interrupted epoch exactly once
    assert results["steps"] == 3 + 1 + 4


def test_sigterm_to_a_local_run_checkpoints_and_exits_143(packed_jpeg, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--local", "--run-dir", str(run)]
    for kv in (f"data.shards={packed_jpeg}", *SETS, "train.epochs=20"):
        args += ["--set", kv]
    proc = start_tsn(args, tmp_path / "log")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        steps = run / "steps" / "rank0.jsonl"
        if steps.is_file() and len(steps.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_CODE, (tmp_path / "log").read_text()[-3000:]
    log = (tmp_path / "log").read_text()
    last = _steps(run)[-1]["step"]
    index = json.loads((run / "checkpoints.json").read_text())
    assert index["checkpoints"][-1]["step"] == last  # the step it was in when asked: nothing to redo
    assert f"the same command resumes at step {last}" in log and "SIGTERM (rank 0)" in log
    assert load_checkpoint(run / "checkpoints" / index["checkpoints"][-1]["file"])["step"] == last


def test_the_handler_needs_the_main_thread_and_a_second_sigterm_ends_the_process():
    import threading

    result = []
    t = threading.Thread(target=lambda: result.append(install_sigterm_handler()))
    t.start()
    t.join()
    assert result == [False]
    previous = signal.getsignal(signal.SIGTERM)
    ended = []
    signal.signal(signal.SIGTERM, lambda *_: ended.append(True))
    try:
        assert install_sigterm_handler()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert STOP.reason == "SIGTERM" and ended == []
        os.kill(os.getpid(), signal.SIGTERM)  # the second: the handler before
        time.sleep(0.05)
        assert ended == [True]
    finally:
        signal.signal(signal.SIGTERM, previous)
