"""Per-stage timing of the input pipeline (`dataloading.pipeline.stage_times`): the sums, the per-batch
view, a real TSNLoader's stages (every stage of the CPU path counted, none when off, the same
batches either way) and `tsn stream`'s stage line."""

from __future__ import annotations

import threading

import pytest
import torch

from dataloading.pipeline.loader import TSNLoader
from dataloading.pipeline.stage_times import STAGES, StageTimes, format_stages, per_batch, slowest
from dataloading.planning.augment import CropSpec
from dataloading.planning.spec import PipelineSpec


def test_sums_per_batch_and_the_slowest_stage():
    t = StageTimes()
    t.add("read", 0.5)
    t.add("read", 0.25)
    with t.timed("decode"):
        pass
    snap = t.snapshot()
    assert set(snap) == set(STAGES) and snap["read"] == 0.75 and snap["decode"] >= 0
    assert per_batch({"read": 0.25}, {"read": 0.75, "decode": 2.0}, 2) == \
        {"read": 0.25, "plan": 0.0, "read_wait": 0.0, "decode": 1.0, "finish": 0.0}
    assert per_batch({}, {"read": 1.0}, 0)["read"] == 0.0
    assert slowest({"read": 0.1, "decode": 0.3, "finish": 0.2}) == "decode" and slowest({}) is None
    assert format_stages({"read": 0.0012, "decode": 0.003}) == \
        "read 1.2 plan 0.0 read_wait 0.0 decode 3.0 finish 0.0 (slowest: decode)"


def test_off_records_nothing_and_sums_are_thread_safe():
    off = StageTimes(enabled=False)
    off.add("read", 1.0)
    with off.timed("decode"):
        pass
    assert set(off.snapshot().values()) == {0.0}
    on = StageTimes()
    threads = [threading.Thread(target=lambda: [on.add("read", 0.001) for _ in range(1000)]) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert on.snapshot()["read"] == pytest.approx(4.0)


def _spec():
    return PipelineSpec(mode="train", num_segments=3, snippet_length=1, modality="rgb", batch_size=4,
                        crop=CropSpec(input_size=32, resize_short=48), num_threads=1, seed=3)


def test_a_loader_times_every_stage_of_its_path_and_the_batches_do_not_change(packed_jpeg):
    timed = TSNLoader(packed_jpeg, "train", _spec(), read_threads=2)
    untimed = TSNLoader(packed_jpeg, "train", _spec(), read_threads=2, stage_timing=False)
    batches = 0
    for a, b in zip(timed, untimed):
        assert torch.equal(a.frames, b.frames) and torch.equal(a.sample_index, b.sample_index)
        batches += 1
    assert batches == len(timed) == 3
    stages = timed.stage_times.snapshot()
    assert all(stages[s] > 0 for s in ("read", "plan", "decode", "finish")), stages  # the CPU path has them all
    assert stages["read_wait"] >= 0
    assert set(untimed.stage_times.snapshot().values()) == {0.0}
    timed.close()
    untimed.close()


def test_stream_prints_the_stages_per_batch(packed_jpeg, capsys):
    from app.config import load_config
    from app.data import stream

    cfg = load_config(None, [f"data.shards={packed_jpeg}", "augment.input_size=32", "augment.resize_short=48"])
    stats = stream(cfg, 1, progress=False)
    out = capsys.readouterr().out
    assert "input stages, ms per batch: read " in out and "(slowest: " in out
    assert set(stats["epochs"][0]["stages_s_per_batch"]) == set(STAGES)
    off = stream(load_config(None, [f"data.shards={packed_jpeg}", "augment.input_size=32", "augment.resize_short=48",
                                    "loader.stage_timing=false"]), 1, progress=False)
    assert "stages_s_per_batch" not in off["epochs"][0] and "input stages" not in capsys.readouterr().out
