"""`tsn tune` (cluster/tune.py): the search space file checked through the config loader before
Ray starts, the trial configs, the summary and the best config, ASHA's last-epoch rule, and one
search end to end on a local Ray cluster (2 trials of the embedded default, shrunk)."""

from __future__ import annotations

import csv
import math
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from procs import start_tsn, wait_tsn

from app.config import Config, ConfigError, load_config
from app.run_store import RunStore
from cli import main as cli
from cluster import tune_summary
from cluster.tune import (Distribution, Fixed, Searched, load_space, local_trials, parse_space, trial_config,
                          trials_that_fit)
from cluster.tune_summary import TrialRecord

BASE = Config()
CHOICE, UNIFORM, LOGUNIFORM, RANDINT = (Distribution.CHOICE, Distribution.UNIFORM, Distribution.LOGUNIFORM,
                                        Distribution.RANDINT)


# --- the space file ------------------------------------------------------------------------

@pytest.mark.parametrize("data,expected", [
    ({"optim.lr": {"loguniform": [0.001, 0.1]}}, {"optim.lr": Searched(LOGUNIFORM, (0.001, 0.1))}),
    ({"model.dropout": {"uniform": [0.3, 0.8]}}, {"model.dropout": Searched(UNIFORM, (0.3, 0.8))}),
    ({"optim.momentum": {"uniform": [0, 0.5]}}, {"optim.momentum": Searched(UNIFORM, (0.0, 0.5))}),  # ints widen
    ({"model.num_segments": {"choice": [2, 3]}}, {"model.num_segments": Searched(CHOICE, (2, 3))}),
    ({"model.consensus": {"choice": ["avg", "max"]}}, {"model.consensus": Searched(CHOICE, ("avg", "max"))}),
    ({"model.dropout": {"choice": [None, 0.5]}}, {"model.dropout": Searched(CHOICE, (None, 0.5))}),
    ({"model.num_segments": {"randint": [2, 6]}}, {"model.num_segments": Searched(RANDINT, (2, 6))}),
    ({"train.batch_size_per_worker": 4}, {"train.batch_size_per_worker": Fixed(4)}),
    ({"optim.lr_steps": [10, 20]}, {"optim.lr_steps": Fixed([10, 20])}),
    # a fixed value makes a searched one valid: rgb needs snippets of one frame
    ({"model.modality": {"choice": ["rgb"]}, "model.snippet_length": 1},
     {"model.modality": Searched(CHOICE, ("rgb",)), "model.snippet_length": Fixed(1)}),
    ({"optim.lr": {"loguniform": [0.001, 0.1]}, "model.dropout": {"uniform": [0.3, 0.8]},
      "model.num_segments": {"choice": [2, 3]}},
     {"optim.lr": Searched(LOGUNIFORM, (0.001, 0.1)), "model.dropout": Searched(UNIFORM, (0.3, 0.8)),
      "model.num_segments": Searched(CHOICE, (2, 3))}),
])
def test_a_space_parses_to_exactly_these_entries(data, expected):
    space = parse_space(data, BASE, source="s.yaml")
    assert space == expected and list(space) == list(expected)  # the file's order: the summary's columns


KNOWN = "; known keys here: "  # app.config lists them after this


