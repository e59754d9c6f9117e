#!/usr/bin/env bash
# bench/paper_protocol.py on a lent GPU machine (the workplace's `device` tool). That machine's image
# has torch and torchvision but not torch-pruning, reaches no package index, and does not see
# ../shared, so what the run needs travels in .device/ (git-ignored):
#
#   bash bench/device_protocol.sh prepare                  # here: the torch-pruning wheel + the CIFAR-10 tarball
#   run(command="bash bench/device_protocol.sh run 8 --networks cifar_resnet18 ...", carry=[".device"], timeout_s=600)
#
# `run MINUTES [paper_protocol args]` starts no new row after MINUTES (--max-minutes), then writes the
# report; results.csv, results.md, accuracy_vs_level.png, config.json and protocol.log come back in
# $OUT. A later lease resumes: copy a returned results.csv and config.json into .device/resume/ first
# (base and agnostic models are retrained there; results are deterministic for a seed and device).
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=.device
PY=${PYTHON:-python3}

case "${1:-}" in
prepare)
  mkdir -p "$DEV"
  version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('torch-pruning'))")
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d "$DEV" "torch-pruning==$version"
  cp ../shared/data/cifar10-train.tar.gz "$DEV/"
  ls -l "$DEV"
  ;;
run)
  minutes=${2:?usage: device_protocol.sh run MINUTES [paper_protocol args]}
  shift 2
  : "${OUT:?set by the device tool: its output folder}"
  site=/tmp/edgetune-site
  "$PY" -m pip install -q --no-deps --no-index --target "$site" "$DEV"/torch_pruning-*.whl
  work=/tmp/edgetune-protocol
  mkdir -p "$work"
  if [ -d "$DEV/resume" ]; then cp "$DEV"/resume/* "$work/"; fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  status=0
  PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 "$PY" bench/paper_protocol.py --data "$DEV/cifar10-train.tar.gz" \
    --cache /tmp/edgetune-cache --out "$work" --max-minutes "$minutes" "$@" 2>&1 | tee "$OUT/protocol.log" || status=$?
  for f in results.csv results.md accuracy_vs_level.png config.json; do
    if [ -f "$work/$f" ]; then cp "$work/$f" "$OUT/"; fi
  done
  exit "$status"
  ;;
*)
  echo "usage: bash bench/device_protocol.sh prepare | run MINUTES [paper_protocol args]" >&2
  exit 2
  ;;
esac
