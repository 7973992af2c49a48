"""`tsn dashboard` pieces that need no server: variable filling, run-name escaping, the panels
drawn from a run directory's logs (the Prometheus path is tested in test_prometheus.py)."""

from __future__ import annotations

import json
import os
import re

import pytest

from cluster import dashboard


@pytest.mark.parametrize("expr, kwargs, expected", [
    ('tsn_train_loss{run=~"$run", rank=~"$rank"}', {"run": "a", "rank": "1"}, 'tsn_train_loss{run=~"a", rank=~"1"}'),
    ('rate(x{run=~"$run"}[$__rate_interval])', {"run": "r", "rate_interval": "15s"}, 'rate(x{run=~"r"}[15s])'),
    ("increase(x[$__range])", {"range_s": 90.4}, "increase(x[90s])"),
    ('x{run=~"${run}"}', {"run": "b"}, 'x{run=~"b"}'),
    ("time() - max(y)", {}, "time() - max(y)"),
])
def test_fill_variables(expr, kwargs, expected):
    assert dashboard.fill_variables(expr, **kwargs) == expected


@pytest.mark.parametrize("name, expected", [
    ("full", "full"),
    ("prom-1a", "prom\\\\-1a"),        # in PromQL source: prom\\-1a -> the regex prom\-1a
    ("a.b", "a\\\\.b"),
    ('q"x', 'q\\"x'),
])
def test_exact_match_is_a_promql_string_body(name, expected):
    body = dashboard.exact_match(name)
    assert body == expected
    # PromQL string escapes are Go's: undo them and the regex matches exactly the name.
    regex = body.replace('\\"', '"').replace("\\\\", "\\")
    assert re.fullmatch(regex, name) and not re.fullmatch(regex, name + "x")


def test_every_dashboard_panel_is_read():
    panels = dashboard.dashboard_panels()
    titles = [p["title"] for p in panels]
    assert "Throughput per rank (videos/s)" in titles and "Data-wait fraction" in titles
    assert all(t["expr"] for p in panels for t in p["targets"])


def _write_run(run_dir, ranks=2, steps=6, resumed_from=None):
    (run_dir / "steps").mkdir(parents=True)
    for rank in range(ranks):
        lines = []
        for step in range(1, steps + 1):
            lines.append({"time": 1000.0 + step, "epoch": (step - 1) // 3, "step": step, "step_in_epoch": (step - 1) % 3 + 1,
                          "steps_per_epoch": 3, "loss": 2.0 - 0.1 * step, "lr": 0.01, "step_s": 0.5,
                          "data_wait_s": 0.1 * (rank + 1), "videos": 4, "frames": 12, "skipped_samples": 0})
        if resumed_from:  # a restart re-logs steps from the checkpoint on, with other values
            lines += [{**r, "loss": 9.0} for r in lines if r["step"] > resumed_from]
        text = "".join(json.dumps(r) + "\n" for r in lines)
        (run_dir / "steps" / f"rank{rank}.jsonl").write_text(text + ('{"step": 7, "lo' if rank == 0 else ""))
    (run_dir / "history.jsonl").write_text("".join(json.dumps(
        {"epoch": e, "step": 3 * (e + 1), "train_loss": 1.5, "val_top1": 0.5, "val_top5": 0.9,
         "val_mean_class_accuracy": 0.4}) + "\n" for e in range(2)))


def test_panels_from_logs(tmp_path, capsys):
    _write_run(tmp_path, resumed_from=4)
    panels = {p["title"]: p for p in dashboard.panels_from_logs(tmp_path)}
    wait = {label: ys for label, _, ys in panels["Data-wait fraction"]["series"]}
    assert wait == {"rank 0": pytest.approx([0.2] * 6), "rank 1": pytest.approx([0.4] * 6)}
    loss = {label: (xs, ys) for label, xs, ys in panels["Training loss"]["series"]}
    assert loss["rank 1"][0] == [1, 2, 3, 4, 5, 6]
    assert loss["rank 1"][1][-1] == 9.0  # the re-logged step wins (window 1 at 6 steps: no smoothing)
    assert loss["epoch mean"] == ([3, 6], [1.5, 1.5])
    assert {label for label, _, _ in panels["Validation accuracy"]["series"]} == {"top-1", "top-5", "mean class acc."}
    assert "unreadable line skipped" in capsys.readouterr().err  # the cut-off line, not a crash


def test_dashboard_cli_writes_png(tmp_path):
    from cli.main import main

    _write_run(tmp_path / "run")
    assert main(["dashboard", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "dashboard.png").stat().st_size > 10_000


def test_dashboard_cli_errors(tmp_path, capsys):
    from cli.main import main

    assert main(["dashboard", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["dashboard", str(tmp_path / "empty")]) == 2
    assert "no step logs" in capsys.readouterr().err
    _write_run(tmp_path / "run")
    assert main(["dashboard", str(tmp_path / "run"), "--prometheus", "http://127.0.0.1:9"]) == 2
    assert "cannot reach Prometheus" in capsys.readouterr().err


def test_dashboard_json_ships_in_the_wheel(tmp_path):
    """The Grafana dashboard is package data: a wheel built from the project holds the file
    (cluster/grafana/tsn-training.json links to k8s/monitoring/, where kustomize needs it), and
    the installed package reads its own copy, with no checkout involved."""
    import shutil
    import subprocess
    import sys
    import tomllib
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    deployed = root / "k8s" / "monitoring" / "tsn-training.json"
    src = tmp_path / "src"  # a copy of what a wheel is built from (the checkout stays clean)
    (src / "k8s" / "monitoring").mkdir(parents=True)
    shutil.copy2(root / "pyproject.toml", src)
    shutil.copy2(deployed, src / "k8s" / "monitoring")
    include = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for top in sorted({p.rstrip("*") for p in include}):
        shutil.copytree(root / top, src / top, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    assert (src / "cluster" / "grafana" / "tsn-training.json").is_symlink()
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        assert z.read("cluster/grafana/tsn-training.json") == deployed.read_bytes()
        z.extractall(site)
    # The extracted wheel first on the path (the editable install's finder comes after it).
    code = ("import cluster.dashboard as d; print(d.__file__); print(d.DASHBOARD_JSON); "
            "print(len(d.dashboard_panels()))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    module, data, n = r.stdout.split()
    assert Path(module).is_relative_to(site) and Path(data).is_relative_to(site)
    assert not Path(data).is_symlink() and int(n) == len(dashboard.dashboard_panels()) > 0
