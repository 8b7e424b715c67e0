#!/bin/sh
# Build an importable copy of the package at $1/tvmrt (tvmrt/ + monitor/ + eapps/ laid out
# as installed) to try changes without touching the repo:
#   tools/mkscratch.sh /tmp/scratch && PYTHONPATH=/tmp/scratch /tmp/venv/bin/python -m tvmrt bench
set -e
dest=${1:?usage: mkscratch.sh DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$dest/tvmrt"
mkdir -p "$dest"
cp -r "$root/tvmrt" "$dest/tvmrt"
cp -r "$root/monitor" "$dest/tvmrt/monitor"
cp -r "$root/eapps" "$dest/tvmrt/eapps"
find "$dest/tvmrt" -name __pycache__ -prune -exec rm -rf {} +
# the editable install's finder would win over PYTHONPATH: drop it in every process
cat > "$dest/sitecustomize.py" <<'PY'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "_EditableFinder" not in repr(f)]
PY
