"""`tools.shaping_proxy`: the loopback proxy that gives the test S3 server (moto, `s3.py`) the
shape of real object storage - per-request latency, a shared bandwidth cap, outages - and its
safety rails (loopback upstreams only, dies with its parent)."""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import threading
import time

import boto3
import numpy as np
import pytest
from botocore.config import Config
from botocore.exceptions import (ConnectionClosedError, EndpointConnectionError, IncompleteReadError,
                                 ReadTimeoutError, ResponseStreamingError)
from s3 import BUCKET, REGION, client, start_server, stop_server

from tools.shaping_proxy import ROOT, ProxyProcess

MB = 10**6
BIG = 20 * MB
MID = 2 * MB


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One moto server for the module, holding a small, a 2 MB and a 20 MB random object."""
    srv, proc = start_server(tmp_path_factory.mktemp("shaping-s3") / "moto.log")
    try:
        rng = np.random.default_rng(0)
        objects = {"shaping/small": rng.bytes(1000), "shaping/mid": rng.bytes(MID), "shaping/big": rng.bytes(BIG)}
        c = client(srv)
        for key, body in objects.items():
            c.put_object(Bucket=BUCKET, Key=key, Body=body)
        yield srv, objects
    finally:
        stop_server(proc)


def upstream(srv: dict) -> str:
    return srv["endpoint"].removeprefix("http://")


def s3_via(srv: dict, endpoint: str, **config):
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=srv["access_key"],
                        aws_secret_access_key=srv["secret_key"], config=Config(**config) if config else None)


def timed_get(c, key: str) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    body = c.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return time.perf_counter() - t0, body


def in_range(measure, lo: float, hi: float, attempts: int = 3, hard_floor: bool = False):
    """``measure()`` -> a number or a tuple of numbers, all of which must lie in [lo, hi].
    Wall-clock checks on a shared machine: a measurement slowed by other processes (too
    high) is taken again, up to ``attempts`` times; with ``hard_floor`` a value below ``lo``
    fails at once (the proxy must never be faster than its shaping allows)."""
    seen = []
    for _ in range(attempts):
        values = measure()
        values = values if isinstance(values, tuple) else (values,)
        seen.append(values)
        if hard_floor and min(values) < lo:
            pytest.fail(f"faster than the shaping allows: {values} < {lo}")
        if all(lo <= v <= hi for v in values):
            return values
    pytest.fail(f"not within [{lo}, {hi}] in {attempts} attempts: {seen}")


def test_latency_is_added_once_per_request(server):
    srv, objects = server
    with ProxyProcess(upstream(srv), latency_ms=50, bandwidth_mbps=0) as proxy:
        direct, shaped = client(srv), s3_via(srv, proxy.endpoint)
        for c in (direct, shaped):  # connections and signing set up outside the timed loop
            assert timed_get(c, "shaping/small")[1] == objects["shaping/small"]
        assert proxy.stats()["by_method"] == {"GET": 1}

        def added_ms() -> float:
            proxy.reset()
            direct_s, shaped_s = [], []
            for _ in range(20):  # interleaved: a busy moment of the machine costs both sides alike
                direct_s.append(timed_get(direct, "shaping/small")[0])
                shaped_s.append(timed_get(shaped, "shaping/small")[0])
            stats = proxy.stats()
            # GetObject is one HTTP request (no HEAD, no retries). moto's server (werkzeug)
            # answers every request with "Connection: close", so each GET is also a new
            # connection - the latency is counted per request either way.
            assert stats["requests"] == 20 and stats["by_method"] == {"GET": 20}, stats
            assert stats["accepted"] <= 20, stats
            assert stats["bytes_down"] > 20 * len(objects["shaping/small"]) and stats["bytes_up"] > 0
            return (statistics.median(shaped_s) - statistics.median(direct_s)) * 1000

        in_range(added_ms, 40, 90)


def test_bandwidth_cap_is_shared_by_all_connections(server):
    srv, objects = server
    with ProxyProcess(upstream(srv), latency_ms=0, bandwidth_mbps=40) as proxy:
        clients = [s3_via(srv, proxy.endpoint) for _ in range(2)]
        for c in clients:
            timed_get(c, "shaping/small")

        def one() -> float:
            elapsed, body = timed_get(clients[0], "shaping/big")
            assert body == objects["shaping/big"]
            return elapsed

        in_range(one, 0.375, 0.625, hard_floor=True)  # 20 MB at 40 MB/s: 0.5 s +-25%

        def two_at_once() -> tuple[float, float]:
            results: list = [None, None]

            def download(i):
                results[i] = timed_get(clients[i], "shaping/big")

            threads = [threading.Thread(target=download, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            assert all(r is not None and r[1] == objects["shaping/big"] for r in results)
            return results[0][0], results[1][0]

        in_range(two_at_once, 0.75, 1.35, hard_floor=True)  # one cap for both: each takes ~2x
        assert proxy.stats()["bytes_down"] >= 3 * BIG


def test_outage_breaks_downloads_and_refuses_connections_until_restart(server):
    srv, objects = server
    with ProxyProcess(upstream(srv), latency_ms=5, bandwidth_mbps=10) as proxy:
        c = s3_via(srv, proxy.endpoint, retries={"max_attempts": 1, "mode": "standard"})
        assert timed_get(c, "shaping/small")[1] == objects["shaping/small"]

        stopper = threading.Timer(0.5, proxy.stop_serving)
        t0 = time.perf_counter()
        stopper.start()
        try:
            # 20 MB at 10 MB/s would take 2 s: the outage at 0.5 s cuts the body short.
            with pytest.raises((ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError)):
                c.get_object(Bucket=BUCKET, Key="shaping/big")["Body"].read()
        finally:
            stopper.join()
        assert time.perf_counter() - t0 >= 0.45
        stats = proxy.stats()
        assert stats["connections"] == 0 and 0 < stats["bytes_down"] < BIG, stats  # cut mid-body

        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
        with pytest.raises(EndpointConnectionError):
            c.get_object(Bucket=BUCKET, Key="shaping/small")

        proxy.start_serving()
        elapsed, body = timed_get(c, "shaping/mid")
        assert body == objects["shaping/mid"] and elapsed >= 0.15  # still shaped after the restart
        assert proxy.stats()["accepted"] == 3  # the refused attempts never reached the proxy


def test_a_non_loopback_upstream_is_refused():
    run = subprocess.run([sys.executable, "-m", "tools.shaping_proxy", "--upstream", "10.1.2.3:80",
                          "--latency-ms", "20", "--bandwidth-mbps", "200"],
                         cwd=ROOT, capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
    assert run.returncode == 2
    assert "10.1.2.3" in run.stderr and "not a loopback address" in run.stderr, run.stderr
    assert run.stdout == ""  # never started listening
    with pytest.raises(RuntimeError, match="not a loopback address"):
        ProxyProcess("example.com:443", latency_ms=0, bandwidth_mbps=0).start()


def test_the_proxy_exits_when_its_stdin_closes(server):
    srv, _ = server
    proxy = ProxyProcess(upstream(srv), latency_ms=0, bandwidth_mbps=0).start()
    try:
        port = proxy.port
        proxy.proc.stdin.close()  # as when the parent dies
        assert proxy.proc.wait(timeout=5) == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        proxy.close()
