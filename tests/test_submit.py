"""`tsn submit` / `tsn jobs` against a real Ray head started here with `ray start --head`
(token authentication on, as Ray 2.60 deploys it), bounded in time and torn down.

The head runs in its own process group (`--block`), so teardown kills exactly it and its
children, never another Ray cluster on the machine. Its token comes from RAY_AUTH_TOKEN in
its environment; the clients get theirs the way `tsn` reads it (RAY_AUTH_TOKEN, or the file
named by RAY_AUTH_TOKEN_PATH), never from the ~/.ray of whoever runs the tests.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from procs import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def client_env(tmp_path: Path, token: str | None) -> dict:
    """The environment of a user's shell: the token in RAY_AUTH_TOKEN, or none anywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-such-token")  # never fall back to ~/.ray
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tsn(args, env, timeout_s=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray-head")
    token = secrets.token_hex(16)
    gcs_port, dash_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The job's entrypoint (`tsn train`) must be on the PATH of the processes the head starts.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=3",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         # the job agent's HTTP port: not Ray's default 52365, which another test's cluster may hold
         # (then the agent runs without HTTP and every submit fails "No available agent")
         f"--dashboard-agent-listen-port={free_port()}",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ray start exited {proc.returncode}:\n{(tmp / 'head.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:  # an answer (401 without the token): it is up
                break
            except OSError:
                if time.time() > deadline:
                    raise AssertionError(f"the Ray dashboard did not come up:\n{(tmp / 'head.log').read_text()[-3000:]}")
                time.sleep(1)
        yield {"address": address, "token": token, "tmp": tmp}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


def test_missing_token_is_a_clear_error(head, tmp_path):
    r = tsn(["jobs", "--address", head["address"], "list"], client_env(tmp_path, None))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "requires a Ray auth token and none was found" in r.stderr, r.stderr
    assert "RAY_AUTH_TOKEN" in r.stderr and "no-such-token" in r.stderr  # says where it looked
    assert "Traceback" not in r.stderr


def test_wrong_token_is_a_clear_error(head, tmp_path):
    r = tsn(["jobs", "--address", head["address"], "list"], client_env(tmp_path, "not-the-token"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "rejected the Ray auth token from RAY_AUTH_TOKEN" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_token_file_is_read_like_ray_does(head, tmp_path):
    (tmp_path / "token").write_text(head["token"] + "\n")
    env = client_env(tmp_path, None)
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "token")
    r = tsn(["jobs", "--address", head["address"], "list"], env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_config_fails_before_anything_is_submitted(head, tmp_path):
    env = client_env(tmp_path, head["token"])
    r = tsn(["submit", "--address", head["address"], "--config", "configs/default.yaml",
             "--set", "optim.lrr=0.1"], env)
    assert r.returncode == 2 and "optim.lrr" in r.stderr, r.stdout + r.stderr
    listed = tsn(["jobs", "--address", head["address"], "list"], env)
    assert listed.returncode == 0 and listed.stdout.strip() == "", listed.stdout


def test_submit_follow_then_jobs_commands(head, tmp_path, packed_jpeg):
    """A short training job submitted with the working directory, logs followed to the end."""
    env = client_env(tmp_path, head["token"])
    storage = tmp_path / "runs"
    r = tsn(["submit", "--address", head["address"], "--config", "configs/default.yaml", "--follow",
             "--job-id", "tsn-submit-test",
             "--set", f"data.shards={packed_jpeg}", "--set", f"run.storage_path={storage}",
             "--set", "run.name=submitted", "--set", "metrics.port=0", "--set", "cluster.num_workers=2",
             "--set", "train.epochs=2", "--set", "train.batch_size_per_worker=2", "--set", "model.test_segments=3", "--set", "loader.num_threads=1"],
            env, timeout_s=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.splitlines()[0] == "tsn-submit-test"  # the job id first, for scripts
    assert "[tsn] results" in r.stdout and "[tsn] epoch 1 done" in r.stdout, r.stdout[-4000:]
    assert "job tsn-submit-test: SUCCEEDED" in r.stderr
    results = json.loads((storage / "submitted" / "results.json").read_text())
    assert results["num_val_videos"] > 0 and 0.0 <= results["top1"] <= 1.0

    listed = tsn(["jobs", "--address", head["address"], "list"], env)
    assert listed.returncode == 0
    assert any(line.startswith("tsn-submit-test\tSUCCEEDED\ttsn train --config configs/default.yaml")
               for line in listed.stdout.splitlines()), listed.stdout
    status = tsn(["jobs", "--address", head["address"], "status", "tsn-submit-test"], env)
    assert status.returncode == 0 and status.stdout.strip() == "SUCCEEDED"
    logs = tsn(["jobs", "--address", head["address"], "logs", "tsn-submit-test"], env)
    assert logs.returncode == 0 and "[tsn] finished in" in logs.stdout
    unknown = tsn(["jobs", "--address", head["address"], "status", "no-such-job"], env)
    assert unknown.returncode == 2 and "no-such-job" in unknown.stderr and "Traceback" not in unknown.stderr


def test_stop_a_running_job(head, tmp_path, packed_jpeg):
    env = client_env(tmp_path, head["token"])
    r = tsn(["submit", "--address", head["address"], "--job-id", "tsn-stop-test",
             "--set", f"data.shards={packed_jpeg}", "--set", f"run.storage_path={tmp_path / 'runs'}",
             "--set", "metrics.port=0", "--set", "cluster.num_workers=1", "--set", "train.batch_size_per_worker=2",
             "--set", "train.epochs=1000"], env)
    assert r.returncode == 0, r.stderr
    deadline = time.time() + 60
    while tsn(["jobs", "--address", head["address"], "status", "tsn-stop-test"], env).stdout.strip() != "RUNNING":
        assert time.time() < deadline, "the job never started running"
        time.sleep(1)
    stop = tsn(["jobs", "--address", head["address"], "stop", "tsn-stop-test"], env)
    assert stop.returncode == 0 and stop.stdout.strip() == "stopping"
    deadline = time.time() + 60
    while (s := tsn(["jobs", "--address", head["address"], "status", "tsn-stop-test"], env).stdout.strip()) != "STOPPED":
        assert time.time() < deadline, f"the job did not stop (status {s})"
        time.sleep(1)


def test_a_reused_job_id_is_one_line_before_submitting(head, tmp_path):
    """Issue 17: Ray refuses a known submission id with a server-side traceback; `tsn submit`
    says so first, naming the id and its status."""
    env = client_env(tmp_path, head["token"])
    args = ["submit", "--address", head["address"], "--job-id", "tsn-reused-id",
            "--set", f"data.shards={tmp_path / 'no-dataset'}", "--set", "metrics.port=0"]
    first = tsn(args, env)  # accepted; the job itself fails on the cluster (no dataset there)
    assert first.returncode == 0 and first.stdout.strip() == "tsn-reused-id", first.stderr
    again = tsn(args, env)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr
    assert again.stderr.startswith("error: --job-id tsn-reused-id: ") and "already has a job with this id" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr
    listed = tsn(["jobs", "--address", head["address"], "list"], env)
    assert sum(line.startswith("tsn-reused-id\t") for line in listed.stdout.splitlines()) == 1
