"""`tsn dashboard`: a run's key panels as one PNG, from its logs or from Prometheus
(`cluster.dashboard`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from app.run_store import RunStore
from cluster import dashboard


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("dashboard", help="draw a run's key panels to PNG (from its logs or Prometheus)",
                              description="`tsn dashboard`: the key panels of a run as one PNG, without Grafana.")
    p.add_argument("run_dir", help="the run directory (tsn train's run.storage_path/run.name or --run-dir)")
    p.add_argument("--prometheus", metavar="URL", help="query this Prometheus (e.g. http://127.0.0.1:9090) "
                   "with the Grafana dashboard's queries instead of reading the logs")
    p.add_argument("--run", help="the run label in Prometheus (default: run.name from RUN_DIR/config.yaml)")
    p.add_argument("--start", type=float, help="unix time (default: the run's first logged step - 30 s)")
    p.add_argument("--end", type=float, help="unix time (default: its last logged step + 30 s, or now)")
    p.add_argument("--rate-interval", default="30s", help="what $__rate_interval becomes (default 30s)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/dashboard.png)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    store = RunStore(args.run_dir)
    if not store.dir.is_dir():
        print(f"error: {store.dir}: no such run directory", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else store.dashboard_png
    try:
        if args.prometheus:
            name = args.run or store.run_name()
            span = dashboard.run_time_span(store.dir)
            start = args.start if args.start is not None else (span[0] - 30 if span else time.time() - 3600)
            end = args.end if args.end is not None else (span[1] + 30 if span else time.time())
            panels = dashboard.panels_from_prometheus(args.prometheus, name, start, min(end, time.time()),
                                                      rate_interval=args.rate_interval)
            dashboard.render(panels, out, title=f"tsn run {name} (Prometheus {args.prometheus})", xlabel="seconds")
        else:
            panels = dashboard.panels_from_logs(store.dir)
            dashboard.render(panels, out, title=f"tsn run {store.dir.name} (logged metrics)", xlabel="global step")
    except (FileNotFoundError, dashboard.PrometheusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    empty = [p["title"] for p in panels if not p["series"]]
    print(f"{out} ({len(panels)} panels" + (f"; no data: {', '.join(empty)}" if empty else "") + ")")
    return 0