@pytest.mark.parametrize("data,message", [
    ({"optim.lr": {"normal": [0, 1]}},
     "s.yaml: optim.lr: unknown distribution 'normal'; use one of choice, uniform, loguniform, randint (a nested key "
     "is written dotted, e.g. optim.lr: {loguniform: [0.001, 0.1]})"),
    ({"optim": {"lr": {"choice": [0.1]}}},
     "s.yaml: optim: unknown distribution 'lr'; use one of choice, uniform, loguniform, randint (a nested key is "
     "written dotted, e.g. optim.lr: {loguniform: [0.001, 0.1]})"),
    ({"optim.lr": {"uniform": [0.1, 0.2], "choice": [0.1]}},
     "s.yaml: optim.lr: one distribution (choice, uniform, loguniform, randint) per key, got uniform, choice"),
    ({"optim.lr": {"uniform": [0.1]}}, "s.yaml: optim.lr: uniform takes [low, high], two numbers, got [0.1]"),
    ({"optim.lr": {"loguniform": [0.1, 0.2, 0.3]}},
     "s.yaml: optim.lr: loguniform takes [low, high], two numbers, got [0.1, 0.2, 0.3]"),
    ({"optim.lr": {"uniform": 0.1}}, "s.yaml: optim.lr: uniform takes [low, high], two numbers, got 0.1"),
    ({"optim.lr": {"uniform": [True, 1]}}, "s.yaml: optim.lr: uniform takes [low, high], two numbers, got [True, 1]"),
    ({"optim.lr": {"uniform": ["a", 1]}}, "s.yaml: optim.lr: uniform takes [low, high], two numbers, got ['a', 1]"),
    ({"optim.lr": {"uniform": [0, math.inf]}},
     "s.yaml: optim.lr: uniform takes [low, high], two numbers, got [0, inf]"),
    ({"model.num_segments": {"randint": [1.5, 4]}},
     "s.yaml: model.num_segments: randint takes [low, high], two integers, got [1.5, 4]"),
    ({"optim.lr": {"choice": []}}, "s.yaml: optim.lr: choice takes a non-empty list of values, got []"),
    ({"optim.lr": {"choice": 0.1}}, "s.yaml: optim.lr: choice takes a non-empty list of values, got 0.1"),
    ({"optim.lr": {"uniform": [0.2, 0.1]}}, "s.yaml: optim.lr: uniform: low must be < high, got [0.2, 0.1]"),
    ({"optim.lr": {"loguniform": [0.1, 0.1]}}, "s.yaml: optim.lr: loguniform: low must be < high, got [0.1, 0.1]"),
    ({"model.num_segments": {"randint": [3, 3]}}, "s.yaml: model.num_segments: randint: low must be < high, got [3, 3]"),
    ({"optim.lr": {"loguniform": [0, 0.1]}}, "s.yaml: optim.lr: loguniform: low must be > 0, got [0, 0.1]"),
    ({"optim.lr": {"loguniform": [-1, 0.1]}}, "s.yaml: optim.lr: loguniform: low must be > 0, got [-1, 0.1]"),
    # every value a trial can get goes through the config loader, naming the key
    ({"optim.lr": {"choice": [0.1, -1]}}, "s.yaml: optim.lr: must be > 0, got -1.0 (choice value 2 of 2, -1)"),
    ({"model.num_segments": {"choice": [2, "x"]}},
     "s.yaml: model.num_segments: expected an integer, got 'x' (choice value 2 of 2, 'x')"),
    ({"model.num_segments": {"choice": [2, 2.5]}},
     "s.yaml: model.num_segments: expected an integer, got 2.5 (choice value 2 of 2, 2.5)"),
    ({"model.partial_bn": {"choice": [True, 1]}},
     "s.yaml: model.partial_bn: expected true/false, got 1 (choice value 2 of 2, 1)"),
    ({"model.num_segments": {"uniform": [2, 5]}},  # a float range of an integer key
     "s.yaml: model.num_segments: expected an integer, got 2.0 (uniform low bound)"),
    ({"model.dropout": {"uniform": [0.3, 1.0]}}, "s.yaml: model.dropout: must be in [0, 1), got 1.0 (uniform high bound)"),
    ({"optim.momentum": {"loguniform": [0.5, 1.5]}},
     "s.yaml: optim.momentum: must be in [0, 1), got 1.5 (loguniform high bound)"),
    ({"model.num_segments": {"randint": [0, 4]}}, "s.yaml: model.num_segments: must be >= 1, got 0 (randint low bound)"),
    ({"model.consensus": {"choice": ["avg", "median"]}},
     "s.yaml: model.consensus: must be one of avg, max, weighted; got 'median' (choice value 2 of 2, 'median')"),
    ({"train.batch_size_per_worker": 0}, "s.yaml: train.batch_size_per_worker: must be >= 1, got 0 (a fixed value)"),
    ({"model.modality": {"choice": ["rgb_diff", "rgb"]}},  # the error names another key: the searched one is added
     "s.yaml: model.snippet_length: must be 1 for modality rgb (its snippets are single frames), got 5 "
     "(model.modality: choice value 2 of 2, 'rgb')"),
    ({"optim.lrr": {"loguniform": [0.001, 0.1]}}, "s.yaml: optim.lrr: unknown key" + KNOWN),
    ({"optimizer.lr": {"choice": [0.1]}}, "s.yaml: optimizer: unknown key" + KNOWN),
    ({"model.num_segmnets": 3}, "s.yaml: model.num_segmnets: unknown key" + KNOWN),
    ({"optim": 0.1}, "s.yaml: optim: expected a mapping, got 0.1 (a fixed value)"),
    ({"optim.lr.x": {"choice": [0.1]}},
     "s.yaml: override 'optim.lr.x=0.1': optim.lr is not a section (optim.lr.x: choice value 1 of 1, 0.1)"),
    ({"optim..lr": 0.1}, "s.yaml: 'optim..lr': a key is a dotted config key, e.g. optim.lr: {loguniform: [0.001, 0.1]}"),
    ({1.5: 0.1}, "s.yaml: 1.5: a key is a dotted config key, e.g. optim.lr: {loguniform: [0.001, 0.1]}"),
    ({"train.epochs": {"choice": [2, 3]}},
     "s.yaml: train.epochs: not searchable: it is ASHA's budget (max_t); set it with --set train.epochs=N"),
    ({"run.name": "x"}, "s.yaml: run.name: not searchable: each trial's run is named <run.name>-<trial id>"),
    ({"run.storage_path": "/x"}, "s.yaml: run.storage_path: not searchable: the trials live under "
                                 "run.storage_path/run.name"),
    ({"cluster.cpus_per_worker": {"choice": [1, 2]}},
     "s.yaml: cluster.cpus_per_worker: not searchable: resources per trial are --workers-per-trial and "
     "--set cluster.cpus_per_worker=C"),
    ({}, "s.yaml: expected a mapping of dotted config keys to distributions, e.g. optim.lr: {loguniform: [0.001, 0.1]}"),
    ([{"optim.lr": 0.1}],
     "s.yaml: expected a mapping of dotted config keys to distributions, e.g. optim.lr: {loguniform: [0.001, 0.1]}"),
])
def test_a_bad_space_fails_naming_the_key_and_the_problem(data, message):
    with pytest.raises(ValueError) as e:
        parse_space(data, BASE, source="s.yaml")
    assert isinstance(e.value, ConfigError)  # the CLI's one error line, exit 2
    text = str(e.value)
    assert text.startswith(message) if message.endswith(KNOWN) else text == message, text


