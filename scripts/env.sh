#!/usr/bin/env bash
# Create ./.venv and install edgetune into it with the given extras (default: dev).
# Idempotent: reinstalls only when pyproject.toml or the extras changed.
# On a Jetson (aarch64 with JetPack's torch importable) the venv sees the system site-packages
# so JetPack's CUDA torch/torchvision are used and never reinstalled; on x86 the pinned
# torch 2.14.1 / torchvision 0.29.1 are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EDGETUNE_VENV:-.venv}
EXTRAS=${1:-dev}
PY=${PYTHON:-python3}

jetson=0
if [ "$(uname -m)" = aarch64 ] && "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  jetson=1
fi

if [ ! -x "$VENV/bin/python" ]; then
  if [ "$jetson" = 1 ]; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi

stamp="$VENV/.edgetune-installed"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

log="$VENV/.edgetune-install.log"
pip() {
  # pip's output goes to a log (this machine's local package index prints a warning per package);
  # on failure the log is shown.
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >"$log" 2>&1; then
    grep -v "is ignored" "$log" >&2 || true
    echo "edgetune: pip install $* failed" >&2
    exit 1
  fi
}
if [ "$jetson" = 0 ] && ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "edgetune: installing torch 2.14.1 / torchvision 0.29.1 into $VENV" >&2
  pip install "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/python" -c "import torch, torchvision" || { echo "edgetune: torch install failed" >&2; exit 1; }
fi
echo "edgetune: installing edgetune[$EXTRAS] into $VENV" >&2
pip install -e ".[$EXTRAS]"
"$VENV/bin/python" -c "import prune_core" || { echo "edgetune: install failed" >&2; exit 1; }
echo "$want" > "$stamp"
