"""`tsn bench-train`: the measurement on a plain Python loader with known costs, then the command
end to end on the tiny packed dataset."""

import json
import time
from dataclasses import dataclass

import pytest
import torch

from cli.main import main
from tools.bench_train import ROWS, format_table, run_bench


@dataclass
class FakeBatch:
    frames: torch.Tensor


class SlowLoader:
    """Epochs of 4 batches of 2 videos, each batch costing ``load_s`` of the caller's time."""

    def __init__(self, load_s: float):
        self.load_s, self.closed = load_s, False

    def __iter__(self):
        for _ in range(4):
            time.sleep(self.load_s)
            yield FakeBatch(torch.zeros(2, 3))

    def close(self):
        self.closed = True


def test_run_bench_separates_data_wait_from_compute():
    made = []

    def make_loader(prefetch_batches):
        made.append(SlowLoader(0.02))
        return made[-1]

    result = run_bench(make_loader, lambda batch: time.sleep(0.01), steps=6, warmup=1, repeats=1,
                       in_memory_batches=2, cores=2.0, log=lambda m: None)
    assert all(loader.closed for loader in made) and len(made) == 2
    assert set(ROWS) <= set(result) and result["videos_per_step"] == 2
    # compute: ~10 ms a step, no loading; fed: ~30 ms a step, ~2/3 of it waiting for data
    assert 40 < result["compute"]["steps_per_s"] < 110
    assert 15 < result["fed_sync"]["steps_per_s"] < 36
    assert 0.5 < result["fed_sync"]["data_wait_fraction"] < 0.8
    assert result["ratios"]["fed_sync_over_compute"] == pytest.approx(
        result["fed_sync"]["steps_per_s"] / result["compute"]["steps_per_s"])
    assert not result["data_wait_target_met"]  # sleeping is not CPU: the fake loader waits anyway
    assert "steps/s" in format_table(result) and "fed_sync" in format_table(result)


def test_run_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        run_bench(lambda p: SlowLoader(0), lambda b: None, steps=0)


TINY = ["augment.input_size=32", "augment.resize_short=48", "model.backbone=tiny", "train.batch_size_per_worker=4",
        "cluster.num_workers=1"]


def test_bench_train_command_reports_json_and_table(packed_jpeg, tmp_path, capsys):
    out = tmp_path / "bench.json"
    sets = [a for kv in (f"data.shards={packed_jpeg}", *TINY) for a in ("--set", kv)]
    threads = torch.get_num_threads()
    try:  # --cpus 0: no pinning of this test process
        rc = main(["bench-train", *sets, "--steps", "3", "--warmup", "1", "--repeats", "1", "--cpus", "0",
                   "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    result = json.loads(out.read_text())
    for row in ROWS:
        assert result[row]["steps_per_s"] > 0 and result[row]["cpu_s_per_video"] > 0
    assert 0 <= result["fed"]["data_wait_fraction"] < 1 and result["videos_per_step"] == 4
    assert result["ratios"]["fed_over_compute"] > 0 and result["cpu_bound_steps_per_s"] > 0
    printed = capsys.readouterr().out
    assert "fed_sync" in printed and "CPU per step" in printed


def test_bench_train_rejects_negative_cpus(packed_jpeg, capsys):
    assert main(["bench-train", "--set", f"data.shards={packed_jpeg}", "--cpus", "-1"]) == 2
    assert "--cpus" in capsys.readouterr().err
