"""`tsn dashboard` (CLI: `cli.dashboard`): the key panels of a run as one PNG, without Grafana.

Two sources, the same panels:

* ``--prometheus URL``: every timeseries panel of the Grafana dashboard the product ships
  (``cluster/grafana/tsn-training.json``, package data: a link to the file Kubernetes deploys,
  ``k8s/monitoring/tsn-training.json``), its PromQL queries run through Prometheus's HTTP API
  (``/api/v1/query_range``) over the run's time span, with the dashboard variables filled in
  (``$run`` = the run's name, ``$rank`` = all ranks). What Grafana would show, drawn by matplotlib.
* the run directory alone (default): the per-rank step logs ``steps/rank{R}.jsonl`` and the
  epoch log ``history.jsonl`` of the run store (`app.run_store`), so a run can be looked at
  anywhere (a laptop with the run directory copied over, a CI artifact). The x axis is the
  global step.

Output: ``RUN_DIR/dashboard.png`` (or ``--out``).
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from importlib import resources
from pathlib import Path

from app.run_store import RunStore

# Package data (pyproject.toml [tool.setuptools.package-data]): found in a source checkout and
# in an installed wheel alike.
DASHBOARD_JSON = resources.files("cluster") / "grafana" / "tsn-training.json"


# --------------------------------------------------------------------------------------------
# The dashboard's queries
# --------------------------------------------------------------------------------------------


def dashboard_panels(path=DASHBOARD_JSON) -> list[dict]:
    """Every panel with queries: ``{"title", "type", "unit", "targets": [{"expr", "legend"}]}``,
    in dashboard order (rows flattened). ``path``: a path or an `importlib.resources` file."""
    data = json.loads(path.read_text() if hasattr(path, "read_text") else Path(path).read_text())
    panels = []
    for p in _flatten(data.get("panels", [])):
        targets = [{"expr": t["expr"], "legend": t.get("legendFormat", "")}
                   for t in p.get("targets", []) if t.get("expr")]
        if targets:
            panels.append({"title": p.get("title", ""), "type": p.get("type", ""), "targets": targets,
                           "unit": p.get("fieldConfig", {}).get("defaults", {}).get("unit")})
    return panels


def _flatten(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_flatten(p.get("panels", [])))  # collapsed rows keep their panels inside
    return out


def fill_variables(expr: str, *, run: str = ".*", rank: str = ".*", rate_interval: str = "30s",
                   range_s: float = 3600.0) -> str:
    """A dashboard query with Grafana's variables replaced, ready for Prometheus.

    ``run`` and ``rank`` are regular expressions as they go between the double quotes of a
    ``=~`` matcher; `exact_match(name)` makes one for a single run."""
    values = {"$__rate_interval": rate_interval, "$__interval": rate_interval,
              "$__range": f"{int(max(range_s, 1))}s", "$run": run, "$rank": rank}
    # Longest names first: $__rate_interval before $__range, $rank before $run.
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name[1:] + "}", values[name]).replace(name, values[name])
    return expr


def exact_match(value: str) -> str:
    """``value`` as a regular expression matching only itself, written as the body of a PromQL
    double-quoted string (whose own escapes double every backslash: ``a-b`` -> ``a\\\\-b``)."""
    return re.escape(value).replace("\\", "\\\\").replace('"', '\\"')


# --------------------------------------------------------------------------------------------
# Prometheus HTTP API
# --------------------------------------------------------------------------------------------


class PrometheusError(RuntimeError):
    pass


def prometheus_get(base_url: str, endpoint: str, params: dict, timeout_s: float = 30.0) -> dict:
    """GET ``base_url/api/v1/<endpoint>``; the ``data`` of a success, else `PrometheusError`
    with Prometheus's own error text (e.g. a PromQL parse error)."""
    url = f"{base_url.rstrip('/')}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            body = json.loads(r.read().decode())
    except urllib.error.HTTPError as e:  # 400/422: bad query; the body says why
        try:
            body = json.loads(e.read().decode())
        except (ValueError, OSError):
            raise PrometheusError(f"{url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise PrometheusError(f"cannot reach Prometheus at {base_url}: {e}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
    return body["data"]


def query_range(base_url: str, expr: str, start_s: float, end_s: float, step_s: float) -> list[dict]:
    """``[{"metric": {labels}, "values": [[t, "v"], ...]}, ...]``."""
    data = prometheus_get(base_url, "query_range", {"query": expr, "start": f"{start_s:.3f}",
                                                      "end": f"{end_s:.3f}", "step": f"{step_s:g}"})
    return data.get("result", [])


def series_label(metric: dict, legend: str) -> str:
    """Grafana's ``legendFormat`` (``{{rank}}``) applied to a series' labels."""
    if legend:
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(metric.get(m.group(1), "")), legend)
    labels = {k: v for k, v in metric.items() if k != "__name__"}
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or metric.get("__name__", "value")


