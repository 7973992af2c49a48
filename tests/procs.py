"""Process helpers shared by the tests that run `tsn` jobs and servers (not a conftest)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port P with P + 1 also free (two workers on one node serve on base + local rank)."""
    while True:
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("0.0.0.0", port + 1))
            return port
        except OSError:
            continue


def start_tsn(args: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """`tsn ARGS` in the background, output to ``log_path``."""
    env = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def wait_tsn(proc: subprocess.Popen, log_path: Path, timeout_s: float = 240) -> str:
    """Wait for a `start_tsn` process; its output. Fails (with the output's tail) on a timeout
    or a non-zero exit."""
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"tsn did not finish in {timeout_s}s:\n{Path(log_path).read_text()[-4000:]}")
    assert rc == 0, Path(log_path).read_text()[-4000:]
    return Path(log_path).read_text()
