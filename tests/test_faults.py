"""Issue 17, the training side: what a hostile or unlucky user does to `tsn train` / `tsn submit`
/ `tsn jobs`, each through the CLI, on the session's packed dataset (`packed_jpeg`).

Every user error ends in ONE ``error: ...`` line naming the file or key and the fix, exit code 2,
no traceback. The Ray scenarios share one run (`lost_driver`, slow): a driver SIGKILLed right
after epoch 2's checkpoint reached the disk, the same command again; that run also has its
metrics port taken and one corrupt training sample.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from damage import copy_with_wiped_frames
from procs import start_tsn

ROOT = Path(__file__).resolve().parent.parent


def tsn(args: list[str], timeout_s: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert exit code 2 with a single ``error:`` line holding every fragment, no traceback."""
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def local_args(packed, run_dir, epochs=2, *extra: str) -> list[str]:
    """A seconds-long `tsn train --local` on the session's dataset (tiny CNN, 48 px)."""
    sets = [f"data.shards={packed}", f"train.epochs={epochs}", "model.backbone=tiny", "model.test_segments=3",
            "augment.input_size=48", "augment.resize_short=48", "train.batch_size_per_worker=2", "loader.num_threads=1",
            *extra]
    return ["train", "--local", "--run-dir", str(run_dir), *(a for s in sets for a in ("--set", s))]


def ray_args(packed, storage, name, run_dir, epochs=2, *extra: str) -> list[str]:
    """A short Ray job (1 worker, tiny CNN, 48 px, no restarts) on the session's dataset."""
    sets = [f"data.shards={packed}", f"run.storage_path={storage}", f"run.name={name}", "metrics.port=0",
            f"train.epochs={epochs}", "model.backbone=tiny", "model.test_segments=3", "augment.input_size=48",
            "augment.resize_short=48", "train.batch_size_per_worker=2", "loader.num_threads=1",
            "cluster.num_workers=1", "cluster.max_failures=0", *extra]
    return ["train", "--run-dir", str(run_dir), *(a for s in sets for a in ("--set", s))]


def history_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "history.jsonl").read_text().splitlines() if line]


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("optim.lr=.nan", "optim.lr: must be a finite number, got nan"),
    ("optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
    ("optim.weight_decay=-.inf", "optim.weight_decay: must be a finite number, got -inf"),
    ("augment.mean=[0.4, .nan, 0.4]", "augment.mean[1]: must be a finite number, got nan"),
    ("model.dropout=.nan", "model.dropout: must be a finite number, got nan"),
    ("augment.std=[0, 0, 0]", "augment.std: must be 3 values > 0, got [0.0, 0.0, 0.0]"),
    ("cluster.cpus_per_worker=-3", "cluster.cpus_per_worker: must be > 0, got -3.0"),
    ("cluster.cpus_per_worker=0", "cluster.cpus_per_worker: must be > 0, got 0.0"),
    ("metrics.bind_address=everywhere", "metrics.bind_address: must be an IP address"),
])
def test_bad_numbers_fail_at_load_naming_the_key(override, message):
    from app.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_non_finite_lr_is_one_line_through_the_cli():
    one_line_error(tsn(["train", "--set", "optim.lr=.nan"]), "optim.lr: must be a finite number, got nan")


def test_a_key_given_twice_names_the_key_and_the_line(tmp_path):
    config = tmp_path / "twice.yaml"
    config.write_text("optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\ntrain:\n  epochs: 3\n")
    one_line_error(tsn(["train", "--config", str(config)]), f"{config}:4: optim.lr: key given twice (first on line 2)")
    sections = tmp_path / "sections.yaml"
    sections.write_text("train:\n  epochs: 3\noptim:\n  lr: 0.1\ntrain:\n  epochs: 4\n")
    one_line_error(tsn(["train", "--config", str(sections)]), f"{sections}:5: train: key given twice (first on line 1)")


