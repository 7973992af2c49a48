#!/usr/bin/env bash
# The whole test suite (slow tests included), after the idempotent set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_mlflow_server.sh  # the tracking server tests/test_tracking.py starts
bash scripts/fetch_test_videos.sh  # real third-party test videos (tests/test_real_videos.py)
exec .venv/bin/python -m pytest -q "$@"
