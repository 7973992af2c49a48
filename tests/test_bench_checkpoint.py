"""`tsn bench-checkpoint` on a real local Ray cluster: both modes through the product's own
checkpoint path (cluster.ray_hooks), into a local directory and the loopback S3 server; the
benchmark's checkpoints are removed afterwards. Speeds are the benchmark's to report
(benchmarks/bench_checkpoint.py), not asserted here."""

import json
import subprocess
from pathlib import Path

import pytest
import s3

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def bench(storage: str, out: Path) -> dict:
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "tsn"), "bench-checkpoint", "--storage", storage,
                        "--models", "tiny", "--checkpoints", "2", "--steps-between", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "tiny_stall_ratio_background_vs_sync" in r.stdout  # the table
    return json.loads(out.read_text())


def check_rows(result: dict) -> None:
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"baseline", "sync", "background"}
    for mode in ("sync", "background"):
        r = rows[mode]
        assert r["checkpoints_indexed"] == 1  # keep_last 1: every checkpoint was committed, retention ran
        assert len(r["stall_per_checkpoint_s"]) == 2 and r["size_bytes"] > 10_000
        assert 0 < r["stall_median_s"] <= r["stall_max_s"] and r["overhead_ratio"] > 0
    assert result["tiny_stall_ratio_background_vs_sync"] == pytest.approx(
        rows["background"]["stall_median_s"] / rows["sync"]["stall_median_s"])


def test_bench_checkpoint_into_a_local_directory(tmp_path):
    local = tmp_path / "store"
    check_rows(bench(str(local), tmp_path / "local.json"))
    assert not list(local.iterdir())  # the benchmark's checkpoints are gone


def test_bench_checkpoint_into_object_storage(tmp_path, s3_env):
    uri = f"s3://{s3_env['bucket']}/bench"
    result = bench(uri, tmp_path / "s3.json")
    check_rows(result)
    assert result["storage"] == uri
    assert {k for k in s3.keys_under(s3_env, "bench/") if not k.endswith("/")} == set()  # directory markers only