def test_submit_checks_overrides_without_a_config_before_contacting_anything():
    # Port 9 (discard) on loopback: nothing answers; the checks must fail before any connection.
    t0 = time.time()
    one_line_error(tsn(["submit", "--address", "http://127.0.0.1:9", "--set", "train.epochs=-1"]),
                   "train.epochs: must be >= 1, got -1")
    one_line_error(tsn(["submit", "--address", "http://127.0.0.1:9", "--set", "optim.lrr=0.1"]),
                   "optim.lrr: unknown key")
    assert time.time() - t0 < 30


def test_jobs_address_without_scheme_fails_fast_with_the_fix():
    t0 = time.time()
    one_line_error(tsn(["jobs", "--address", "127.0.0.1:1", "list"]), "--address 127.0.0.1:1",
                   "http://127.0.0.1:1")
    assert time.time() - t0 < 20  # before: a 43 s wait for a GCS, then a 29-line traceback


# --- inputs checked in the driver, before Ray starts workers ------------------------------------


def test_dataset_too_small_for_the_world_size_is_refused_before_ray(packed_jpeg, tmp_path):
    r = tsn(["train", "--set", f"data.shards={packed_jpeg}", "--set", f"run.storage_path={tmp_path}",
             "--set", "cluster.num_workers=13", "--set", "metrics.port=0"])
    one_line_error(r, "split 'train' has 12 video(s), fewer than the 13 workers", "cluster.num_workers")
    assert "Ray" not in r.stdout + r.stderr  # no local cluster was started


def test_manifest_claiming_more_samples_than_the_shards_fails_naming_the_split(packed_jpeg, tmp_path):
    dataset = tmp_path / "claims"
    shutil.copytree(packed_jpeg, dataset)
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["splits"]["val"]["num_samples"] += 5
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    r = tsn(["train", "--set", f"data.shards={dataset}", "--set", f"run.storage_path={tmp_path}",
             "--set", "metrics.port=0"])
    one_line_error(r, "split 'val' has 11 samples, its shards list 6", "tsn pack")
    manifest["splits"]["val"]["num_samples"] -= 5
    shard = manifest["splits"]["train"]["shards"][0]
    shard["num_samples"] += 2
    manifest["splits"]["train"]["num_samples"] += 2
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    r = tsn(["train", "--set", f"data.shards={dataset}", "--set", f"run.storage_path={tmp_path}",
             "--set", "metrics.port=0"])
    one_line_error(r, f"{shard['path']} (split 'train') holds 3 samples, its index lists 1")


