"""Token authentication (Ray 2.60's default) from the product's Ray entry points (issue 24):

* the README's multi-node block, run line by line as written: a token, a head, a second node,
  `tsn train --address` (``RAY_AUTH_MODE`` unset: tsn joins with the token in ~/.ray/auth_token);
* `tsn pack --address` joins the same way;
* without the token both fail in one line naming the fix, no traceback, nothing packed.

The test's own home (the token lives there, never in the ~/.ray of whoever runs the tests), a
free port for 6379 and, appended to each `ray start`, its own temp dir and agent port; the
block's `ray stop` (which would stop every Ray cluster on the machine) is done by ending the
processes under that temp dir. `tsn train` gets the session's tiny dataset appended.
`tsn submit` / `tsn jobs` against a token cluster: tests/test_submit.py.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from procs import ROOT, free_port, free_port_pair

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
TINY = ["augment.input_size=32", "augment.resize_short=48", "model.backbone=tiny", "model.test_segments=3",
        "train.batch_size_per_worker=2", "train.test_batch_size_per_worker=3", "train.epochs=1", "optim.lr=0.01"]


def readme_block() -> list[str]:
    """The command lines of the README's multi-node block (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- multi-node-cluster -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines() if line.split("#", 1)[0].strip()]


def user_env(home: Path) -> dict:
    """A user's shell: no RAY_* variables, HOME as given, the venv's tools on the PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
    return env


def run_line(line: str, env: dict, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


def end_processes_under(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, every process whose command line names ``temp_dir`` (the
    cluster's raylets, GCS and workers), never another cluster's."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()
                if int(p) != os.getpid()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2 if pids else 0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The README block up to its `tsn train`: {address, env (with the token), lines, home}."""
    lines = readme_block()
    assert [shlex.split(x.split("=token ")[-1])[:2] for x in lines] == [
        [".venv/bin/ray", "get-auth-token"], [".venv/bin/ray", "start"], [".venv/bin/ray", "start"],
        [".venv/bin/tsn", "train"], [".venv/bin/ray", "stop"]], lines
    home = tmp_path_factory.mktemp("home")
    temp_dir = tempfile.mkdtemp(prefix="tsnauth-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    env = user_env(home)
    started = []
    try:
        for line in lines[:3]:
            line = line.replace("6379", str(port))
            if " start " in line:
                line += f" --temp-dir={temp_dir} --dashboard-agent-listen-port={free_port()}"
            r = run_line(line, env)
            assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
            started.append(line)
        assert (home / ".ray" / "auth_token").read_text().strip()
        yield {"address": f"127.0.0.1:{port}", "env": env, "lines": lines, "home": home, "temp_dir": temp_dir}
    finally:
        end_processes_under(temp_dir)


def test_the_readme_block_trains_on_a_token_cluster(cluster, packed_jpeg, tmp_path):
    train = cluster["lines"][3].replace("6379", cluster["address"].rsplit(":", 1)[1])
    assert "RAY_AUTH_MODE" not in train and "RAY_AUTH_MODE" not in cluster["env"]
    extra = [f"data.shards={packed_jpeg}", f"run.storage_path={tmp_path / 'ray'}", "run.name=auth",
             f"metrics.port={free_port_pair()}", *TINY]
    line = train + "".join(f" --set {shlex.quote(kv)}" for kv in extra) + f" --run-dir {tmp_path / 'run'}"
    r = run_line(line, cluster["env"], timeout_s=600)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    assert "joining the Ray cluster with the auth token from" in r.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["num_val_videos"] == 6


def test_pack_joins_a_token_cluster(cluster, synth_dir, tmp_path):
    out = tmp_path / "packed"
    r = run_line(f"{VENV_BIN}/tsn pack --input {synth_dir / 'labels.csv'} --out {out} --short-side 48 "
                 f"--shard-size 60000 --val-fraction 0.34 --no-progress --address {cluster['address']}", cluster["env"])
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 18


@pytest.mark.parametrize("command", ["train", "pack"])
def test_without_the_token_a_join_fails_in_one_line_naming_the_fix(cluster, packed_jpeg, synth_dir, tmp_path,
                                                                     command):
    env = user_env(tmp_path / "empty-home")  # a machine the token was never copied to
    args = {"train": f"train --address {cluster['address']} --set data.shards={packed_jpeg} "
                     f"--run-dir {tmp_path / 'run'}",
            "pack": f"pack --input {synth_dir / 'labels.csv'} --out {tmp_path / 'packed'} --short-side 48 "
                    f"--no-progress --address {cluster['address']}"}[command]
    r = run_line(f"{VENV_BIN}/tsn {args}", env)
    assert r.returncode == 2, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert f"the Ray cluster at {cluster['address']} uses token authentication and no token was found" in errors[0]
    assert "~/.ray/auth_token" in errors[0] and "RAY_AUTH_TOKEN" in errors[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "packed" / "manifest.json").exists()
