#!/usr/bin/env bash
# The main job on the embedded default, after the idempotent set-up: generate the synthetic
# action dataset and pack it into WebDataset shards (first run), train TSN on a local Ray cluster
# (2 DDP workers, checkpoints, live metrics), evaluate the best checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tsn train "$@"