class _Payload:
    """A pickle that runs a shell command when unpickled by a plain ``torch.load``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("local", [True, False], ids=["local", "ray-driver"])
def test_malicious_init_from_is_refused_in_one_line_and_never_run(packed_jpeg, tmp_path, local):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    if local:
        args = local_args(packed_jpeg, tmp_path / "run", 1, f"model.init_from={evil}")
    else:  # the Ray job's driver reads it before starting Ray: no worker retries it
        args = ["train", "--set", f"data.shards={packed_jpeg}", "--set", f"run.storage_path={tmp_path}",
                "--set", f"model.init_from={evil}", "--set", "metrics.port=0"]
    r = tsn(args)
    one_line_error(r, f"model.init_from={evil}", "pickled objects or code")
    assert not marker.exists()
    if not local:
        assert "Ray" not in r.stdout + r.stderr
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    one_line_error(tsn(local_args(packed_jpeg, tmp_path / "run2", 1, f"model.init_from={text}")),
                   f"model.init_from={text}", "not a weights-only torch checkpoint")


def test_a_run_dir_that_is_a_symlink_loop_is_one_line(packed_jpeg, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    one_line_error(tsn(local_args(packed_jpeg, loop, 1)), f"{loop}: exists but is not a directory")


# --- resuming with another config or dataset (issue 24's fault pass) -------------------------------


@pytest.mark.parametrize("change,fragment", [
    ("model.backbone=resnet18", "model.backbone='tiny' (now 'resnet18')"),
    ("model.consensus=weighted", "model.consensus='avg' (now 'weighted')"),
])
def test_resuming_with_a_model_the_checkpoint_does_not_fit_is_one_line(packed_jpeg, tmp_path, change, fragment):
    """It ended in a state_dict size-mismatch traceback, after config.yaml had been rewritten."""
    run = tmp_path / "run"
    assert tsn(local_args(packed_jpeg, run, 1)).returncode == 0
    config = (run / "config.yaml").read_text()
    one_line_error(tsn(local_args(packed_jpeg, run, 2, change)), f"{run}: its checkpoints hold weights for {fragment}",
                   "train in a new run dir")
    assert (run / "config.yaml").read_text() == config  # the run's record untouched


def test_resuming_on_a_dataset_of_other_classes_is_one_line(packed_jpeg, tmp_path):
    """It resumed silently when the class names only changed order (the classifier trained on
    the old order), or crashed in a size mismatch when their number changed."""
    other = tmp_path / "other"
    shutil.copytree(packed_jpeg, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][::-1]
    (other / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "run"
    assert tsn(local_args(packed_jpeg, run, 1)).returncode == 0
    one_line_error(tsn(local_args(other, run, 2)), f"{run}: the run was trained on 6 classes",
                   f"data.shards={other} has 6", "or in another order")


@pytest.mark.slow
def test_ctrl_c_mid_epoch_exits_130_every_time(packed_jpeg, tmp_path):
    """4 of 14 interrupts ended in SIGABRT ("terminate called without an active exception"):
    the loaders' prefetching thread was still inside torch when the interpreter shut down."""
    for i in range(3):
        run, log = tmp_path / f"run{i}", tmp_path / f"log{i}"
        proc = start_tsn(local_args(packed_jpeg, run, 50), log)
        deadline = time.time() + 120
        while time.time() < deadline and not list(run.glob("steps/rank0.jsonl")):
            time.sleep(0.2)
        time.sleep(0.5 + 0.3 * i)  # mid-epoch, at a different point each time
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
        text = log.read_text()
        assert rc == 130 and "terminate called" not in text and "Traceback" not in text, (rc, text[-2000:])


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: room for a run's config and logs, not for a checkpoint (~84 KB)."""
    mount = tmp_path / "full"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_during_a_checkpoint_is_one_line(packed_jpeg, tiny_disk):
    r = tsn(local_args(packed_jpeg, tiny_disk / "run", 1))
    one_line_error(r, str(tiny_disk / "run" / "checkpoints"), "no space left on device while writing a checkpoint",
                   "resumes from its last complete checkpoint")
    assert not [p for p in (tiny_disk / "run" / "checkpoints").iterdir()]  # no torn file, no temporary left


@pytest.mark.slow
def test_disk_full_while_ray_stores_a_checkpoint_is_one_line(packed_jpeg, tiny_disk, tmp_path):
    """Issue 24: Ray's upload failing on a full disk ended in Ray's report of worker errors
    (pyarrow's OSError names no path); now one error line naming the storage and the fix, and
    the torn copy Ray left is gone."""
    r = tsn(ray_args(packed_jpeg, tiny_disk, "full", tmp_path / "run", 1), timeout_s=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]  # (Ray's forwarded worker logs may still follow it)
    assert errors[0].startswith(f"error: {tiny_disk / 'full'}: no space left on device while Ray stored a checkpoint")
    assert "free space there or move run.storage_path" in errors[0]
    assert "resumes from its last complete checkpoint" in errors[0]
    assert not list((tiny_disk / "full").glob("checkpoint_*"))  # no torn copy holding the space


