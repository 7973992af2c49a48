#!/usr/bin/env bash
# The MLflow tracking server the tests start (tests/test_tracking.py), in its own virtual
# environment .venv-mlflow/ with the pins of requirements-mlflow-server.lock. A tracking server
# is a service of its own: the training image has only the client (mlflow-skinny in
# requirements.lock), and the full mlflow package pins pyarrow < 26, older than the project's.
# Idempotent: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3.11; command -v "$PY" >/dev/null || PY=python3
[ -x .venv-mlflow/bin/python ] || "$PY" -m venv .venv-mlflow
stamp=".venv-mlflow/.installed-$(sha256sum requirements-mlflow-server.lock | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing the MLflow tracking server into .venv-mlflow (first run: ~1 min)"
  quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2); }
  quiet .venv-mlflow/bin/python -m pip install -q --upgrade pip
  quiet .venv-mlflow/bin/python -m pip install -q -r requirements-mlflow-server.lock
  rm -f .venv-mlflow/.installed-*
  touch "$stamp"
fi
