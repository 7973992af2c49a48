"""Write prometheusrule.yaml from tsn-alerts.yaml (the PrometheusRule carries the same groups).

    .venv/bin/python k8s/monitoring/make_prometheusrule.py          # rewrite
    .venv/bin/python k8s/monitoring/make_prometheusrule.py --check  # exit 1 when out of date

tests/test_monitoring_assets.py asserts both files hold identical rule groups.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "tsn-alerts.yaml"
OUT = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from tsn-alerts.yaml by make_prometheusrule.py: do not edit by hand.
# The alert rules of the plain Prometheus rules file, as a PrometheusRule for the Prometheus
# Operator (kube-prometheus-stack selects rules by label: see docs/monitoring.md).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: tsn-alerts
  labels:
    app.kubernetes.io/component: monitoring
spec:
"""


def render(rules_text: str) -> str:
    lines = rules_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "\n".join(("  " + line) if line.strip() else "" for line in lines[start:])
    return HEADER + body.rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render(RULES.read_text())
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