def test_every_checkpoint_truncated_starts_over_with_one_warning_and_no_duplicate_epochs(packed_jpeg, tmp_path):
    run = tmp_path / "run"
    r = tsn(local_args(packed_jpeg, run, 2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert history_epochs(run) == [0, 1]
    files = sorted((run / "checkpoints").glob("*.pt"))
    assert len(files) == 2
    for f in files:  # what a full disk or a crash mid-copy leaves
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = tsn(local_args(packed_jpeg, run, 3))
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "WARNING" in line and "checkpoint" in line]
    assert len(warnings) == 1 and "none of its 2 checkpoint(s) can be read" in warnings[0], r.stderr[-3000:]
    assert "starting the run over from epoch 0 and resetting history.jsonl" in warnings[0]
    assert history_epochs(run) == [0, 1, 2]  # before: [0, 1, 0, 1, 2]
    assert json.loads((run / "results.json").read_text())["steps"] == 3 * 6
    from tsn.checkpoint import load_checkpoint

    index = json.loads((run / "checkpoints.json").read_text())  # only the new run's checkpoints
    epochs = [load_checkpoint(run / "checkpoints" / e["file"])["epoch"] for e in index["checkpoints"]]
    assert epochs[-2:] == [1, 2] and len(epochs) <= 3  # keep_last 2 (+ the best), every one readable


@pytest.mark.slow
def test_every_checkpoint_of_a_ray_run_unreadable_starts_over_once(packed_jpeg, tmp_path):
    """The Ray job's form of the test above (issue 24): every checkpoint Ray registered torn
    in half; the same command again warns once in the driver and trains epochs 0-2 afresh."""
    from tsn.checkpoint import load_checkpoint

    storage, run = tmp_path / "runs", tmp_path / "run"
    r = tsn(ray_args(packed_jpeg, storage, "torn", run, 2), timeout_s=300)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted((storage / "torn").glob("checkpoint_*/checkpoint.pt"))
    assert len(files) == 2 and history_epochs(run) == [0, 1]
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = tsn(ray_args(packed_jpeg, storage, "torn", run, 3), timeout_s=300)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "WARNING cluster.recovery" in line]
    assert len(warnings) == 1 and "none of its 2 checkpoint(s) can be read" in warnings[0], r.stderr[-3000:]
    assert history_epochs(run) == [0, 1, 2]
    assert json.loads((run / "results.json").read_text())["epochs"] == 3
    index = json.loads((run / "checkpoints.json").read_text())
    kept = [e["path"] for e in index["checkpoints"]]
    assert kept and all(load_checkpoint(Path(p) / "checkpoint.pt")["epoch"] >= 0 for p in kept)


# --- metrics endpoint -----------------------------------------------------------------------------


def test_a_taken_metrics_port_moves_to_a_free_one_and_registers_it(tmp_path, caplog):
    from cluster.metrics import WorkerMetrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        m = WorkerMetrics("run-p", 0, "node-a", port=port, sd_dir=str(tmp_path), bind="127.0.0.1")
        try:
            assert m.port and m.port != port
            body = urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=5).read().decode()
            assert 'tsn_worker_up{node="node-a",rank="0",run="run-p"} 1.0' in body
            entry = json.loads((tmp_path / "tsn-run-p-rank0.json").read_text())[0]
            assert entry["targets"] == [f"127.0.0.1:{m.port}"]
            assert f"metrics port {port} is in use on 127.0.0.1: serving on port {m.port} instead" in caplog.text
        finally:
            m.close()
        assert not (tmp_path / "tsn-run-p-rank0.json").exists()


def test_bind_address_defaults_to_loopback_outside_a_pod(monkeypatch, tmp_path):
    from cluster.metrics import WorkerMetrics, default_bind_address

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert default_bind_address() == "127.0.0.1"
    m = WorkerMetrics("run-b", 0, "node-b", port=_free_port(), sd_dir=str(tmp_path))
    try:
        assert m._server.server_address[0] == "127.0.0.1"
        assert json.loads(next(tmp_path.glob("*.json")).read_text())[0]["targets"] == [f"127.0.0.1:{m.port}"]
    finally:
        m.close()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert default_bind_address() == "0.0.0.0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the Ray job: a lost driver (one run, slow) -----------------------------------------------------


