"""A real Prometheus (Debian's package, installed by scripts/setup.sh) scrapes a real `tsn train`
run through the discovery the product writes, then every query the product ships is evaluated
through Prometheus's HTTP API.

* Prometheus runs on loopback with k8s/monitoring/prometheus-local.yml, changed only where a
  test must: 1 s scrape/evaluation intervals, absolute paths, its own TSDB directory. The scrape
  targets come from the file service discovery the workers write (/tmp/ray/tsn_prom_sd/) and
  Ray's own discovery file, exactly as for a user.
* Every query of every panel of k8s/monitoring/tsn-training.json (Grafana's variables filled in
  for this run) must parse and return data over the run's time span; every alert expression of
  tsn-alerts.yaml must parse, and every rule must evaluate healthy in Prometheus's rule manager.
* No series carries an ``exported_*`` label: the workers' own run/rank/node labels and the
  discovery entries' target labels must not clash (honor_labels in the tsn job).
* `tsn dashboard --prometheus` renders the run from the same Prometheus.
* The Ray run's checkpoints end as the config's retention rule says (read-only on its run dir).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from procs import free_port, free_port_pair, start_tsn, wait_tsn

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MON = ROOT / "k8s" / "monitoring"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: scripts/setup.sh installs Debian's prometheus package"
    tmp = tmp_path_factory.mktemp("prometheus")
    cfg = yaml.safe_load((MON / "prometheus-local.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(MON / f) for f in cfg["rule_files"]]
    for job in cfg["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["refresh_interval"] = "1s"
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2).read()
                break
            except OSError:
                assert time.time() < deadline, "Prometheus did not become ready in 60 s"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def api(url: str, endpoint: str, **params) -> dict:
    from cluster.dashboard import prometheus_get

    return prometheus_get(url, endpoint, params)


@pytest.fixture(scope="module")
def scraped_run(prometheus, packed_jpeg, tmp_path_factory):
    """A 2-worker run of ~30 s; returns its name, directory and the time span it trained in."""
    storage = tmp_path_factory.mktemp("prom-runs")
    name = f"prom-{secrets.token_hex(3)}"
    log = storage / "train.log"
    t0 = time.time()
    proc = start_tsn(["train", "--set", f"data.shards={packed_jpeg}", "--set", f"run.storage_path={storage}",
                      "--set", f"run.name={name}", "--set", f"metrics.port={free_port_pair()}",
                      "--set", "train.batch_size_per_worker=2", "--set", "train.epochs=12",
                      "--set", "model.test_segments=3", "--set", "loader.num_threads=1",
                      "--set", "cluster.num_workers=2"], log)
    # While it trains: both workers must become scrape targets through the discovery files.
    up_ranks: set[str] = set()
    while proc.poll() is None and len(up_ranks) < 2 and time.time() - t0 < 200:
        targets = api(prometheus, "targets")["activeTargets"]
        up_ranks = {t["labels"].get("rank") for t in targets
                    if t["labels"].get("run") == name and t["health"] == "up"}
        time.sleep(1)
    wait_tsn(proc, log, timeout_s=300)
    t1 = time.time()
    time.sleep(2)  # the last scrape and rule evaluation
    return {"name": name, "run_dir": storage / name, "start": t0, "end": t1, "up_ranks": up_ranks}


def dashboard_queries() -> list[tuple[str, str]]:
    from cluster.dashboard import dashboard_panels

    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p["targets"]]


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((MON / "tsn-alerts.yaml").read_text())["groups"] for r in g["rules"]]


def test_workers_were_discovered_and_scraped(scraped_run):
    assert scraped_run["up_ranks"] == {"0", "1"}


def test_every_dashboard_query_parses_and_returns_data(prometheus, scraped_run):
    from cluster.dashboard import exact_match, fill_variables

    queries = dashboard_queries()
    assert len(queries) >= 20
    empty, errors = [], []
    for title, expr in queries:
        q = fill_variables(expr, run=exact_match(scraped_run["name"]), rate_interval="10s")
        try:
            result = api(prometheus, "query_range", query=q, start=scraped_run["start"], end=scraped_run["end"],
                         step="1")["result"]
        except Exception as e:
            errors.append(f"{title}: {q}: {e}")
            continue
        if not any(s["values"] for s in result):
            empty.append(f"{title}: {q}")
    assert not errors, "\n".join(errors)
    assert not empty, "panels without data for a finished run:\n" + "\n".join(empty)


def test_training_series_carry_the_run_and_sane_values(prometheus, scraped_run):
    name = scraped_run["name"]
    # Over the last minutes: once the workers are gone their series are marked stale.
    steps = api(prometheus, "query", query=f'max by (rank) (max_over_time(tsn_global_step{{run="{name}"}}[5m]))',
                time=scraped_run["end"])["result"]
    last = {s["metric"]["rank"]: float(s["value"][1]) for s in steps}
    results = json.loads((scraped_run["run_dir"] / "results.json").read_text())
    # Sampled once a second: the last scraped step is at most a few steps behind the real last one.
    assert set(last) == {"0", "1"} and all(0 < v <= results["steps"] for v in last.values()), last
    top1 = api(prometheus, "query", query=f'max(max_over_time(tsn_eval_top1_ratio{{run="{name}"}}[5m]))',
               time=scraped_run["end"])["result"]
    assert top1 and 0.0 <= float(top1[0]["value"][1]) <= 1.0


def test_no_exported_labels(prometheus, scraped_run):
    """Issue 16: target labels that repeat a series' own labels turn them into exported_run,
    exported_rank, exported_node; none may appear, on any job (tsn workers and Ray alike)."""
    span = {"start": scraped_run["start"], "end": scraped_run["end"] + 2}
    names = api(prometheus, "labels", **span)
    assert {"run", "rank", "node", "job", "instance"} <= set(names)
    assert not [n for n in names if n.startswith("exported_")], names
    series = api(prometheus, "series", **{"match[]": f'{{job="tsn", run="{scraped_run["name"]}"}}'}, **span)
    # Prometheus' own ALERTS / ALERTS_FOR_STATE series copy an alert's labels and add alertname,
    # alertstate: not scraped series (a target-down alert may go pending as the run's endpoints close)
    series = [s for s in series if not s["__name__"].startswith("ALERTS")]
    assert series
    own = {"__name__", "job", "instance", "run", "rank", "node", "le", "stage"}  # stage: input stages
    assert {k for s in series for k in s} <= own, {k for s in series for k in s} - own
    assert not [s["__name__"] for s in series if s["__name__"].endswith("_created")]


def test_ray_run_keeps_exactly_what_the_config_says(scraped_run):
    """More checkpoints written (one per epoch) than kept: the index and the files on storage
    are exactly the retention rule's choice (app.run_store.retained: the keep_last latest plus
    the best by val top-1), and dropped checkpoints leave no directory (issue 22)."""
    from app.config import load_config
    from app.run_store import RunStore, retained

    run_dir = scraped_run["run_dir"]
    cfg = load_config(run_dir / "config.yaml").checkpoint
    store = RunStore(run_dir)
    history = store.read_history()
    written = [{"step": h["step"], "metrics": {"val_top1": h["val_top1"]}} for _, h in sorted(history.items())]
    assert len(written) == 12 > cfg.keep_last + 1, "the run must write more checkpoints than it keeps"
    expected = [e["step"] for e in retained(written, keep_last=cfg.keep_last, keep_best=cfg.keep_best)]
    index = json.loads((run_dir / "checkpoints.json").read_text())
    assert [e["step"] for e in index["checkpoints"]] == expected
    assert index["latest"] == index["checkpoints"][-1]["file"]
    assert index["best"] == max(index["checkpoints"], key=lambda e: (e["metrics"]["val_top1"], e["step"]))["file"]
    dirs = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert {p.name for p in dirs} == {e["file"] for e in index["checkpoints"]}  # before: all 12, 9 empty
    assert all((p / "checkpoint.pt").is_file() for p in dirs)


def test_every_alert_expression_parses_and_every_rule_is_healthy(prometheus, scraped_run):
    for rule in alert_rules():
        api(prometheus, "query", query=rule["expr"], time=scraped_run["end"])  # raises on a parse error
    groups = api(prometheus, "rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert {r["alert"] for r in alert_rules() if "alert" in r} <= set(loaded)
    unhealthy = {n: r.get("lastError") for n, r in loaded.items() if r["health"] != "ok"}
    assert not unhealthy, unhealthy


def test_tsn_dashboard_renders_the_run_from_prometheus(prometheus, scraped_run, tmp_path):
    out = tmp_path / "prom.png"
    r = subprocess.run([str(Path(__import__("sys").executable)), "-m", "cli.main", "dashboard", str(scraped_run["run_dir"]),
                        "--prometheus", prometheus, "--rate-interval", "10s", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and out.stat().st_size > 20_000
    assert "no data" not in r.stdout, r.stdout
