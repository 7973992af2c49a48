#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: Debian packages, the project's virtual environment at
# .venv/ with the pinned packages of requirements.lock, and the project itself (editable, so the
# `tsn` command is .venv/bin/tsn). Re-running is cheap: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the project runs (none needed by the data path: PyAV, OpenCV and DALI bundle
# their own FFmpeg / libjpeg-turbo).
APT_PACKAGES=(prometheus)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=""
for c in python3.11 python3; do
  if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY="$c"; break; fi
done
[ -n "$PY" ] || { echo "setup: Python 3.11 is required (the pinned torch/DALI wheels are cp311)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.installed-$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing pinned packages into .venv (first run: ~2 min, ~7 GB)"
  # (pip's warnings about this machine's unused local package mirrors are filtered out)
  quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2); }
  quiet .venv/bin/python -m pip install -q --upgrade pip
  # opencv-contrib-python-headless replaced opencv-python-headless (both install cv2/): a venv
  # made before the switch must lose the old one, or the two overwrite each other's files.
  if .venv/bin/python -m pip show -q opencv-python-headless >/dev/null 2>&1; then
    quiet .venv/bin/python -m pip uninstall -y -q opencv-python-headless opencv-contrib-python-headless
  fi
  quiet .venv/bin/python -m pip install -q -r requirements.lock
  quiet .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  rm -f .venv/.installed-*
  touch "$stamp"
fi
