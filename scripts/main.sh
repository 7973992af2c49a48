#!/usr/bin/env bash
# The main job on the embedded default, after the idempotent set-up: generate the synthetic
# action dataset, pack it into WebDataset shards, stream it through the DALI pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tsn stream "$@"
