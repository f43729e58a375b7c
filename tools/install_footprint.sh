#!/usr/bin/env bash
# Install time and size on disk of the runtime install and of the full install, each in a fresh venv:
#   bash tools/install_footprint.sh /tmp/rt
# leaves DIR/venv-rt (runtime + [serve]) and DIR/venv-full (toolchain), which tools/runtime_parity.py then uses.
# pip's cache is whatever this machine has: say whether it was warm when quoting the times.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?usage: install_footprint.sh DIR}"
mkdir -p "$out" && cd "$out"
rm -rf venv-rt venv-full
pip_q() { "$1"/bin/pip install -q --disable-pip-version-check "${@:2}"; }
timed() { local s e; s=$(date +%s.%N); "$@"; e=$(date +%s.%N); echo "$e - $s" | bc; }
python3 -m venv venv-rt
echo "runtime install: $(timed pip_q venv-rt "$repo") s, $(du -sm venv-rt | cut -f1) MiB"
venv-rt/bin/pip list --format freeze --disable-pip-version-check > pip-list-runtime.txt
python3 -m venv venv-full
full() { pip_q venv-full torch==2.13.0 && pip_q venv-full "$repo[export]"; }
echo "full install: $(timed full) s, $(du -sm venv-full | cut -f1) MiB"
venv-full/bin/pip list --format freeze --disable-pip-version-check > pip-list-full.txt
echo "runtime [serve] extra: +$(timed pip_q venv-rt "$repo[serve]") s, $(du -sm venv-rt | cut -f1) MiB"
if grep -iqE '^(torch|transformers|onnx|safetensors)==' pip-list-runtime.txt; then
  echo "the runtime install pulled a toolchain package:" && grep -iE '^(torch|transformers|onnx|safetensors)==' pip-list-runtime.txt
  exit 1
fi