def test_a_dead_drivers_leftover_processes_are_stopped_and_nothing_else(tmp_path):
    """`cluster.recovery.reap_previous_session`: processes naming the dead driver's Ray session
    directory are stopped; another session's process and a live driver's are left alone."""
    from app.run_store import RunStore
    from cluster.recovery import reap_previous_session

    ours, other = tmp_path / "session_2000-01-01_00-00-00_000000_1", tmp_path / "session_2000-01-01_00-00-00_000000_2"
    sleeper = "import sys, time; time.sleep(120)"
    left = subprocess.Popen([sys.executable, "-c", sleeper, f"--session-dir={ours}"])
    bystander = subprocess.Popen([sys.executable, "-c", sleeper, f"--session-dir={other}"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = RunStore(tmp_path / "run")
    try:
        store.write_driver_info({"pid": os.getpid(), "host": socket.gethostname(), "session_dir": str(ours)})
        assert reap_previous_session(store) == []  # the recorded driver is alive: its cluster is in use
        store.write_driver_info({"pid": dead.pid, "host": socket.gethostname(), "session_dir": str(ours)})
        assert reap_previous_session(store) == [left.pid]
        assert left.wait(timeout=10) == -signal.SIGTERM
        assert bystander.poll() is None
    finally:
        for p in (left, bystander):
            p.kill()
            p.wait()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _scrape(port: int) -> str | None:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None


@pytest.fixture(scope="module")
def lost_driver(packed_jpeg, tmp_path_factory):
    """`tsn train` (2 Ray workers, 6 epochs, keep_last 2) on a copy of the dataset with one
    corrupt training sample, its metrics ports taken; the driver is SIGKILLed as soon as epoch
    2's checkpoint file is on disk (before Ray's controller can register it), then the same
    command runs again to the end."""
    from cluster.metrics import DEFAULT_SD_DIR
    from tsn.checkpoint import load_checkpoint

    tmp = tmp_path_factory.mktemp("lost-driver")
    data, _ = copy_with_wiped_frames(packed_jpeg, tmp / "data")
    storage, name = tmp / "runs", f"faults-lost-{os.getpid()}"
    run = storage / name
    taken = []
    while len(taken) < 2:  # base port and base + 1 held by "another program"
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", taken[0].getsockname()[1] + 1 if taken else 0))
        except OSError:
            for t in taken:
                t.close()
            taken = []
            continue
        s.listen()
        taken.append(s)
    port = taken[0].getsockname()[1]
    sets = [f"data.shards={data}", f"run.storage_path={storage}", f"run.name={name}", f"metrics.port={port}",
            "model.backbone=tiny", "augment.input_size=48", "augment.resize_short=48", "model.test_segments=3",
            "train.batch_size_per_worker=2", "train.epochs=6", "checkpoint.keep_last=2", "loader.num_threads=1",
            "cluster.num_workers=2", "cluster.max_failures=1", "optim.lr=0.01"]
    args = ["train", *(a for s in sets for a in ("--set", s))]
    out = {"run": run, "port": port, "name": name, "scraped": []}
    try:
        proc = start_tsn(args, tmp / "first.log")
        deadline, last_scrape = time.time() + 400, 0.0
        while proc.poll() is None and time.time() < deadline:
            done = [d for d in run.glob("checkpoint_*") if (d / "checkpoint.pt").is_file()]
            if len(done) >= 3:  # epochs 0, 1, 2 on disk
                os.kill(proc.pid, signal.SIGKILL)
                break
            if time.time() - last_scrape > 0.5:
                last_scrape = time.time()
                for info in run.glob("workers/rank*.json"):
                    p = json.loads(info.read_text()).get("metrics_port")
                    body = _scrape(p) if p else None
                    if body:
                        out["scraped"].append(body)
            time.sleep(0.05)
        proc.wait(timeout=60)
        first_log = (tmp / "first.log").read_text()
        assert proc.returncode == -signal.SIGKILL, f"the run ended before epoch 2's checkpoint:\n{first_log[-4000:]}"
        out["first_log"] = first_log
        out["session_dir"] = json.loads((run / "driver.json").read_text())["session_dir"]
        out["workers_at_kill"] = [json.loads(p.read_text()) for p in sorted(run.glob("workers/rank*.json"))]
        deadline = time.time() + 60  # the killed driver's workers end (a clean exit removes its entry)
        while time.time() < deadline and any(_pid_alive(w["pid"]) for w in out["workers_at_kill"]):
            time.sleep(0.5)
        out["sd_before_rerun"] = sorted(p.name for p in Path(DEFAULT_SD_DIR).glob(f"tsn-{name}-rank*.json"))
        readable = []  # what the rerun finds: after the orphaned workers stopped writing
        for d in run.glob("checkpoint_*"):
            try:
                readable.append((load_checkpoint(d / "checkpoint.pt")["step"], d.name))
            except (FileNotFoundError, ValueError):
                pass
        out["newest_at_kill"] = max(readable)[1]
        rerun = start_tsn(args, tmp / "rerun.log")
        rc = rerun.wait(timeout=400)
        out["rerun_log"] = (tmp / "rerun.log").read_text()
        assert rc == 0, out["rerun_log"][-4000:]
    finally:
        for s in taken:
            s.close()
    out["sd_after"] = sorted(p.name for p in Path(DEFAULT_SD_DIR).glob(f"tsn-{name}-rank*.json"))
    return out


@pytest.mark.slow
def test_lost_driver_resumes_from_the_newest_complete_checkpoint_without_redoing_an_epoch(lost_driver):
    run, log = lost_driver["run"], lost_driver["rerun_log"]
    newest = lost_driver["newest_at_kill"]
    assert f"[tsn] resuming from {run / newest} " in log, log[-4000:]
    assert history_epochs(run) == [0, 1, 2, 3, 4, 5]  # before: [0, 1, 2, 3, 2, 3, 4, 5]
    results = json.loads((run / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [0, 1, 2, 3, 4, 5]
    steps = sorted({r["step"] for r in map(json.loads, (run / "steps" / "rank0.jsonl").read_text().splitlines())})
    assert steps == list(range(1, results["steps"] + 1))


@pytest.mark.slow
def test_lost_driver_rerun_prunes_checkpoints_agents_and_discovery_entries(lost_driver):
    from cluster.recovery import checkpoint_dirs, session_processes

    run = lost_driver["run"]
    index = json.loads((run / "checkpoints.json").read_text())
    indexed = {e["file"] for e in index["checkpoints"]}
    with_file = [d.name for d in checkpoint_dirs(run) if (d / "checkpoint.pt").is_file()]
    assert set(with_file) == indexed and len(with_file) <= 2 + 1  # keep_last 2 + the best
    # Issue 22: the kept checkpoints are the only directories (before: an empty one for every
    # checkpoint Ray had registered, which its run snapshot checked on a restart); the re-run
    # started without the killed driver's snapshot, which listed released ones.
    assert sorted(d.name for d in checkpoint_dirs(run)) == sorted(indexed)
    assert session_processes(lost_driver["session_dir"]) == []  # nothing of the killed driver's Ray cluster
    if lost_driver["sd_before_rerun"]:  # workers killed with their driver leave their entries
        assert f"removed {len(lost_driver['sd_before_rerun'])} stale Prometheus file-SD entr" in lost_driver["rerun_log"]
    assert lost_driver["sd_after"] == []


@pytest.mark.slow
def test_taken_metrics_ports_move_and_training_goes_on(lost_driver):
    port = lost_driver["port"]
    served = [w["metrics_port"] for w in lost_driver["workers_at_kill"]]
    assert len(served) == 2 and all(p and p not in (port, port + 1) for p in served), served
    assert f"metrics port {port} is in use" in lost_driver["first_log"]
    assert "Address already in use" not in lost_driver["first_log"] + lost_driver["rerun_log"]


@pytest.mark.slow
def test_skipped_samples_reach_step_records_results_and_prometheus(lost_driver):
    run = lost_driver["run"]
    results = json.loads((run / "results.json").read_text())
    assert results["skipped_samples"] == 1 and results["skipped_samples_by_split"]["train"] == 1
    records = [json.loads(line) for r in (0, 1) for line in (run / "steps" / f"rank{r}.jsonl").read_text().splitlines()]
    assert max(r.get("skipped_samples", 0) for r in records) == 1
    counted = [line for body in lost_driver["scraped"] for line in body.splitlines()
               if line.startswith("tsn_skipped_samples_total{") and not line.endswith(" 0.0")]
    assert counted, "no scrape showed the skipped sample"