# --------------------------------------------------------------------------------------------
# Panels -> PNG
# --------------------------------------------------------------------------------------------


def render(panels: list[dict], out: str | Path, *, title: str, xlabel: str, columns: int = 3) -> Path:
    """``panels``: ``[{"title", "unit", "series": [(label, xs, ys), ...]}]`` -> one PNG grid."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for label, xs, ys in panel["series"]:
            ax.plot(xs, ys, label=label, linewidth=1.2, marker="." if len(xs) < 30 else None)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        if panel.get("unit") == "percentunit":
            ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if not panel["series"]:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif 1 < len(panel["series"]) <= 8:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)


def panels_from_prometheus(base_url: str, run: str, start_s: float, end_s: float, *,
                           rate_interval: str = "30s", dashboard=DASHBOARD_JSON) -> list[dict]:
    """The dashboard's timeseries panels over [start, end] (x: seconds since start)."""
    step_s = max(1.0, (end_s - start_s) / 300)
    panels = []
    for p in dashboard_panels(dashboard):
        if p["type"] != "timeseries":
            continue
        series = []
        for t in p["targets"]:
            expr = fill_variables(t["expr"], run=exact_match(run), rate_interval=rate_interval,
                                  range_s=end_s - start_s)
            for s in query_range(base_url, expr, start_s, end_s, step_s):
                xs = [float(v[0]) - start_s for v in s["values"]]
                ys = [float(v[1]) for v in s["values"]]
                series.append((series_label(s["metric"], t["legend"]), xs, ys))
        panels.append({"title": p["title"], "unit": p["unit"], "series": series})
    return panels


def _smooth(ys: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (step-to-step noise hides trends)."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def panels_from_logs(run_dir: str | Path) -> list[dict]:
    """The key panels from the run directory's logs (x: global step)."""
    store = RunStore(run_dir)
    ranks = store.read_step_logs()
    if not ranks:
        raise FileNotFoundError(f"{store.dir}: no step logs ({store.steps_dir.name}/rank*.jsonl): not a run "
                                f"directory of `tsn train`, or it has not trained a step yet")
    history = store.read_history()
    n_steps = max(len(r) for r in ranks.values())
    window = max(1, n_steps // 50)

    def per_rank(value, smooth=True):
        series = []
        for rank, records in sorted(ranks.items()):
            pts = [(r["step"], value(r)) for r in records]
            pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
            if pts:
                xs, ys = zip(*pts)
                series.append((f"rank {rank}", list(xs), _smooth(list(ys), window) if smooth else list(ys)))
        return series

    def rate(num, den):
        return lambda r: r[num] / r[den] if r.get(den) else None

    epochs = sorted(history)
    val = [(label, [history[e]["step"] for e in epochs], [history[e].get(key) for e in epochs])
           for key, label in (("val_top1", "top-1"), ("val_top5", "top-5"),
                              ("val_mean_class_accuracy", "mean class acc."))
           if all(history[e].get(key) is not None for e in epochs)] if epochs else []
    loss = per_rank(lambda r: r.get("loss"))
    if epochs and all("train_loss" in history[e] for e in epochs):
        loss.append(("epoch mean", [history[e]["step"] for e in epochs], [history[e]["train_loss"] for e in epochs]))
    return [
        {"title": "Throughput per rank (videos/s)", "unit": "short", "series": per_rank(rate("videos", "step_s"))},
        {"title": "Decoded frames per rank (frames/s)", "unit": "short", "series": per_rank(rate("frames", "step_s"))},
        {"title": "Data-wait fraction", "unit": "percentunit", "series": per_rank(rate("data_wait_s", "step_s"))},
        {"title": "Training loss", "unit": "none", "series": loss},
        {"title": "Learning rate", "unit": "sci", "series": per_rank(lambda r: r.get("lr"), smooth=False)[:1]},
        {"title": "Validation accuracy", "unit": "percentunit", "series": val},
        {"title": "Step time per rank (s)", "unit": "s", "series": per_rank(lambda r: r.get("step_s"))},
        {"title": "Skipped / corrupt samples (cumulative)", "unit": "short",
         "series": per_rank(lambda r: float(r.get("skipped_samples", 0)), smooth=False)},
        {"title": "Epoch progress", "unit": "percentunit",
         "series": per_rank(rate("step_in_epoch", "steps_per_epoch"), smooth=False)},
    ]


def run_time_span(run_dir: str | Path) -> tuple[float, float] | None:
    """(first, last) wall time of the run's logged steps, or None."""
    times = [r["time"] for records in RunStore(run_dir).read_step_logs().values() for r in records if "time" in r]
    return (min(times), max(times)) if times else None
