"""The run store: the checkpoint retention rule and index, the tolerant log readers, results."""

from __future__ import annotations

import json

import pytest

from app import run_store
from app.run_store import RunStore, best_entry, checkpoint_entry, read_jsonl, retained


def entry(step, top1=None, file=None):
    metrics = {"step": step, **({"val_top1": top1} if top1 is not None else {})}
    return {"file": file or f"c{step}", "path": f"/x/c{step}", "epoch": step, "step": step,
            "loader_position": [step, 0], "metrics": metrics, "time": 0.0}


def steps(entries):
    return [e["step"] for e in entries]


def test_best_is_the_highest_val_top1_ties_the_later_and_never_a_mid_epoch_checkpoint():
    assert best_entry([]) is None
    assert best_entry([entry(1), entry(2)]) is None  # mid-epoch only: no val metric
    assert best_entry([entry(1, 0.5), entry(2, 0.9), entry(3), entry(4, 0.9), entry(5, 0.1)])["step"] == 4
    assert best_entry([entry(1, 0.0), entry(2)])["step"] == 1  # 0.0 is a score, not a missing one


def test_retention_keeps_the_last_k_plus_the_best():
    es = [entry(1, 0.95), entry(2, 0.1), entry(3), entry(4, 0.3)]
    assert steps(retained(es, keep_last=2, keep_best=True)) == [1, 3, 4]
    assert steps(retained(es, keep_last=2, keep_best=False)) == [3, 4]
    assert steps(retained(es, keep_last=5, keep_best=True)) == [1, 2, 3, 4]
    assert steps(retained(list(reversed(es)), keep_last=1, keep_best=True)) == [1, 4]  # ordered by step
    # applied step by step (as the index does) or at once: the same entries
    kept = []
    for e in es:
        kept = retained([*kept, e], keep_last=2, keep_best=True)
    assert kept == retained(es, keep_last=2, keep_best=True)


def test_record_checkpoint_writes_the_index_then_releases_what_it_drops(tmp_path):
    store = RunStore(tmp_path / "run")
    released = []
    for e in (entry(1, 0.95), entry(2, 0.1), entry(3), entry(4, 0.3)):
        store.record_checkpoint(e, keep_last=2, keep_best=True, release=released.append)
    index = json.loads(store.index_path.read_text())
    assert steps(index["checkpoints"]) == [1, 3, 4] and steps(released) == [2]
    assert index["latest"] == "c4" and index["best"] == "c1"
    assert store.checkpoint_entries() == index["checkpoints"] and store.best_checkpoint_entry()["step"] == 1
    # the same step saved again under another name (a Ray run restarted after it reported step 4):
    # replaced, and the old copy released
    store.record_checkpoint(entry(4, 0.3, file="c4-again"), keep_last=2, keep_best=True, release=released.append)
    assert [e["file"] for e in store.checkpoint_entries()] == ["c1", "c3", "c4-again"]
    assert [e["file"] for e in released] == ["c2", "c4"]
    # ... or under the same name (a local run: the file was overwritten): nothing to release
    store.record_checkpoint(entry(4, 0.3, file="c4-again"), keep_last=2, keep_best=True, release=released.append)
    assert [e["file"] for e in released] == ["c2", "c4"]


def test_checkpoint_entry_of_a_state():
    state = {"epoch": 1, "step": 6, "loader_position": (2, 0), "model": {}}
    e = checkpoint_entry("ckpt-e1-s6.pt", "/r/checkpoints/ckpt-e1-s6.pt", state, {"val_top1": 0.5})
    assert {k: e[k] for k in ("file", "path", "epoch", "step", "loader_position", "metrics")} == {
        "file": "ckpt-e1-s6.pt", "path": "/r/checkpoints/ckpt-e1-s6.pt", "epoch": 1, "step": 6,
        "loader_position": [2, 0], "metrics": {"val_top1": 0.5}}


def test_an_unreadable_index_is_an_error_naming_it(tmp_path):
    store = RunStore(tmp_path)
    assert store.checkpoint_entries() == [] and store.best_checkpoint_entry() is None
    store.index_path.write_text("{")
    with pytest.raises(ValueError, match="checkpoints.json: unreadable checkpoint index"):
        store.checkpoint_entries()


def test_logs_keep_the_last_record_and_skip_a_cut_line(tmp_path, capsys):
    store = RunStore(tmp_path)
    for epoch, loss in ((0, 2.0), (1, 1.5), (1, 1.4)):  # epoch 1 logged again after a resume
        store.append_history({"epoch": epoch, "train_loss": loss})
    assert store.read_history() == {0: {"epoch": 0, "train_loss": 2.0}, 1: {"epoch": 1, "train_loss": 1.4}}
    with store.open_step_log(3) as log:
        for step in (1, 2, 2):
            log.write({"step": step, "loss": float(step), "not_logged": 1})
    with store.step_log_path(3).open("a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-line
    records = store.read_step_logs()[3]
    assert [r["step"] for r in records] == [1, 2] and "not_logged" not in records[0] and "time" in records[0]
    assert "unreadable line skipped" in capsys.readouterr().err
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_results_and_worker_infos(tmp_path):
    store = RunStore(tmp_path / "run")
    assert store.read_results() is None
    store.write_results({"finished": True, "steps": 3})
    assert store.read_results() == {"finished": True, "steps": 3}
    store.results_path.write_text('{"finished": tr')
    assert store.read_results() is None  # damaged: the final test is redone
    store.write_worker_info(1, {"rank": 1, "pid": 11})
    store.write_worker_info(0, {"rank": 0, "pid": 10})
    assert [w["pid"] for w in store.read_worker_infos()] == [10, 11]
    assert sorted(p.name for p in store.dir.rglob("*") if p.is_file()) == ["rank0.json", "rank1.json",
                                                                        "results.json"]  # no temporaries


def test_run_name_from_the_saved_config(tmp_path):
    from app.config import load_config

    store = RunStore(tmp_path / "myrun")
    assert store.run_name() == "myrun"
    store.write_config(load_config(None, ["run.name=abc"]))
    assert store.run_name() == "abc" and load_config(store.config_path).run.name == "abc"


def test_ctrl_c_inside_torch_save_stays_an_interrupt_and_replaces_nothing(tmp_path, monkeypatch):
    """Issue 24 (test_faults' Ctrl-C loop, 1 run in ~10): SIGINT while torch.save wrote tensor
    data ended in RuntimeError "unexpected pos" from its zip writer (exit 1, a traceback)."""
    import io

    import torch

    real = run_store.atomic_write

    class Interrupting(io.RawIOBase):  # the third write is where Ctrl-C lands
        def __init__(self, f):
            self.f, self.writes = f, 0

        def writable(self):
            return True

        def write(self, b):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return self.f.write(b)

    monkeypatch.setattr(run_store, "atomic_write", lambda path, write, **kw: real(path, lambda f: write(Interrupting(f)),
                                                                                  **kw))
    target = tmp_path / "ckpt" / "model.pt"
    with pytest.raises(KeyboardInterrupt):
        run_store.write_checkpoint(target, {"a": torch.zeros(100_000), "b": torch.ones(5_000)})
    assert not target.exists() and not [p for p in target.parent.iterdir()]