def test_values_are_checked_against_the_base_config():
    """--set applies to every trial and to the check: rgb is valid once the base's snippets are single frames."""
    data = {"model.modality": {"choice": ["rgb"]}}
    with pytest.raises(ConfigError, match="model.snippet_length: must be 1"):
        parse_space(data, BASE)
    assert parse_space(data, load_config(None, ["model.snippet_length=1"])) == {"model.modality": Searched(CHOICE, ("rgb",))}


def test_load_space_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'none.yaml'}: space file not found")):
        load_space(tmp_path / "none.yaml", BASE)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim.lr: {choice: [0.1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: not valid YAML")):
        load_space(bad, BASE)
    good = tmp_path / "space.yaml"
    good.write_text("optim.lr: {loguniform: [0.001, 0.1]}\nmodel.num_segments: {choice: [2, 3]}\n")
    assert load_space(good, BASE) == {"optim.lr": Searched(LOGUNIFORM, (0.001, 0.1)),
                                      "model.num_segments": Searched(CHOICE, (2, 3))}
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim.lrr: {loguniform: [0.001, 0.1]}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{typo}: optim.lrr: unknown key")):
        load_space(typo, BASE)


def test_ray_tune_domains_sample_inside_the_ranges():
    from ray.tune.search.sample import Categorical, Float, Integer

    rng = np.random.default_rng(0)
    lr = Searched(LOGUNIFORM, (0.001, 0.1)).domain()
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (0.001, 0.1) and str(lr.sampler) == "LogUniform"
    drop = Searched(UNIFORM, (0.3, 0.8)).domain()
    assert isinstance(drop, Float) and (drop.lower, drop.upper) == (0.3, 0.8) and str(drop.sampler) == "Uniform"
    seg = Searched(RANDINT, (2, 6)).domain()
    assert isinstance(seg, Integer) and (seg.lower, seg.upper) == (2, 6)
    choice = Searched(CHOICE, (2, 3)).domain()
    assert isinstance(choice, Categorical) and choice.categories == [2, 3]
    assert Fixed(4).domain() == 4
    assert all(0.001 <= v < 0.1 for v in lr.sample(size=200, random_state=rng))
    assert set(seg.sample(size=200, random_state=rng)) == {2, 3, 4, 5}  # high exclusive, as the file says


def test_trial_config_applies_sampled_values_exactly():
    cfg = trial_config(BASE, {"optim.lr": 1e-05, "model.dropout": 0.1 + 0.2, "model.num_segments": np.int64(2),
                              "optim.weight_decay": np.float64(0.00012345678901234), "run.name": "x-1",
                              "optim.lr_steps": [3, 5], "model.pretrained": "a: b"})
    assert cfg.optim.lr == 1e-05 and cfg.model.dropout == 0.1 + 0.2 and cfg.model.num_segments == 2
    assert cfg.optim.weight_decay == 0.00012345678901234 and type(cfg.optim.weight_decay) is float
    assert cfg.run.name == "x-1" and cfg.optim.lr_steps == (3, 5) and cfg.model.pretrained == "a: b"
    with pytest.raises(ConfigError, match="optim.lr: must be > 0"):
        trial_config(BASE, {"optim.lr": 0.0})


@pytest.mark.parametrize("cpus,gpus,workers,cpus_per_worker,use_gpu,expected", [
    (8, 0, 1, 1.0, False, 4),  # each trial: 1 worker CPU + 1 for its Tune function
    (8, 0, 2, 1.0, False, 2),
    (8, 0, 1, 2.0, False, 2),
    (7.5, 0, 1, 1.5, False, 3),
    (2, 0, 2, 1.0, False, 1),  # nothing fits: one at a time (an autoscaling cluster may grow)
    (64, 4, 2, 1.0, True, 2),  # GPUs bound it
])
def test_trials_that_fit_a_cluster(cpus, gpus, workers, cpus_per_worker, use_gpu, expected):
    assert trials_that_fit(cpus, gpus, workers=workers, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu) == expected


def test_local_trials_fill_the_cores_with_workers():
    assert local_trials(2, workers=1, cpus_per_worker=1.0) == 2
    assert local_trials(2, workers=2, cpus_per_worker=1.0) == 1
    assert local_trials(2, workers=4, cpus_per_worker=1.0) == 1
    assert local_trials(16, workers=2, cpus_per_worker=2.0) == 4


# --- the summary ---------------------------------------------------------------------------

KEYS = ["optim.lr", "model.dropout"]
RECORDS = [
    TrialRecord("ab_00000", {"optim.lr": 0.01, "model.dropout": 0.5}, {1: 0.25, 2: 0.5, 3: 0.5}),
    TrialRecord("ab_00001", {"optim.lr": 0.1, "model.dropout": 0.3}, {1: 0.125}),
    TrialRecord("ab_00002", {"optim.lr": 0.02, "model.dropout": 0.3}, {1: 0.25, 2: 0.75}, error="RuntimeError: boom"),
    TrialRecord("ab_00003", {"optim.lr": 0.05, "model.dropout": 0.5}, {1: 0.5, 2: 0.25, 3: 0.5}),
    TrialRecord("ab_00004", {"optim.lr": 0.07, "model.dropout": 0.5}, {}, error="ValueError: bad"),
]


def test_summary_rows_status_and_best():
    rows = tune_summary.rows(RECORDS, KEYS, epochs=3, run_dir=lambda t: f"/runs/t-{t}")
    assert [(r["trial"], r["status"], r["epochs"], r["best_val_top1"], r["best_epoch"]) for r in rows] == [
        ("ab_00000", "completed", 3, 0.5, 2), ("ab_00001", "stopped", 1, 0.125, 1),
        ("ab_00002", "error", 2, 0.75, 2), ("ab_00003", "completed", 3, 0.5, 1), ("ab_00004", "error", 0, None, None)]
    assert rows[0]["values"] == {"optim.lr": 0.01, "model.dropout": 0.5} and rows[0]["run_dir"] == "/runs/t-ab_00000"
    best = tune_summary.best_row(rows)
    assert best["trial"] == "ab_00000"  # 0.75 failed; 0.5 twice: the first
    assert tune_summary.best_row([rows[2], rows[4]]) is None
    assert tune_summary.table(rows, KEYS).splitlines() == [
        "trial     optim.lr  model.dropout  best val top-1  epochs  status",
        "ab_00000  0.01      0.5            0.5000          3       completed",
        "ab_00001  0.1       0.3            0.1250          1       stopped",
        "ab_00002  0.02      0.3            0.7500          2       error",
        "ab_00003  0.05      0.5            0.5000          3       completed",
        "ab_00004  0.07      0.5            -               0       error"]
    assert tune_summary.line(RECORDS[1], KEYS, epochs=3) == (
        "ab_00001 (optim.lr=0.1, model.dropout=0.3): stopped after 1/3 epoch(s), best val top-1 0.1250")
    assert tune_summary.line(RECORDS[4], KEYS, epochs=3) == (
        "ab_00004 (optim.lr=0.07, model.dropout=0.5): error after 0/3 epoch(s), no validation: ValueError: bad")


def test_summary_csv_and_best_config_load_back(tmp_path):
    rows = tune_summary.rows(RECORDS, KEYS, epochs=3, run_dir=lambda t: tmp_path / t)
    path = tune_summary.write_csv(rows, KEYS, tmp_path / "tune_summary.csv")
    read = list(csv.DictReader(path.open()))
    assert list(read[0]) == ["trial", *KEYS, "best_val_top1", "best_epoch", "epochs", "status", "run_dir", "error"]
    assert [(r["trial"], float(r["optim.lr"]), r["status"], r["best_val_top1"]) for r in read] == [
        ("ab_00000", 0.01, "completed", "0.5"), ("ab_00001", 0.1, "stopped", "0.125"), ("ab_00002", 0.02, "error", "0.75"),
        ("ab_00003", 0.05, "completed", "0.5"), ("ab_00004", 0.07, "error", "")]
    best = tune_summary.best_row(rows)
    cfg = trial_config(BASE, {**best["values"], "run.name": "t-best"})
    out = tune_summary.write_best_config(cfg, best, tmp_path / "best_config.yaml", tune_name="t")
    assert out.read_text().startswith("# tsn tune t: the best trial, ab_00000 (val top-1 0.5000 after 2 epoch(s); "
                                      "optim.lr=0.01, model.dropout=0.5).\n")
    assert load_config(out) == cfg  # what `tsn train --config` reads


# --- ASHA ----------------------------------------------------------------------------------

def test_asha_stops_below_the_rung_but_never_at_the_last_epoch():
    from ray.tune.schedulers import TrialScheduler

    from cluster.tune_ray import ASHAToTheEnd

    # epochs 4, grace 1, factor 4: ASHA's rungs are at 1 and 4 (= max_t)
    asha = ASHAToTheEnd(time_attr="epochs_done", max_t=4, grace_period=1)
    asha.set_search_properties("val_top1", "max")
    a, b, c = (SimpleNamespace(trial_id=t) for t in "abc")
    for t in (a, b, c):
        asha.on_trial_add(None, t)

    def result(trial, epochs, top1):
        return asha.on_trial_result(None, trial, {"epochs_done": epochs, "val_top1": top1})

    assert result(a, 1, 0.5) == TrialScheduler.CONTINUE  # the first at a rung sets it
    assert result(b, 1, 0.25) == TrialScheduler.STOP  # below the rung's cutoff
    assert [result(a, e, 0.5) for e in (2, 3, 4)] == [TrialScheduler.CONTINUE] * 3
    assert result(c, 1, 0.5) == TrialScheduler.CONTINUE
    assert result(c, 4, 0.1) == TrialScheduler.CONTINUE  # below the rung at 4, but that is its last epoch
    assert asha.on_trial_result(None, c, {"epochs_done": 2}) == TrialScheduler.CONTINUE  # no metric: no decision


# --- the command ---------------------------------------------------------------------------

def test_a_bad_space_key_fails_before_ray_starts(tmp_path, monkeypatch, capsys):
    from cli import tune as tune_cmd

    def no_ray(*args, **kwargs):
        raise AssertionError("run_tune (and Ray) started despite a bad space")

    monkeypatch.setattr(tune_cmd, "run_tune", no_ray)
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {loguniform: [0.001, 0.1]}\nmodel.num_segmnets: {choice: [2, 3]}\n")
    assert cli.main(["tune", "--space", str(space), "--num-samples", "2"]) == 2
    assert f"error: {space}: model.num_segmnets: unknown key; known keys here: " in capsys.readouterr().err
    space.write_text("optim.lr: {loguniform: [0, 0.1]}\n")
    assert cli.main(["tune", "--space", str(space), "--num-samples", "2"]) == 2
    assert f"error: {space}: optim.lr: loguniform: low must be > 0, got [0, 0.1]" in capsys.readouterr().err
    assert cli.main(["tune", "--space", str(space), "--num-samples", "2", "--set", "optim.lrr=1"]) == 2
    assert "error: optim.lrr: unknown key" in capsys.readouterr().err


# --- end to end: a search on a local Ray cluster --------------------------------------------

SPACE = "optim.lr: {choice: [0.1, 0.00001]}\nmodel.dropout: 0.5\n"
# The embedded default shrunk to the session's tiny dataset (12 train / 6 val videos, 3 steps an
# epoch). Validation on the training split: the 6 val videos stay at chance for 3 epochs whatever
# the lr, the training videos do not, so ASHA has something to rank.
TINY = ["augment.input_size=32", "augment.resize_short=48", "model.test_segments=5", "train.batch_size_per_worker=4",
        "train.test_batch_size_per_worker=3", "train.epochs=3", "loader.num_threads=1", "metrics.port=0",
        "data.val_split=train"]


@pytest.mark.slow
def test_tune_end_to_end_two_trials(packed_jpeg, tmp_path):
    """Two trials one after the other (seed 2 samples lr 1e-5, then 0.1), so ASHA's rung at
    epoch 1 is set by the first: the second stops there when its val top-1 is lower (it is,
    with today's numbers) and ends as "stopped", not as an error."""
    (tmp_path / "space.yaml").write_text(SPACE)
    sets = [a for kv in (f"data.shards={packed_jpeg}", f"run.storage_path={tmp_path / 'runs'}", "run.name=tune", *TINY)
            for a in ("--set", kv)]
    log = tmp_path / "tune.log"
    t0 = time.time()
    out = wait_tsn(start_tsn(["tune", "--space", str(tmp_path / "space.yaml"), "--num-samples", "2", "--seed", "2",
                              "--max-concurrent", "1", "--workers-per-trial", "1", *sets], log), log, timeout_s=400)
    print(f"tsn tune, 2 trials: {time.time() - t0:.1f}s")
    tune_dir = tmp_path / "runs" / "tune"

    rows = list(csv.DictReader((tune_dir / "tune_summary.csv").open()))
    assert [r["trial"] for r in rows] == sorted(r["trial"] for r in rows) and len(rows) == 2
    assert sorted(float(r["optim.lr"]) for r in rows) == [0.00001, 0.1] and {r["model.dropout"] for r in rows} == {"0.5"}
    first_epoch = []
    for row in rows:
        assert row["status"] in ("completed", "stopped") and not row["error"], row  # ASHA's stop is no error
        run = RunStore(tune_dir / f"tune-{row['trial']}")  # a normal run directory per trial
        assert str(run.dir) == row["run_dir"]
        assert run.run_name() == f"tune-{row['trial']}"  # the `run` label of its Prometheus metrics
        cfg = load_config(run.config_path)
        assert cfg.optim.lr == float(row["optim.lr"]) and cfg.model.dropout == 0.5  # the sampled values, exactly
        assert cfg.cluster.num_workers == 1
        history = run.read_history()  # a stopped trial may have trained on while Tune stopped it
        assert len(history) >= int(row["epochs"]) >= 1
        assert max(h["val_top1"] for h in history.values()) >= float(row["best_val_top1"])
        assert [p for p in run.dir.glob("checkpoint_*") if (p / "checkpoint.pt").is_file()]
        if row["status"] == "completed":
            assert int(row["epochs"]) == len(history) == 3 and run.read_results()["epochs"] == 3
            assert max(h["val_top1"] for h in history.values()) == pytest.approx(float(row["best_val_top1"]))
        first_epoch.append(history[0]["val_top1"])
    # ASHA (reduction factor 4, one rung at epoch 1): the second trial stops there iff it is below the first
    assert rows[1]["status"] == ("stopped" if first_epoch[1] < first_epoch[0] else "completed"), (rows, first_epoch)
    assert rows[0]["status"] == "completed"

    best = max(rows, key=lambda r: float(r["best_val_top1"]))  # max keeps the first of equals, as the summary
    best_cfg = load_config(tune_dir / "best_config.yaml")  # what `tsn train --config` loads
    assert best_cfg.optim.lr == float(best["optim.lr"]) and best_cfg.model.dropout == 0.5
    assert best_cfg.run.name == "tune-best" and best_cfg.train.epochs == 3 and best_cfg.cluster.num_workers == 1
    assert best["trial"] in (tune_dir / "best_config.yaml").read_text().splitlines()[0]
    for n in (1, 2):  # one line per finished trial in the driver
        assert re.search(rf"^\[tsn\] trial {n}/2 \S+ \(optim\.lr=\S+, model\.dropout=0\.5\): (completed|stopped) "
                         rf"after [123]/3 epoch\(s\), best val top-1 [0-9.]+$", out, re.M), out[-3000:]
    assert f"best {best['trial']} val top-1" in out
